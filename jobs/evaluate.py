"""Evaluate a MagicLens model on a paper benchmark, or score an existing predictions file.

    python -m jobs.evaluate --benchmark circo --data ROOT --model MODEL --out DIR [--split val|test]
        [--preprocess model|official_eval] [--k 50] [--workers N --gpus-per-worker G]
    python -m jobs.evaluate --benchmark circo --data ROOT --predictions P.json [--split val]

With a model it embeds the queries and the pool in one pass of the indexing job's Ray Data stages
(`jobs.stages.embed`: decoding in CPU tasks, the shared `Embedder` in one actor pool), ranks the pool by
exact cosine similarity and scores the rankings with the benchmark's protocol, through the same
`score_embeddings` that training validation uses; it writes `metrics.json`, the benchmark's submission
files and `report.html` to `--out`. With `--predictions` (one file or several, e.g. CIRR's recall and
recall_subset files) it only scores them, without Ray. Either way the last output line is the JSON summary.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

import magiclens_core  # its describe_model is imported on first use: worker processes here need no model
from jobs.common import InputError, require_model, require_paths, run_job
from jobs.stages.embed import (
    EMBEDDING,
    ID,
    NEW,
    REASON,
    STATUS,
    EmbedOptions,
    check_instructions,
    embed_images,
    embedding_demand,
    read_images,
)
from jobs.stages.sources import table_dataset
from magiclens_core.evaluation.benchmarks import NAMES, Benchmark, BenchmarkDataError, Query, protocol
from magiclens_core.evaluation.evaluator import EvaluationError, ranking_depth, refused_error, score_embeddings
from magiclens_core.evaluation.metrics import PredictionError
from magiclens_core.evaluation.report import write_report
from magiclens_core.images.sources import UriPolicy

BenchmarkName = Literal[NAMES]  # the registry's names, so the flag's choices follow it


@dataclass(kw_only=True)
class EvaluateConfig(EmbedOptions):
    """Options of `python -m jobs.evaluate`; the embedding options are the indexing job's."""

    benchmark: BenchmarkName = field(metadata={"help": "which benchmark"})
    data: str = field(metadata={"help": "the benchmark's folder, laid out as its official release"})
    split: Literal["val", "test"] = field(default="val", metadata={"help": "test: CIRCO, CIRR submission files"})
    model: str | None = field(default=None, metadata={"help": "model folder or official .pkl"})
    out: str | None = field(default=None, metadata={"help": "output folder (with --model)"})
    predictions: list[str] = field(default_factory=list, metadata={"help": "score these files, no model"})
    k: int = field(default=50, metadata={"help": "results kept per query"})
    cirr_targets: Literal["hard", "soft"] = field(default="hard", metadata={"help": "CIRR target_hard or soft"})
    report_samples: int = field(default=12, metadata={"help": "sample queries shown in report.html"})


def check_images_exist(benchmark: Benchmark, ids: Sequence[str], out: Path) -> None:
    """Fail before any work when an image file is missing: the count, the first paths, the full list in `out`."""
    missing = sorted({str(benchmark.images[image_id].path) for image_id in ids
                      if not benchmark.images[image_id].exists})
    if missing:
        listing = out / "missing_images.txt"
        listing.write_text("\n".join(missing) + "\n")
        raise EvaluationError(f"{len(missing)} image file(s) missing, e.g. {missing[0]}; all listed in {listing}")


def image_rows(benchmark: Benchmark, queries: Sequence[Query], pool_ids: Sequence[str]) -> pa.Table:
    """The rows the embedding stages take, queries first and then the pool: `id` (the row's position),
    the image as `uri` (or `image` bytes) with its crop `box`, and the `instruction` (null for a pool
    image, which the embedding stage then embeds as a target)."""
    refs = [*(benchmark.images[query.reference] for query in queries), *(benchmark.images[i] for i in pool_ids)]
    columns = {"id": pa.array([str(row) for row in range(len(refs))], pa.string()),
               "uri": pa.array([str(ref.path) for ref in refs], pa.string()),
               "instruction": pa.array([query.text for query in queries] + [None] * len(pool_ids), pa.string())}
    if any(ref.data is not None for ref in refs):
        columns["image"] = pa.array([ref.data for ref in refs], pa.binary())
    if any(ref.box is not None for ref in refs):
        columns["box"] = pa.array([None if ref.box is None else list(ref.box) for ref in refs],
                                  pa.list_(pa.float64()))
    return pa.table(columns)


