"""Evaluate a MagicLens model on a paper benchmark, or score an existing predictions file.

    python -m jobs.evaluate --benchmark circo --data ROOT --model MODEL --out DIR [--split val|test]
        [--preprocess model|official_eval] [--k 50] [--workers N --gpus-per-worker G]
    python -m jobs.evaluate --benchmark circo --data ROOT --predictions P.json [--split val]

With a model it embeds the queries and the pool with the shared `Embedder` through the indexing job's Ray
Data stages (`jobs.stages.embed`), ranks the pool by exact cosine similarity, and writes `metrics.json`, the
benchmark's submission files and `report.html` to `--out`. With `--predictions` (one file or several,
e.g. CIRR's recall and recall_subset files) it only scores them, without Ray. Either way the last output
line is the JSON summary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

from jobs.common import init_ray, parse_config, print_summary
from jobs.stages.embed import NEW, EmbedOptions, check_instructions, embed_images, model_info, read_images
from jobs.stages.sources import table_dataset
from magiclens_core.evaluation.benchmarks import Benchmark, BenchmarkDataError, load_benchmark
from magiclens_core.evaluation.benchmarks.predictions import SUBMISSION_DEPTH, rankings_from_files, write_predictions
from magiclens_core.evaluation.metrics import PredictionError, score
from magiclens_core.evaluation.ranking import rank_candidates, rank_pool
from magiclens_core.evaluation.report import write_report

Rankings = dict[str, list[str]]


@dataclass(kw_only=True)
class EvaluateConfig(EmbedOptions):
    """Options of `python -m jobs.evaluate`; the embedding options are the indexing job's."""

    benchmark: Literal["circo", "cirr", "fashioniq", "dtin", "genecis", "synthetic"] = field(
        metadata={"help": "which benchmark"})
    data: str = field(metadata={"help": "the benchmark's folder, laid out as its official release"})
    split: Literal["val", "test"] = field(default="val", metadata={"help": "test: CIRCO, CIRR submission files"})
    model: str | None = field(default=None, metadata={"help": "model folder or official .pkl"})
    out: str | None = field(default=None, metadata={"help": "output folder (with --model)"})
    predictions: list[str] = field(default_factory=list, metadata={"help": "score these files, no model"})
    k: int = field(default=50, metadata={"help": "results kept per query"})
    cirr_targets: Literal["hard", "soft"] = field(default="hard", metadata={"help": "CIRR target_hard or soft"})
    report_samples: int = field(default=12, metadata={"help": "sample queries shown in report.html"})


class EvaluationError(RuntimeError):
    """Input the evaluation cannot use, said in one message (missing or unreadable images, no pool)."""


def check_images_exist(benchmark: Benchmark, ids: Sequence[str], out: Path) -> None:
    """Fail before any work when an image file is missing: the count, the first paths, the full list in `out`."""
    missing = sorted({str(benchmark.images[image_id].path) for image_id in ids
                      if not benchmark.images[image_id].exists})
    if missing:
        listing = out / "missing_images.txt"
        listing.write_text("\n".join(missing) + "\n")
        raise EvaluationError(f"{len(missing)} image file(s) missing, e.g. {missing[0]}; all listed in {listing}")


def image_rows(benchmark: Benchmark, ids: Sequence[str], texts: Sequence[str] | None = None,
               images: Sequence[str] | None = None) -> pa.Table:
    """The rows the embedding stages take: `id`, the image as `uri` (or `image` bytes) with its crop `box`,
    and the `instruction` when `texts` is given (then the rows embed as queries of `images`)."""
    refs = [benchmark.images[image_id] for image_id in (images or ids)]
    columns = {"id": pa.array(list(ids), pa.string()), "uri": pa.array([str(ref.path) for ref in refs])}
    if any(ref.data is not None for ref in refs):
        columns["image"] = pa.array([ref.data for ref in refs], pa.binary())
    if any(ref.box is not None for ref in refs):
        columns["box"] = pa.array([None if ref.box is None else list(ref.box) for ref in refs],
                                  pa.list_(pa.float64()))
    if texts is not None:
        columns["instruction"] = pa.array(list(texts), pa.string())
    return pa.table(columns)


def embed_rows(rows: pa.Table, config: EvaluateConfig, image_size: int, dim: int,
               refused: dict[str, str]) -> np.ndarray:
    """Embeddings [N, D] of `image_rows`, in row order, through the shared Ray Data stages (decode in CPU
    tasks, `Embedder` actors). A row that cannot be embedded is recorded in `refused` (uri → reason)."""
    dataset = read_images(table_dataset(rows), id_column="id")
    if "instruction" in rows.column_names and not config.truncate_instructions:
        dataset = check_instructions(dataset)
    dataset = embed_images(dataset, config, image_size)
    row_of = {row_id: index for index, row_id in enumerate(rows.column("id").to_pylist())}
    vectors = np.zeros((rows.num_rows, dim), dtype=np.float32)
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        ids, status = batch.column("id").to_pylist(), batch.column("status").to_pylist()
        embedded = batch.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, dim)
        for index, (row_id, outcome) in enumerate(zip(ids, status, strict=True)):
            if outcome == NEW:
                vectors[row_of[row_id]] = embedded[index]
            else:
                refused[batch.column("uri")[index].as_py()] = batch.column("reason")[index].as_py()
    return vectors


