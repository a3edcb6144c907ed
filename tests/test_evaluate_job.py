"""The evaluation job end to end: a tiny model over the annotation excerpts with placeholder images, the
same numbers as training validation on one retrieval set, and scoring existing prediction files without
a model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from benchmark_folders import FIXTURES, benchmark_folder, placeholder

from jobs.evaluate import EvaluateConfig, embed_rows, image_rows, main
from jobs.train_loop import MODEL_DIR, validate_checkpoint
from magiclens_core import Embedder, MagicLens, save_model
from magiclens_core.evaluation.benchmarks import load_benchmark, protocol
from magiclens_core.evaluation.evaluator import evaluate_embedder
from magiclens_core.images.pixels import as_float_batch, model_pixels
from magiclens_core.model.config import NAMED_CONFIGS
from magiclens_core.synthetic import SyntheticWorld

TINY = NAMED_CONFIGS["tiny"]

REPO = Path(__file__).resolve().parents[1]
EXPECTED_KEYS = {
    "circo": {"mAP@5", "mAP@10", "mAP@25", "mAP@50", "R@5", "R@10", "R@25", "R@50"},
    "cirr": {"R@1", "R@2", "R@5", "R@10", "R@50", "R_subset@1", "R_subset@2", "R_subset@3"},
    "fashioniq": {f"{c}/R@{k}" for c in ("dress", "shirt", "toptee", "average") for k in (10, 50)},
    "dtin": {f"{d}/R@{k}" for d in ("cartoon", "origami", "toy", "sculpture", "average") for k in (10, 50)},
    "genecis": {f"{t}/R@{k}" for t in ("focus_attribute", "focus_object", "change_object", "average")
                for k in (1, 2, 3)},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, ray_cluster):
    """A tiny model folder; runs with it embed on the session's Ray cluster."""
    path = tmp_path_factory.mktemp("model")
    save_model(MagicLens(TINY), path)
    return path


def add_attribute_task(root: Path) -> None:
    """Two GeneCIS focus-attribute records in the layout its code reads, with Visual Genome placeholders."""
    item = lambda image_id, box: {"image_id": image_id, "instance_bbox": box}  # noqa: E731
    records = [{"condition": condition, "reference": item(10 + i, [5, 5, 20, 30]),
                "target": item(20 + i, [0, 0, 40, 40]), "gallery": [item(30 + j, [10, 10, 15, 15]) for j in range(4)]}
               for i, condition in enumerate(["red", "wooden"])]
    (root / "focus_attribute.json").write_text(json.dumps(records))
    for image_id in {10, 11, 20, 21, 30, 31, 32, 33}:
        placeholder(root / "VG_100K_all" / f"{image_id}.jpg", str(image_id), size=(80, 60))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each benchmark's excerpt with placeholder images, made once for the module."""
    parent = tmp_path_factory.mktemp("benchmarks")
    made = {name: benchmark_folder(name, parent) for name in EXPECTED_KEYS}
    add_attribute_task(made["genecis"])
    return made


def run(*argv: str) -> dict:
    return main([str(arg) for arg in argv])


def check_circo_files(benchmark, out: Path, files: list[str]) -> None:
    """CIRCO's server file: the top 50 of every query, ids as ints."""
    pool = set(benchmark.tasks[0].pool)
    assert files == [f"circo_{benchmark.split}_submission.json"]
    data = json.loads((out / files[0]).read_text())
    assert list(data) == [q.id for q in benchmark.queries]
    assert all(len(v) == 50 == len(set(v)) and all(isinstance(i, int) and str(i) in pool for i in v)
               for v in data.values())


def check_cirr_files(benchmark, out: Path, files: list[str]) -> None:
    """CIRR's two server files with their header: the top 50 without the reference, the top 3 of the subset."""
    split = "test1" if benchmark.split == "test" else "val"
    assert files == [f"cirr_{split}_recall.json", f"cirr_{split}_recall_subset.json"]
    recall, subset = (json.loads((out / name).read_text()) for name in files)
    assert (recall.pop("version"), recall.pop("metric")) == ("rc2", "recall")
    assert (subset.pop("version"), subset.pop("metric")) == ("rc2", "recall_subset")
    assert list(recall) == list(subset) == [q.id for q in benchmark.queries]
    for query in benchmark.queries:
        assert len(recall[query.id]) == 50 and query.reference not in recall[query.id]
        assert len(subset[query.id]) == 3 and set(subset[query.id]) <= set(query.candidates)