def embed_rows(rows: pa.Table, config: EvaluateConfig, image_size: int, dim: int,
               refused: dict[str, str]) -> np.ndarray:
    """Embeddings [N, D] of `image_rows`, in row order, from one run of the shared Ray Data stages (decode
    in CPU tasks, one pool of `Embedder` actors). A row that cannot be embedded is recorded in `refused`
    (uri → reason)."""
    # the benchmark's own image files, links resolved: the folders holding them are all the stages may read
    policy = UriPolicy.allowing({os.path.dirname(os.path.realpath(uri)) for uri in rows.column("uri").to_pylist()})
    dataset = read_images(table_dataset(rows), id_column="id", policy=policy)
    if not config.truncate_instructions:
        dataset = check_instructions(dataset, "instruction")
    dataset = embed_images(dataset, config, image_size, role="query", instruction_column="instruction",
                           box_column="box" if "box" in rows.column_names else None)
    vectors = np.zeros((rows.num_rows, dim), dtype=np.float32)
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        rows_of = [int(row) for row in batch.column(ID).to_pylist()]
        embedded = batch.column(EMBEDDING).combine_chunks().flatten().to_numpy().reshape(-1, dim)
        for index, (row, outcome) in enumerate(zip(rows_of, batch.column(STATUS).to_pylist(), strict=True)):
            if outcome == NEW:
                vectors[row] = embedded[index]
            else:
                refused[batch.column("uri")[index].as_py()] = batch.column(REASON)[index].as_py()
    return vectors


@contextmanager
def stage(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall time of the block under `name`."""
    start = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - start, 3)


def _summary(benchmark: Benchmark, metrics: dict[str, float], config: EvaluateConfig) -> dict:
    summary = {"benchmark": benchmark.name, "split": benchmark.split, "queries": len(benchmark.queries),
               "metrics": metrics, **protocol(benchmark.name).score_settings(config.cirr_targets)}
    if benchmark.missing:
        summary["missing"] = {name: str(path) for name, path in benchmark.missing.items()}
    return summary


def run_model(config: EvaluateConfig, benchmark: Benchmark) -> dict:
    """Embed (on Ray), rank, score and write the output folder; returns the summary."""
    if config.out is None:
        raise EvaluationError("--model needs --out, the folder for metrics.json, submissions and report.html")
    depth = ranking_depth(benchmark)
    if config.k < depth:
        raise EvaluationError(f"{benchmark.name}'s metrics and submission files need the top {depth}: "
                              f"use --k {depth} or more")
    pool_ids = benchmark.pool_ids()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    queries = benchmark.queries
    check_images_exist(benchmark, [*pool_ids, *(query.reference for query in queries)], out)
    if config.gpu_decode and any(ref.box for ref in benchmark.images.values()):
        raise EvaluationError("--gpu-decode cannot crop instance boxes (GeneCIS attribute tasks)")
    info = magiclens_core.describe_model(config.model)
    seconds: dict[str, float] = {}
    refused: dict[str, str] = {}
    with stage(seconds, "embed"):
        vectors = embed_rows(image_rows(benchmark, queries, pool_ids), config, info.image_size, info.dim, refused)
    if refused:
        listing = out / "unreadable_images.json"
        listing.write_text(json.dumps(refused, indent=1))
        raise refused_error(refused, str(listing))
    with stage(seconds, "rank"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        evaluation = score_embeddings(benchmark, vectors[:len(queries)], pool_ids, vectors[len(queries):],
                                      config.k, config.cirr_targets, device)
    spec = protocol(benchmark.name)
    files = [path.name for path in spec.write_predictions(benchmark, evaluation.rankings,
                                                          evaluation.subset_rankings, out)]
    summary = {**_summary(benchmark, evaluation.metrics, config), "model": info.model_id,
               "pool_size": len(pool_ids), "files": files, "seconds": seconds, "config": asdict(config)}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
    write_report(out / "report.html", benchmark, evaluation.metrics, evaluation.rankings, paper=spec.paper,
                 model_id=summary["model"], files=files, samples=config.report_samples)
    return summary


def score_files(config: EvaluateConfig, benchmark: Benchmark) -> dict:
    """Score existing prediction files; no model, no images, no Ray."""
    spec = protocol(benchmark.name)
    rankings, subsets = spec.rankings_from_files(benchmark, config.predictions)
    metrics = spec.score(benchmark, rankings, subsets, config.cirr_targets)
    return {**_summary(benchmark, metrics, config), "predictions": config.predictions}


def run(config: EvaluateConfig) -> dict:
    """Evaluate `config.model` (Ray connected) or score `config.predictions`; returns the summary."""
    if bool(config.model) == bool(config.predictions):
        raise EvaluationError("give either --model (with --out) or --predictions")
    benchmark = protocol(config.benchmark).load(config.data, config.split)
    return run_model(config, benchmark) if config.model else score_files(config, benchmark)


def _run_from_command_line(config: EvaluateConfig) -> dict:
    try:
        return run(config)
    except (BenchmarkDataError, PredictionError, EvaluationError) as err:
        raise InputError(str(err)) from err


def check_inputs(config: EvaluateConfig) -> None:
    """The benchmark's folder, the model or the predictions exist (before Ray starts)."""
    if bool(config.model) == bool(config.predictions):
        raise InputError("give either --model (with --out) or --predictions")
    require_paths(config, "data", "predictions")
    if config.model:
        require_model(config.model)


def main(argv: list[str] | None = None) -> dict:
    return run_job(EvaluateConfig, _run_from_command_line, argv, __doc__.splitlines()[0], "python -m jobs.evaluate",
                   demand=embedding_demand, needs_ray=lambda config: bool(config.model) and not config.predictions,
                   check_inputs=check_inputs)


if __name__ == "__main__":
    main()