def _raise_refused(refused: dict[str, str], out: Path) -> None:
    if refused:
        listing = out / "unreadable_images.json"
        listing.write_text(json.dumps(refused, indent=1))
        first = next(iter(refused.items()))
        raise EvaluationError(f"{len(refused)} image(s) cannot be decoded, e.g. {first[0]} ({first[1]}); "
                              f"all listed in {listing}")


def rank(benchmark: Benchmark, query_vectors: np.ndarray, pool_ids: list[str], pool_vectors: np.ndarray,
         k: int, device: torch.device | None = None) -> tuple[Rankings, Rankings | None]:
    """Each task's queries against its pool (GeneCIS: their own candidates); CIRR also ranks each subset."""
    row_of = {image_id: row for row, image_id in enumerate(pool_ids)}
    rankings: Rankings = {}
    subsets: Rankings = {}
    start = 0
    for task in benchmark.tasks:
        vectors = query_vectors[start:start + len(task.queries)]
        start += len(task.queries)
        task_vectors = pool_vectors[[row_of[image_id] for image_id in task.pool]]
        candidates = [query.candidates for query in task.queries]
        if task.candidates_only:
            ranked = rank_candidates(vectors, task_vectors, task.pool, candidates)
        else:
            ranked = rank_pool(vectors, task_vectors, task.pool, k, exclude=[q.exclude for q in task.queries],
                               device=device)
            if all(candidates):
                ranked_subsets = rank_candidates(vectors, task_vectors, task.pool, candidates)
                subsets |= {query.id: ids for query, ids in zip(task.queries, ranked_subsets, strict=True)}
        rankings |= {query.id: ids for query, ids in zip(task.queries, ranked, strict=True)}
    return rankings, subsets or None


@contextmanager
def stage(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall time of the block under `name`."""
    start = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - start, 3)


def run_model(config: EvaluateConfig, benchmark: Benchmark) -> dict:
    """Embed, rank, score and write the output folder; returns the summary."""
    if config.out is None:
        raise EvaluationError("--model needs --out, the folder for metrics.json, submissions and report.html")
    if benchmark.name in ("circo", "cirr") and config.k < SUBMISSION_DEPTH:
        raise EvaluationError(f"{benchmark.name}'s submission files hold the top {SUBMISSION_DEPTH}: "
                              f"use --k {SUBMISSION_DEPTH} or more")
    missing_pools = [task.name for task in benchmark.tasks if task.pool is None]
    if missing_pools:
        raise EvaluationError(f"no pool list for {', '.join(missing_pools)}: {benchmark.missing}")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    pool_ids = list(dict.fromkeys(image_id for task in benchmark.tasks for image_id in task.pool))
    queries = benchmark.queries
    check_images_exist(benchmark, [*pool_ids, *(query.reference for query in queries)], out)
    if config.gpu_decode and any(benchmark.images[image_id].box for image_id in pool_ids):
        raise EvaluationError("--gpu-decode cannot crop instance boxes (GeneCIS attribute tasks)")
    init_ray()
    info = model_info(config.model)
    seconds: dict[str, float] = {}
    refused: dict[str, str] = {}
    with stage(seconds, "embed_queries"):
        query_rows = image_rows(benchmark, [query.id for query in queries], [query.text for query in queries],
                                [query.reference for query in queries])
        query_vectors = embed_rows(query_rows, config, info["image_size"], info["dim"], refused)
    with stage(seconds, "embed_pool"):
        pool_vectors = embed_rows(image_rows(benchmark, pool_ids), config, info["image_size"], info["dim"],
                                  refused)
    _raise_refused(refused, out)
    with stage(seconds, "rank"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        rankings, subsets = rank(benchmark, query_vectors, pool_ids, pool_vectors, config.k, device)
    metrics = score(benchmark, rankings, subsets, config.cirr_targets)
    files = [path.name for path in write_predictions(benchmark, rankings, subsets, out)]
    summary = {**_summary(benchmark, metrics, config), "model": info["model_id"] or config.model,
               "pool_size": len(pool_ids), "files": files, "seconds": seconds,
               "config": asdict(config)}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
    write_report(out / "report.html", benchmark, metrics, rankings, model_id=summary["model"],
                 files=files, samples=config.report_samples)
    return summary


def _summary(benchmark: Benchmark, metrics: dict[str, float], config: EvaluateConfig) -> dict:
    summary = {"benchmark": benchmark.name, "split": benchmark.split, "queries": len(benchmark.queries),
               "metrics": metrics}
    if benchmark.name == "cirr":
        summary["cirr_targets"] = config.cirr_targets
    if benchmark.missing:
        summary["missing"] = {name: str(path) for name, path in benchmark.missing.items()}
    return summary


def score_files(config: EvaluateConfig, benchmark: Benchmark) -> dict:
    """Score existing prediction files; no model, no images."""
    rankings, subsets = rankings_from_files(benchmark, config.predictions)
    metrics = score(benchmark, rankings, subsets, config.cirr_targets)
    return {**_summary(benchmark, metrics, config), "predictions": config.predictions}


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(EvaluateConfig, argv, description=__doc__.splitlines()[0], prog="jobs.evaluate")
    if bool(config.model) == bool(config.predictions):
        raise SystemExit("error: give either --model (with --out) or --predictions")
    try:
        benchmark = load_benchmark(config.benchmark, config.data, config.split)
        summary = run_model(config, benchmark) if config.model else score_files(config, benchmark)
    except (BenchmarkDataError, PredictionError, EvaluationError) as err:
        raise SystemExit(f"error: {err}") from err
    print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