def check_predictions_file(benchmark, out: Path, files: list[str]) -> None:
    """The benchmarks without a server: every query's ranking of its pool (or candidates), top 50."""
    assert files == [f"{benchmark.name}_val_predictions.json"]
    data = json.loads((out / files[0]).read_text())
    assert list(data) == [q.id for q in benchmark.queries]
    for task in benchmark.tasks:
        for query in task.queries:
            expected = set(query.candidates) if task.candidates_only else set(task.pool)
            assert set(data[query.id]) <= expected and len(data[query.id]) == min(50, len(expected))


SUBMISSION_CHECKS = {"circo": check_circo_files, "cirr": check_cirr_files}


def check_submission(benchmark, out: Path, files: list[str]) -> None:
    """The files are in the benchmark's submission format and cover every query."""
    SUBMISSION_CHECKS.get(benchmark.name, check_predictions_file)(benchmark, out, files)


@pytest.mark.parametrize("name,preprocess", [("circo", "model"), ("cirr", "model"), ("fashioniq", "model"),
                                             ("dtin", "model"), ("genecis", "official_eval")])
def test_model_run_writes_metrics_submissions_and_report(name, preprocess, folders, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    summary = run("--benchmark", name, "--data", folders[name], "--model", model_dir, "--out", out,
                  "--preprocess", preprocess, "--report-samples", 4)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(summary))
    stored = json.loads((out / "metrics.json").read_text())
    assert stored["metrics"] == summary["metrics"] and stored["config"]["preprocess"] == preprocess
    metrics = summary["metrics"]
    assert EXPECTED_KEYS[name] <= set(metrics) and all(0.0 <= v <= 100.0 for v in metrics.values())
    benchmark = load_benchmark(name, folders[name])
    check_submission(benchmark, out, summary["files"])

    page = (out / "report.html").read_text()
    assert page.count('class="query"') == 4 and page.count('class="ref"') == 4
    for base, large in protocol(name).paper.numbers.values():
        assert f"<td>{base:.1f}</td><td>{large:.1f}</td>" in page
    assert page.count("<img ") >= 4 * 2 and "data:image/jpeg;base64," in page

    # the written files score, without the model, to the same numbers
    rescored = run("--benchmark", name, "--data", folders[name], "--predictions",
                   *(out / file for file in summary["files"]))
    assert rescored["metrics"] == pytest.approx(metrics)


def test_genecis_reports_missing_tasks_and_crops_attribute_images(folders, model_dir, tmp_path):
    summary = run("--benchmark", "genecis", "--data", folders["genecis"], "--model", model_dir, "--out", tmp_path)
    assert set(summary["missing"]) == {"change_attribute"}
    assert not any(key.startswith("change_attribute") for key in summary["metrics"])
    assert summary["metrics"]["average/R@1"] == pytest.approx(
        sum(summary["metrics"][f"{t}/R@1"] for t in ("focus_attribute", "focus_object", "change_object")) / 3)


@pytest.mark.parametrize("name", ["circo", "cirr"])
def test_test_split_writes_only_the_submission_files(name, folders, model_dir, tmp_path):
    summary = run("--benchmark", name, "--data", folders[name], "--split", "test", "--model", model_dir,
                  "--out", tmp_path)
    assert summary["metrics"] == {} and summary["split"] == "test"
    check_submission(load_benchmark(name, folders[name], "test"), tmp_path, summary["files"])
    assert "No ground truth on this split" in (tmp_path / "report.html").read_text()


