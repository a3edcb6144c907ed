"""Evaluate a MagicLens model on a paper benchmark, or score an existing predictions file.

    python -m jobs.evaluate --benchmark circo --data ROOT --model MODEL --out DIR [--split val|test]
        [--preprocess model|official_eval] [--k 50]
    python -m jobs.evaluate --benchmark circo --data ROOT --predictions P.json [--split val]

With a model it embeds the queries and the pool with the shared `Embedder`, ranks the pool by exact
cosine similarity, and writes `metrics.json`, the benchmark's submission files and `report.html` to
`--out`. With `--predictions` (one file or several, e.g. CIRR's recall and recall_subset files) it only
scores them. Either way the last output line is the JSON summary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from jobs.common import parse_config, print_summary
from magiclens_core import Embedder, ImageDecodeError
from magiclens_core.benchmarks import Benchmark, BenchmarkDataError, load_benchmark, open_image
from magiclens_core.benchmarks.predictions import SUBMISSION_DEPTH, rankings_from_files, write_predictions
from magiclens_core.metrics import PredictionError, score
from magiclens_core.ranking import rank_candidates, rank_pool
from magiclens_core.report import write_report

Rankings = dict[str, list[str]]


@dataclass
class EvaluateConfig:
    benchmark: Literal["circo", "cirr", "fashioniq", "dtin", "genecis"] = field(
        metadata={"help": "which benchmark"})
    data: str = field(metadata={"help": "the benchmark's folder, laid out as its official release"})
    split: Literal["val", "test"] = field(default="val", metadata={"help": "test: CIRCO, CIRR submission files"})
    model: str | None = field(default=None, metadata={"help": "model folder or official .pkl"})
    out: str | None = field(default=None, metadata={"help": "output folder (with --model)"})
    predictions: list[str] = field(default_factory=list, metadata={"help": "score these files, no model"})
    preprocess: Literal["model", "official_eval"] = field(default="model", metadata={"help": "image preprocessing"})
    k: int = field(default=50, metadata={"help": "results kept per query"})
    batch_size: int = field(default=32, metadata={"help": "images per embedding batch"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if present)"})
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(default="auto", metadata={"help": "precision"})
    cirr_targets: Literal["hard", "soft"] = field(default="hard", metadata={"help": "CIRR target_hard or soft"})
    report_samples: int = field(default=12, metadata={"help": "sample queries shown in report.html"})
    decode_threads: int = field(default=4, metadata={"help": "threads decoding images"})


class EvaluationError(RuntimeError):
    """Input the evaluation cannot use, said in one message (missing or unreadable images, no pool)."""


def check_images_exist(benchmark: Benchmark, ids: Sequence[str], out: Path) -> None:
    """Fail before any work when an image file is missing: the count, the first paths, the full list in `out`."""
    missing = sorted({str(benchmark.images[image_id].path) for image_id in ids
                      if not benchmark.images[image_id].path.is_file()})
    if missing:
        listing = out / "missing_images.txt"
        listing.write_text("\n".join(missing) + "\n")
        raise EvaluationError(f"{len(missing)} image file(s) missing, e.g. {missing[0]}; all listed in {listing}")


def decoded_batches(benchmark: Benchmark, ids: Sequence[str], batch_size: int, threads: int,
                    unreadable: dict[str, str]) -> Iterator[tuple[slice, list[Image.Image]]]:
    """Decoded images batch by batch; a batch with an undecodable image is recorded in `unreadable` and skipped."""

    def decode(image_id: str) -> Image.Image | None:
        try:
            return open_image(benchmark.images[image_id])
        except ImageDecodeError as err:
            unreadable[str(benchmark.images[image_id].path)] = err.reason
            return None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, len(ids), batch_size):
            part = slice(start, min(start + batch_size, len(ids)))
            images = list(pool.map(decode, ids[part]))
            if all(image is not None for image in images):
                yield part, images


def _raise_unreadable(unreadable: dict[str, str], out: Path) -> None:
    if unreadable:
        listing = out / "unreadable_images.json"
        listing.write_text(json.dumps(unreadable, indent=1))
        first = next(iter(unreadable.items()))
        raise EvaluationError(f"{len(unreadable)} image(s) cannot be decoded, e.g. {first[0]} ({first[1]}); "
                              f"all listed in {listing}")


def embed_pool(embedder: Embedder, benchmark: Benchmark, ids: Sequence[str], config: EvaluateConfig,
               out: Path) -> np.ndarray:
    """Target embeddings [N, D] of the pool images, in `ids` order."""
    vectors = np.zeros((len(ids), embedder.dim), dtype=np.float32)
    unreadable: dict[str, str] = {}
    for part, images in decoded_batches(benchmark, ids, config.batch_size, config.decode_threads, unreadable):
        vectors[part] = embedder.embed_targets(images)
    _raise_unreadable(unreadable, out)
    return vectors


def embed_queries(embedder: Embedder, benchmark: Benchmark, config: EvaluateConfig, out: Path) -> np.ndarray:
    """Query embeddings [Q, D] of (reference image, instruction), in `benchmark.queries` order."""
    queries = benchmark.queries
    vectors = np.zeros((len(queries), embedder.dim), dtype=np.float32)
    unreadable: dict[str, str] = {}
    references = [query.reference for query in queries]
    for part, images in decoded_batches(benchmark, references, config.batch_size, config.decode_threads,
                                        unreadable):
        vectors[part] = embedder.embed_queries(images, [query.text for query in queries[part]])
    _raise_unreadable(unreadable, out)
    return vectors


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
    check_images_exist(benchmark, [*pool_ids, *(query.reference for query in benchmark.queries)], out)
    embedder = Embedder.load(config.model, device=config.device, precision=config.precision,
                             batch_size=config.batch_size, preprocess=config.preprocess)
    seconds: dict[str, float] = {}
    with stage(seconds, "embed_queries"):  # first: an instruction the tokenizer refuses fails early
        query_vectors = embed_queries(embedder, benchmark, config, out)
    with stage(seconds, "embed_pool"):
        pool_vectors = embed_pool(embedder, benchmark, pool_ids, config, out)
    with stage(seconds, "rank"):
        rankings, subsets = rank(benchmark, query_vectors, pool_ids, pool_vectors, config.k, embedder.device)
    metrics = score(benchmark, rankings, subsets, config.cirr_targets)
    files = [path.name for path in write_predictions(benchmark, rankings, subsets, out)]
    summary = {**_summary(benchmark, metrics, config), "model": embedder.model_id or config.model,
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
