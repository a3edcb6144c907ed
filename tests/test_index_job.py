"""The indexing job end to end on a real local Ray and real LanceDB tables: counts, rejects, stable ids,
carried metadata, kill-and-rerun, and tables readable without project code."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lance
import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from image_files import encode, png_claiming_size
from PIL import Image

from jobs.index import main
from jobs.stages.sources import list_files, read_list
from magiclens_core import Embedder, MagicLens, load_image, save_model
from magiclens_core.images.identity import content_id
from magiclens_core.model.config import NAMED_CONFIGS

TINY = NAMED_CONFIGS["tiny"]

ROOT = Path(__file__).resolve().parents[1]
GOOD = 120


def noise_image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def good_images(count: int, offset: int = 0) -> dict[str, bytes]:
    """`count` distinct small images, JPEG and PNG, of varied sizes."""
    images = {}
    for n in range(offset, offset + count):
        fmt = "JPEG" if n % 3 else "PNG"
        image = noise_image(n, (20 + n % 37, 18 + n % 23))
        images[f"img{n:04d}.{fmt.lower().replace('jpeg', 'jpg')}"] = encode(image, fmt)
    return images


def awkward_good() -> dict[str, bytes]:
    """Unusual files that must index: CMYK, 16-bit, palette + transparency, EXIF-rotated, animated GIF."""
    palette = Image.new("P", (12, 10), 0)
    palette.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((1, 1), 1)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = io.BytesIO()
    noise_image(7, (40, 20)).save(rotated, format="JPEG", exif=exif)
    gif = io.BytesIO()
    frames = [Image.new("RGB", (16, 12), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    return {
        "cmyk.jpg": encode(Image.new("CMYK", (24, 16), (0, 255, 255, 0)), "JPEG"),
        "deep.png": encode(Image.fromarray(np.arange(300, dtype=np.uint16).reshape(15, 20) * 200), "PNG"),
        "palette.png": encode(palette, "PNG", transparency=0),
        "rotated.jpg": rotated.getvalue(),
        "anim.gif": gif.getvalue(),
    }


def awkward_bad() -> dict[str, tuple[bytes, str]]:
    """Files that must be rejected, with the expected reason."""
    jpeg = encode(noise_image(99, (64, 64)), "JPEG")
    return {
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "corrupt"),
        "empty.jpg": (b"", "empty"),
        "notes.jpg": (b"this is a text file, not an image\n" * 4, "not_an_image"),
        "bomb.png": (png_claiming_size(100_000, 100_000), "too_many_pixels"),
        "tiny.png": (encode(Image.new("RGB", (3, 3)), "PNG"), "too_small"),
    }


def write_pool(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = folder / ("sub" if name.endswith(".png") else "") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model(MagicLens(TINY), tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("pool")
    good = {**good_images(GOOD), **awkward_good()}
    bad = awkward_bad()
    write_pool(folder, {**good, **{name: data for name, (data, _) in bad.items()}})
    (folder / "copy_of_img0001.jpg").write_bytes(good["img0001.jpg"])  # the same image twice
    (folder / "README.md").write_text("not indexed: not named like an image")
    (folder / ".hidden.jpg").write_bytes(good["img0002.jpg"])
    return {"folder": folder, "good": good, "bad": bad}


def index(model_dir: Path, images: Path | str, db: Path, *extra: str) -> dict:
    return main(["--images", str(images), "--model", str(model_dir), "--db", str(db), "--table", "pool",
                 "--min-size", "4", "--batch-size", "16", "--commit-rows", "32", *extra])


def table_rows(db: Path, name: str = "pool") -> pa.Table:
    return lancedb.connect(str(db)).open_table(name).to_arrow()


def test_folder_pool_end_to_end_and_rerun(ray_cluster, model_dir, pool, tmp_path):
    db = tmp_path / "db"
    good, bad = pool["good"], pool["bad"]
    summary = index(model_dir, pool["folder"], db)
    assert summary["rows_added"] == len(good)
    assert summary["duplicates"] == 1 and summary["rows_already_present"] == 0
    assert summary["rejected"] == summary["rejects_recorded"] == len(bad)
    assert summary["skipped_files"] == 2 and summary["skipped"] == {"not_an_image_name": 1, "hidden_file": 1}
    assert summary["table_rows"] == len(good) and summary["index"]["type"] is None

    rows = table_rows(db)
    by_id = {row["id"]: row for row in rows.to_pylist()}
    assert set(by_id) == {content_id(data) for data in good.values()}
    assert all(row["model_id"] == rows.column("model_id")[0].as_py() for row in by_id.values())
    rotated = by_id[content_id(good["rotated.jpg"])]
    assert (rotated["width"], rotated["height"]) == (20, 40)  # EXIF orientation applied
    assert Path(rotated["uri"]).read_bytes() == good["rotated.jpg"]

    # the job's vectors are the Embedder's vectors of the same images
    embedder = Embedder.load(model_dir)
    names = ["img0000.png", "img0005.jpg", "cmyk.jpg", "anim.gif", "palette.png", "deep.png"]
    expected = embedder.embed_targets([load_image(good[name]) for name in names])
    stored = np.stack([by_id[content_id(good[name])]["vector"] for name in names])
    assert np.all(np.sum(expected * stored, axis=1) > 0.999)

    rejects = table_rows(db, "pool_rejects").to_pylist()
    assert sorted((Path(r["uri"]).name, r["reason"]) for r in rejects) == sorted(
        (name, reason) for name, (_, reason) in bad.items())
    assert all(r["detail"] for r in rejects)

    again = index(model_dir, pool["folder"], db)
    assert again["rows_added"] == 0 and again["rejects_recorded"] == 0
    assert again["rows_already_present"] == len(good) + 1  # the duplicate copy is present too
    assert again["rejected"] == len(bad)
    assert sorted(table_rows(db).column("id").to_pylist()) == sorted(by_id)
    assert len(table_rows(db, "pool_rejects")) == len(bad)

    # readable without project code: plain lancedb (above) and lance / pyarrow directly
    direct = lance.dataset(str(db / "pool.lance")).to_table(columns=["id", "vector"])
    assert sorted(direct.column("id").to_pylist()) == sorted(by_id)
    assert direct.schema.field("vector").type == pa.list_(pa.float32(), TINY.head.embed_dim)


def test_new_images_from_a_list_are_appended(ray_cluster, model_dir, tmp_path):
    db = tmp_path / "db"
    old_folder, new_folder = tmp_path / "old", tmp_path / "new"
    write_pool(old_folder, good_images(6, offset=4000))
    first = index(model_dir, old_folder, db)
    new = good_images(10, offset=5000)
    write_pool(new_folder, new)
    listing = tmp_path / "paths.txt"
    listing.write_text("# one old image, the new ones (one of them twice), a missing file\n" + "\n".join(
        [str(old_folder / "img4001.jpg"), "new/img5002.jpg", "",
         *[str(p) for p in new_folder.rglob("*") if p.is_file()], "missing.jpg"]))
    summary = index(model_dir, listing, db)
    assert summary["rows_added"] == 10 and summary["rows_already_present"] == 1 and summary["duplicates"] == 1
    assert summary["rejected"] == 1 and summary["table_rows"] == first["table_rows"] + 10 == 16
    rejects = table_rows(db, "pool_rejects").to_pylist()
    assert [(Path(r["uri"]).name, r["reason"]) for r in rejects] == [("missing.jpg", "unreadable")]


def test_parquet_sources_carry_metadata(ray_cluster, model_dir, tmp_path):
    images = good_images(12, offset=7000)
    names = sorted(images)
    pq.write_table(pa.table({
        "image": pa.array([images[n] for n in names] + [b"garbage"], pa.binary()),
        "caption": [f"caption of {n}" for n in names] + ["bad"],
        "tags": [[n[:3], "x"] for n in names] + [[]],
        "page": pa.array(range(13), pa.int64()),
    }), tmp_path / "bytes.parquet")
    db = tmp_path / "db"
    summary = index(model_dir, tmp_path / "bytes.parquet", db, "--vector-dtype", "float16", "--clip-vector", "true")
    assert summary["rows_added"] == 12 and summary["rejected"] == 1
    rows = table_rows(db)
    assert rows.schema.field("vector").type == pa.list_(pa.float16(), TINY.head.embed_dim)
    assert rows.schema.field("tags").type == pa.list_(pa.string())
    for row in rows.to_pylist():
        name = names[row["page"]]
        assert row["id"] == content_id(images[name]) and row["caption"] == f"caption of {name}"
        assert row["tags"] == [name[:3], "x"] and row["uri"] is None
        assert np.linalg.norm(np.asarray(row["clip_vector"], dtype=np.float32)) == pytest.approx(1.0, abs=1e-2)

    folder = tmp_path / "files"
    write_pool(folder, images)
    uris = [str(folder / ("sub" if name.endswith(".png") else "") / name) for name in names]
    pq.write_table(pa.table({"uri": uris, "key": range(12)}), tmp_path / "uris.parquet")
    # decoding in the embedding actors (nvJPEG on a GPU; torchvision's CPU decoder here), ids from a column
    by_uri = index(model_dir, tmp_path / "uris.parquet", tmp_path / "db2", "--id-column", "key", "--gpu-decode", "true")
    assert by_uri["rows_added"] == 12
    rows = table_rows(tmp_path / "db2")
    stored = {row["key"]: row for row in rows.to_pylist()}
    assert all(stored[n]["width"] == Image.open(io.BytesIO(images[names[n]])).width for n in range(12))
    assert sorted(rows.column("id").to_pylist()) == sorted(str(k) for k in range(12))
    assert rows.column("key").to_pylist() == [int(i) for i in rows.column("id").to_pylist()]


def test_killed_run_then_rerun_gives_exactly_one_row_per_image(ray_cluster, model_dir, tmp_path):
    folder = tmp_path / "pool"
    images = good_images(240, offset=10_000)
    write_pool(folder, images)
    db = tmp_path / "db"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "jobs.index", "--images", str(folder), "--model", str(model_dir),
               "--db", str(db), "--table", "pool", "--commit-rows", "8", "--batch-size", "8"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    committed = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (db / "pool.lance").exists():
            committed = lancedb.connect(str(db)).open_table("pool").count_rows()
            if committed >= 8:
                break
        time.sleep(0.05)
    assert process.poll() is None, "the job ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    partial = lancedb.connect(str(db)).open_table("pool").count_rows()
    assert 8 <= partial < len(images), partial

    summary = index(model_dir, folder, db, "--commit-rows", "64")
    ids = table_rows(db).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(images)
    assert set(ids) == {content_id(data) for data in images.values()}
    assert summary["rows_added"] == len(images) - partial and summary["rows_already_present"] == partial
    assert index(model_dir, folder, db)["rows_added"] == 0


def test_listing_folders_globs_and_lists(tmp_path):
    write_pool(tmp_path / "pool", good_images(6))
    (tmp_path / "pool" / "notes.txt").write_text("x")
    (tmp_path / "pool" / ".DS_Store").write_bytes(b"x")
    found, skipped = list_files(str(tmp_path / "pool"))
    assert [Path(p).name for p in found] == sorted(good_images(6), key=lambda n: str(
        Path("sub" if n.endswith(".png") else "") / n))
    assert skipped == {"not_an_image_name": 1, "hidden_file": 1}
    jpegs, _ = list_files(str(tmp_path / "pool" / "*.jpg"))
    assert sorted(Path(p).name for p in jpegs) == sorted(n for n in good_images(6) if n.endswith(".jpg"))
    listing = tmp_path / "pool" / "list.txt"
    listing.write_text(f"# comment\nimg0001.jpg\n\n{tmp_path}/elsewhere.png\ns3://bucket/key.jpg\n")
    assert read_list(str(listing)) == [str(tmp_path / "pool" / "img0001.jpg"), f"{tmp_path}/elsewhere.png",
                                       "s3://bucket/key.jpg"]