def test_queries_and_pool_embedded_in_one_ray_pass_are_the_embedders_vectors_in_order(folders, model_dir):
    """One run of the Ray Data stages (decode tasks, `Embedder` actors) gives each query row the vector the
    in-process `Embedder` gives its pixels and instruction, and each pool row its target vector, GeneCIS
    instance crops included, whatever order batches come back in."""
    genecis = load_benchmark("genecis", folders["genecis"])
    pool_ids = [*genecis.tasks[0].pool[:5], *genecis.tasks[1].pool[:40]][::-1]
    queries = [*genecis.tasks[0].queries[:2], *genecis.tasks[1].queries[:6]]
    assert any(genecis.images[i].box for i in pool_ids) and any(not genecis.images[i].box for i in pool_ids)
    config = EvaluateConfig(benchmark="genecis", data=str(folders["genecis"]), model=str(model_dir), batch_size=4,
                            workers=2, cpus_per_worker=0.5)
    embedder = Embedder.load(model_dir)
    refused: dict[str, str] = {}
    rows = image_rows(genecis, queries, pool_ids)
    assert rows.num_rows == len(queries) + len(pool_ids)
    vectors = embed_rows(rows, config, embedder.model.image_size, embedder.dim, refused)
    assert refused == {}

    def pixels(image_ids):
        refs = [genecis.images[i] for i in image_ids]
        return as_float_batch(np.stack([model_pixels(ref.path.read_bytes(), embedder.model.image_size,
                                                     box=ref.box)[0] for ref in refs]))

    expected_queries = embedder.embed_queries(pixels([q.reference for q in queries]), [q.text for q in queries])
    np.testing.assert_allclose(vectors[:len(queries)], expected_queries, atol=2e-5)
    np.testing.assert_allclose(vectors[len(queries):], embedder.embed_targets(pixels(pool_ids)), atol=2e-5)


def test_training_validation_and_the_job_report_the_same_numbers(model_dir, tmp_path):
    """The validation a training run reports (`validate_checkpoint`, embedding in its own process) and
    `jobs.evaluate --benchmark synthetic` (Ray Data stages, `Embedder` actors) score one model on one
    retrieval set alike: the same rankings, the same recall, in percent."""
    root = SyntheticWorld(seed=8).write_benchmark(tmp_path / "bench", 16, pool_size=40)
    summary = run("--benchmark", "synthetic", "--data", root, "--model", model_dir, "--out", tmp_path / "out",
                  "--batch-size", 8, "--workers", 2, "--cpus-per-worker", 0.5)
    folder = tmp_path / "checkpoint"
    shutil.copytree(model_dir, folder / MODEL_DIR)
    import ray.train

    validated = validate_checkpoint(ray.train.Checkpoint.from_directory(str(folder)), str(root), batch_size=5)
    assert validated == {f"val_recall@{k}": summary["metrics"][f"synthetic/R@{k}"] for k in (1, 5, 10)}
    hits = {name: value * 16 / 100 for name, value in validated.items()}  # percent of 16 queries
    assert all(count.is_integer() for count in hits.values()) and hits["val_recall@10"] <= 16

    in_process = evaluate_embedder(Embedder.load(model_dir, batch_size=5), load_benchmark("synthetic", root))
    written = json.loads((tmp_path / "out" / "synthetic_val_predictions.json").read_text())
    assert {query: ranking[:10] for query, ranking in written.items()} == \
        {query: ranking[:10] for query, ranking in in_process.rankings.items()}
    assert in_process.metrics == summary["metrics"]


def test_the_synthetic_benchmark_scores_recall_at_1_5_10(model_dir, tmp_path):
    root = SyntheticWorld(seed=3).write_benchmark(tmp_path / "bench", 12, pool_size=30)
    summary = run("--benchmark", "synthetic", "--data", root, "--model", model_dir, "--out", tmp_path / "out",
                  "--report-samples", 3)
    metrics = summary["metrics"]
    assert set(metrics) == {f"{t}/R@{k}" for t in ("synthetic", "average") for k in (1, 5, 10)}
    assert summary["pool_size"] == 30 and summary["queries"] == 12
    assert metrics["synthetic/R@1"] <= metrics["synthetic/R@5"] <= metrics["synthetic/R@10"]
    predictions = tmp_path / "out" / "synthetic_val_predictions.json"
    assert run("--benchmark", "synthetic", "--data", root, "--predictions", predictions)["metrics"] == metrics
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count('class="query"') == 3 and "data:image/jpeg;base64," in page

    bench = load_benchmark("synthetic", root)
    oracle = {q.id: [q.target] + [i for i in bench.tasks[0].pool if i != q.target] for q in bench.queries}
    reverse = {q.id: ranking[::-1] for q, ranking in zip(bench.queries, oracle.values(), strict=True)}
    for name, ranking, expected in [("oracle", oracle, 100.0), ("reverse", reverse, 0.0)]:
        (tmp_path / f"{name}.json").write_text(json.dumps(ranking))
        scored = run("--benchmark", "synthetic", "--data", root, "--predictions", tmp_path / f"{name}.json")
        assert scored["metrics"]["synthetic/R@10"] == expected


