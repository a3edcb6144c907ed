"""The mining job end to end on a real local Ray: synthetic-world pages captioned by a tiny image-to-text
model, a crawl of a local web server (WARC, WAT and HTML, with every misbehaviour), resuming, and
`jobs.train` learning from what it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mine_corpus import png, wat_envelope, write_warc, write_wat
from mine_models import CAPTION_WORDS, tiny_captioner, tiny_causal_model, tiny_sentence_model
from mine_server import WebServer

from jobs import mine
from jobs.common import parse_config
from jobs.stages.triplets import decode_triplets, read_triplets
from jobs.train import main as train_main
from magiclens_core.mining.instructions import ImageText, template_instruction
from magiclens_core.model.tokenizer import Tokenizer
from magiclens_core.synthetic import ATTRIBUTES, SyntheticWorld

MODEL = str(Path(__file__).parent / "fixtures" / "official_tiny" / "params_tiny.pkl")
WIDE = ["--image-low", "-1", "--image-high", "0.9999", "--text-low", "-1", "--text-high", "0.9999"]
PAGES = 48  # enough triplets (≤ 3 a page) for the tiny model to learn from


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> str:
    return str(tiny_sentence_model(tmp_path_factory.mktemp("text_model")))


def _args(pages: list[str], out: Path, text_model: str, *extra: str) -> list[str]:
    return ["--pages", *pages, "--model", MODEL, "--out", str(out), "--text-model", text_model, "--min-side", "32",
            "--cpus-per-worker", "0.5", "--pages-per-batch", "4", "--commit-pages", "4", *WIDE, *extra]


def _triplets(out: Path) -> list[dict]:
    files = sorted((out / "triplets").glob("part-*.parquet"))
    return [row for path in files for row in pq.read_table(path).to_pylist()]


@pytest.fixture(scope="module")
def synthetic_run(ray_cluster, tmp_path_factory, text_model) -> dict:
    """Synthetic-world pages mined once with template instructions and the tiny captioner."""
    root = tmp_path_factory.mktemp("synthetic")
    world = SyntheticWorld(seed=3)
    folder = world.write_web_pages(root / "site", PAGES)
    captioner = str(tiny_captioner(root / "captioner"))
    args = _args([str(folder)], root / "mined", text_model, "--captioner", captioner, "--commit-pages", "16",
                 "--pages-per-batch", "16")
    summary = mine.run(parse_config(mine.MineConfig, args))
    return {"world": world, "folder": folder, "out": root / "mined", "args": args, "summary": summary,
            "captioner": captioner, "text_model": text_model}


def test_synthetic_pages_with_template_instructions_and_captions(synthetic_run):
    world, folder, out, summary = (synthetic_run[key] for key in ("world", "folder", "out", "summary"))
    scenes, pages, tokenizer = {}, world.web_pages(PAGES), Tokenizer()
    for index, page in enumerate(pages):
        for image in page.images:
            scenes[(folder / image.name).as_uri()] = (index, image)
    rows = _triplets(out)
    assert summary["pages_read"] == PAGES and summary["triplets_written"] == len(rows) > 0
    assert summary["instructions_by_origin"] == {"template": len(rows)}
    assert summary["rejects"]["fetch/icon_logo_or_ad"] == PAGES  # every page's logo
    per_page: dict[str, int] = {}
    for row in rows:
        query_page, query = scenes[row["query_url"]]
        target_page, target = scenes[row["target_url"]]
        assert query_page == target_page and query.scene and target.scene and query.scene != target.scene
        assert row["query_image"] == query.data and row["target_image"] == target.data
        assert row["instruction"] == template_instruction(ImageText(target.alt), tokenizer, ImageText(query.alt))
        assert row["instruction"] != f"{target.alt} instead" and row["instruction_origin"] == "template"
        shared = [a for a, q, t in zip(ATTRIBUTES, query.scene.split("-"), target.scene.split("-"), strict=True)
                  if q == t]
        page_attribute = pages[query_page].url.split("/")[3]
        assert page_attribute in shared  # the page groups images sharing this attribute
        assert (row["query_width"], row["target_height"]) == (world.image_size, world.image_size)
        assert row["image_model"] == MODEL and row["text_model"] == synthetic_run["text_model"]
        assert row["captioner"] == synthetic_run["captioner"]
        assert (row["query_page_caption"], row["target_page_caption"]) == (query.caption, target.caption)
        for caption in (row["query_caption"], row["target_caption"]):
            assert isinstance(caption, str) and caption
        per_page[row["page_id"]] = per_page.get(row["page_id"], 0) + 1
    assert max(per_page.values()) <= 3
    assert len({(r["query_id"], r["target_id"]) for r in rows}) == len(rows)
    generated = [r["query_caption"] for r in rows if r["query_caption"] != r["query_page_caption"]]
    assert len(generated) > len(rows) // 2 and all(set(c.split()) <= set(CAPTION_WORDS.split()) for c in generated)
    assert summary["captioner"] == synthetic_run["captioner"] and summary["seconds_per_stage"]["annotate"] > 0
    rejects = pq.read_table(out / "rejects").to_pylist()
    assert {r["stage"] for r in rejects} >= {"fetch"} and all(r["reason"] and r["page_url"] for r in rejects)

    again = mine.run(parse_config(mine.MineConfig, synthetic_run["args"]))
    assert (again["pages_read"], again["triplets_written"], again["pages_already_done"]) == (0, 0, PAGES)
    assert len(_triplets(out)) == len(rows)

    batch = read_triplets(str(out / "triplets")).take_batch(4, batch_format="numpy")  # what jobs.train reads
    decoded = decode_triplets(batch, image_size=32)
    assert decoded["query_pixels"].shape == (len(batch["instruction"]), 32, 32, 3)
    assert decoded["query_ids"].shape[1] == 77


def test_jobs_train_learns_from_the_mined_triplets(synthetic_run, tmp_path):
    bench = synthetic_run["world"].write_benchmark(tmp_path / "bench", 300, pool_size=100)
    summary = train_main(["--triplets", str(synthetic_run["out"] / "triplets"), "--init", "tiny", "--name", "mined",
                          "--storage", str(tmp_path / "runs"), "--workers", "1", "--batch-size", "32",
                          "--steps", "160", "--lr", "2e-3", "--warmup-steps", "8", "--temperature", "0.07",
                          "--checkpoint-every", "80", "--validation", str(bench)])
    last = summary["history"][-1]
    assert summary["steps"] == last["step"] == 160 and last["loss"] < summary["history"][0]["loss"], summary
    # 300 queries over a pool of 100: chance is 10 ± 1.7 % at R@10 and 5 ± 1.3 % at R@5; 15 runs of this
    # length on these 142 mined triplets ended at R@10 13-24 and R@5 8.7-12 (a weak, noisy signal)
    assert last["val_recall@10"] >= 11.0 and last["val_recall@5"] >= 6.0, last


def test_small_page_files_share_read_tasks_and_crawl_files_get_their_own(tmp_path):
    from jobs.stages.mining import MIN_SMALL_FILE_TASKS, SMALL_FILE_BYTES, SMALL_FILES_PER_TASK, read_blocks

    many = SMALL_FILES_PER_TASK * (MIN_SMALL_FILE_TASKS + 2) + 1
    small = []
    for n in range(many):
        small.append(str(tmp_path / f"page{n}.html"))
        Path(small[-1]).write_text("<title>a page</title>")
    crawl = tmp_path / "crawl.warc.gz"
    crawl.write_bytes(b"\0" * SMALL_FILE_BYTES)
    assert read_blocks(small) == MIN_SMALL_FILE_TASKS + 3  # grouped
    assert read_blocks(small[:5]) == 5 and read_blocks(small[:100]) == MIN_SMALL_FILE_TASKS  # still streamed
    assert read_blocks([*small[:5], str(crawl), "s3://bucket/crawl.wat.gz"]) == 7  # a task per crawl file


def test_a_missing_captioner_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mine.main(["--pages", str(tmp_path), "--model", MODEL, "--out", str(tmp_path / "out"),
                   "--captioner", str(tmp_path / "no-such-model")])
    assert exit_info.value.code == 2 and "no-such-model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def _crawl(tmp_path: Path, server: WebServer) -> list[str]:
    colours = [(200, 30, 30), (30, 160, 40), (40, 60, 210), (220, 200, 30), (140, 50, 180), (230, 120, 20)]
    for index, colour in enumerate(colours):
        server.images[f"/img/{index}.png"] = png(64, 64, colour, stripe=8 * index)
    bad = ["/missing.png", "/slow.png", "/endless.png", "/big.png", "/fake.jpg", "/noai.png",
           "/redirect-private.png", "/img/1.gif"]
    tags = "".join(f'<img src="{server.url(path)}" alt="picture {path}">' for path in bad)
    html = tmp_path / "html"
    html.mkdir()
    (html / "broken.html").write_text(
        f'<title>Broken page</title><body><div><p>red things<img src="{server.url("/img/0.png")}" alt="a red square">'
        f'<img src="{server.url("/img/1.png")}" alt="a green square"><table><td>{tags}'
        f'<img src="{server.url("/flaky.png")}" alt="a blue square after a retry">')
    (html / "single.html").write_text(f'<title>One</title><img src="{server.url("/img/2.png")}" alt="alone">')
    (html / "dup.html").write_text(f'<title>Dup</title><img src="{server.url("/img/0.png")}" alt="red again">'
                                   f'<img src="{server.url("/img/3.png")}" alt="a yellow square">')
    stored = {"http://archive.example/s/1.png": png(64, 64, (10, 200, 200), 5),
              "http://archive.example/s/2.png": png(64, 64, (200, 10, 200), 30)}
    warc = write_warc(tmp_path / "crawl.warc.gz", {
        "http://archive.example/gallery": '<title>Archive</title><img src="/s/1.png" alt="a cyan square">'
                                          '<img src="/s/2.png" alt="a magenta square">'}, stored)
    wat = write_wat(tmp_path / "crawl.wat.gz", [wat_envelope(server.url("/blog/post"), "Blog", [
        {"path": "IMG@/src", "url": "/img/4.png", "alt": "a purple square"},
        {"path": "IMG@/src", "url": "/img/5.png", "alt": "an orange square"},
        {"path": "IMG@/src", "url": "/static/logo.png", "alt": "logo"}])])
    return [str(html), str(warc), str(wat), str(Path(__file__).parent / "fixtures" / "warc" / "example-trunc.warc")]


def test_crawl_of_a_local_server_with_llm_instructions(ray_cluster, tmp_path, text_model):
    server = WebServer()
    try:
        sources = _crawl(tmp_path, server)
        llm = str(tiny_causal_model(tmp_path / "llm"))
        out = tmp_path / "mined"
        summary = mine.run(parse_config(mine.MineConfig, _args(
            sources, out, text_model, "--allow-networks", "127.0.0.1/32", "--fetch-deadline-s", "1.5",
            "--max-image-bytes", "500000", "--fetch-retries", "1", "--instructions", "llm", "--llm", llm)))
    finally:
        server.close()
    rejects = summary["rejects"]
    for reason in ("fetch/http_status", "fetch/deadline", "fetch/too_large", "fetch/not_an_image",
                   "fetch/robots_noai", "fetch/private_address", "fetch/icon_logo_or_ad", "clean/tracking_pixel",
                   "clean/duplicate", "clean/fewer_than_two_images", "read/damaged_archive"):
        assert rejects.get(reason), (reason, json.dumps(rejects))
    assert server.hits["/flaky.png"] == 2 and not any(path.startswith("/s/") for path in server.hits)
    assert summary["pages_read"] == 6  # 3 HTML, 1 WARC page, 1 WAT page, 1 page of the truncated WARC
    assert summary["pairs_scored"] > 0
    instruct = sum(count for key, count in rejects.items() if key.startswith("instruct/"))
    kept_pairs = summary["pairs_scored"] - sum(count for key, count in rejects.items() if key.startswith("score/"))
    assert instruct + summary["triplets_written"] == kept_pairs > 0  # every kept pair: a triplet or a reject
    rows = pq.read_table(out / "rejects").to_pylist()
    details = [r["detail"] for r in rows if r["stage"] == "instruct"]
    assert details and all("answer:" in detail for detail in details)
    assert json.dumps(summary)


def test_killed_run_resumes_without_duplicates_or_gaps(ray_cluster, tmp_path, text_model):
    folder = SyntheticWorld(seed=5).write_web_pages(tmp_path / "site", 24)
    out = tmp_path / "mined"
    args = _args([str(folder)], out, text_model, "--commit-pages", "2", "--pages-per-batch", "2")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-m", "jobs.mine", *args], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and process.poll() is None and not list((out / "pages").glob("part-*")):
        time.sleep(0.2)
    assert process.poll() is None, "the job ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = len(list((out / "pages").glob("part-*")))
    assert 0 < committed < 12
    summary = mine.run(parse_config(mine.MineConfig, args))
    assert summary["pages_already_done"] > 0 and summary["pages_read"] + summary["pages_already_done"] == 24
    pages = pq.read_table(out / "pages").to_pylist()
    assert sorted(p["page_id"] for p in pages) == sorted({p["page_id"] for p in pages}) and len(pages) == 24
    rows = _triplets(out)
    keys = [(r["page_id"], r["query_id"], r["target_id"]) for r in rows]
    assert len(keys) == len(set(keys)) == sum(p["triplets"] for p in pages)
    per_page = {p["page_id"]: p["triplets"] for p in pages}
    for page_id, count in per_page.items():
        assert sum(1 for key in keys if key[0] == page_id) == count