def test_scoring_only_from_the_command_line(tmp_path):
    """No model and no images: the annotation folder and a predictions file are enough."""
    root = FIXTURES / "fashioniq"
    benchmark = load_benchmark("fashioniq", root)
    predictions = {q.id: [q.target] for q in benchmark.queries}
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps(predictions))
    result = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--benchmark", "fashioniq", "--data", str(root),
                             "--predictions", str(path)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert "Ray instance" not in result.stderr  # scoring alone starts no Ray
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["metrics"]["average/R@10"] == 100.0 and summary["queries"] == 49


def test_cirr_scores_recall_and_recall_subset_files_together(tmp_path):
    root = FIXTURES / "cirr"
    cirr = load_benchmark("cirr", root)
    recall = {"version": "rc2", "metric": "recall", **{q.id: [q.reference, q.target] for q in cirr.queries}}
    subset = {"version": "rc2", "metric": "recall_subset",
              **{q.id: [c for c in q.candidates if c != q.target][:2] + [q.target] for q in cirr.queries}}
    for name, data in [("recall.json", recall), ("subset.json", subset)]:
        (tmp_path / name).write_text(json.dumps(data))
    metrics = run("--benchmark", "cirr", "--data", root, "--predictions", tmp_path / "recall.json",
                  tmp_path / "subset.json")["metrics"]
    assert metrics["R@1"] == 100.0  # the reference is taken out of the ranking
    assert (metrics["R_subset@2"], metrics["R_subset@3"]) == (0.0, 100.0)
    soft = run("--benchmark", "cirr", "--data", root, "--predictions", tmp_path / "recall.json",
               "--cirr-targets", "soft")
    assert soft["cirr_targets"] == "soft" and soft["metrics"]["R@1"] < 100.0


@pytest.mark.parametrize("change,message", [
    (lambda p: {**p, "0": [p["0"][0], p["0"][0]]}, "query 0 has duplicate predictions"),
    (lambda p: {k: v for k, v in p.items() if k != "5"}, "1 queries have no predictions"),
    (lambda p: {**p, "oops": []}, "unknown queries"),
])
def test_scoring_only_rejects_bad_predictions(change, message, tmp_path):
    root = FIXTURES / "circo"
    circo = load_benchmark("circo", root)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(change({q.id: [int(q.target)] for q in circo.queries})))
    with pytest.raises(SystemExit, match=message):
        run("--benchmark", "circo", "--data", root, "--predictions", path)


def test_bad_flags_are_usage_errors(tmp_path, model_dir):
    with pytest.raises(SystemExit, match="either --model"):
        run("--benchmark", "circo", "--data", FIXTURES / "circo")
    with pytest.raises(SystemExit, match="needs --out"):
        run("--benchmark", "circo", "--data", FIXTURES / "circo", "--model", model_dir)
    with pytest.raises(SystemExit, match="circo's metrics and submission files need the top 50: use --k 50"):
        run("--benchmark", "circo", "--data", FIXTURES / "circo", "--model", model_dir, "--out", tmp_path,
            "--k", 10)
    with pytest.raises(SystemExit, match="--predictions .*absent.json: no such file"):
        run("--benchmark", "circo", "--data", FIXTURES / "circo", "--predictions", tmp_path / "absent.json")


def test_circo_without_its_gallery_list_names_the_file(tmp_path, model_dir):
    with pytest.raises(SystemExit, match="image_info_unlabeled2017.json"):
        run("--benchmark", "circo", "--data", FIXTURES / "circo", "--model", model_dir, "--out", tmp_path)


def test_missing_and_corrupt_images_are_reported_with_their_paths(tmp_path, model_dir):
    root = benchmark_folder("fashioniq", tmp_path)
    fiq = load_benchmark("fashioniq", root)
    gone = fiq.images[fiq.tasks[1].pool[3]].path
    gone.unlink()
    with pytest.raises(SystemExit, match=f"1 image file\\(s\\) missing, e.g. {gone}"):
        run("--benchmark", "fashioniq", "--data", root, "--model", model_dir, "--out", tmp_path / "a")
    assert (tmp_path / "a" / "missing_images.txt").read_text().split() == [str(gone)]
    gone.write_bytes(b"this is not a png")
    with pytest.raises(SystemExit, match=f"1 image\\(s\\) cannot be decoded, e.g. {gone} \\(not_an_image\\)"):
        run("--benchmark", "fashioniq", "--data", root, "--model", model_dir, "--out", tmp_path / "b")
    assert json.loads((tmp_path / "b" / "unreadable_images.json").read_text()) == {str(gone): "not_an_image"}
