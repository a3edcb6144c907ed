"""The one evaluation path: a benchmark's images as uint8 `model_pixels`, embedded by the `Embedder`,
ranked by `ranking.rank_tasks`, scored by the benchmark's protocol (metrics in percent).

`jobs.evaluate` embeds on Ray (the indexing job's stages, which decode with `model_pixels` too) and then
calls `score_embeddings`; training validation calls `evaluate_embedder`, which embeds in this process the
same way and scores through the same function, so one model gets the same numbers from both.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from os import PathLike

import numpy as np
import torch

from magiclens_core.embedder import Embedder
from magiclens_core.evaluation.benchmarks import Benchmark, CirrTargets, ImageRef, load_benchmark, protocol
from magiclens_core.evaluation.ranking import Rankings, rank_tasks
from magiclens_core.images.decode import DEFAULT_MAX_PIXELS, ImageDecodeError
from magiclens_core.images.pixels import as_float_batch, model_pixels
from magiclens_core.model.tokenizer import Tokenizer

INSTRUCTION_TOO_LONG = "instruction_too_long"


class EvaluationError(RuntimeError):
    """Input the evaluation cannot use, said in one message (missing or unreadable images, no pool)."""


@dataclass
class Evaluation:
    """Rankings keyed by query id (top `k`), CIRR's subset rankings (else None) and the metrics in percent."""

    rankings: Rankings
    subset_rankings: Rankings | None
    metrics: dict[str, float]


def ranking_depth(benchmark: Benchmark) -> int:
    """The fewest results per query that every metric and submission file of the benchmark needs."""
    spec = protocol(benchmark.name)
    return max(*spec.recall_ks, spec.submission_depth)


def score_embeddings(benchmark: Benchmark, query_vectors: np.ndarray, pool_ids: Sequence[str],
                     pool_vectors: np.ndarray, k: int, cirr_targets: CirrTargets = "hard",
                     device: str | torch.device | None = None) -> Evaluation:
    """Rank and score: `query_vectors` in `benchmark.queries` order, `pool_vectors` in `pool_ids` order."""
    rankings, subsets = rank_tasks(benchmark.tasks, query_vectors, pool_ids, pool_vectors, k, device)
    return Evaluation(rankings, subsets, protocol(benchmark.name).score(benchmark, rankings, subsets, cirr_targets))


def refused_error(refused: dict[str, str], listing: str | None = None) -> EvaluationError:
    """The error for images that could not be embedded (path → reason), naming the first."""
    path, reason = next(iter(refused.items()))
    where = f"; all listed in {listing}" if listing else ""
    return EvaluationError(f"{len(refused)} image(s) cannot be decoded, e.g. {path} ({reason}){where}")


def _pixels(refs: Sequence[ImageRef], size: int, preprocess: str, max_pixels: int, min_size: int,
            refused: dict[str, str]) -> np.ndarray:
    """uint8 [N,S,S,3] model pixels, as the indexing stages' decode tasks make them; failures to `refused`."""
    pixels = np.zeros((len(refs), size, size, 3), dtype=np.uint8)
    for row, ref in enumerate(refs):
        try:
            data = ref.read_bytes()
        except (OSError, ValueError):
            refused[str(ref.path)] = "unreadable"
            continue
        try:
            pixels[row] = model_pixels(data, size, preprocess, max_pixels, min_size, ref.box)[0]
        except ImageDecodeError as err:
            refused[str(ref.path)] = err.reason
    return pixels


def _slices(count: int, size: int) -> Iterator[slice]:
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


def embed_benchmark(embedder: Embedder, benchmark: Benchmark, pool_ids: Sequence[str],
                    max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 1,
                    truncate_instructions: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Query vectors (`benchmark.queries` order) and pool vectors (`pool_ids` order), embedded here, a batch
    at a time. An image that cannot be decoded, or an instruction over the text tower's limit unless
    `truncate_instructions`, is an `EvaluationError` naming it, as in `jobs.evaluate`."""
    size, preprocess = embedder.model.image_size, embedder.preprocess
    queries = benchmark.queries
    refused: dict[str, str] = {}
    if not truncate_instructions:
        tokenizer = Tokenizer()
        refused |= {str(benchmark.images[q.reference].path): INSTRUCTION_TOO_LONG for q in queries
                    if tokenizer.token_count(q.text) > tokenizer.context_length}
    query_vectors = np.zeros((len(queries), embedder.dim), dtype=np.float32)
    pool_vectors = np.zeros((len(pool_ids), embedder.dim), dtype=np.float32)
    for part in _slices(len(queries), embedder.batch_size):
        batch = queries[part]
        pixels = _pixels([benchmark.images[q.reference] for q in batch], size, preprocess, max_pixels, min_size,
                         refused)
        if not refused:
            query_vectors[part] = embedder.embed_queries(as_float_batch(pixels), [q.text for q in batch],
                                                         truncate=truncate_instructions)
    for part in _slices(len(pool_ids), embedder.batch_size):
        pixels = _pixels([benchmark.images[i] for i in pool_ids[part]], size, preprocess, max_pixels, min_size,
                         refused)
        if not refused:
            pool_vectors[part] = embedder.embed_targets(as_float_batch(pixels))
    if refused:
        raise refused_error(refused)
    return query_vectors, pool_vectors


def evaluate_embedder(embedder: Embedder, benchmark: Benchmark, k: int | None = None,
                      cirr_targets: CirrTargets = "hard", max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 1,
                      truncate_instructions: bool = False) -> Evaluation:
    """Embed a benchmark in this process and score it, exactly as `jobs.evaluate` does on Ray; `k`
    (default `ranking_depth`) results are kept per query."""
    pool_ids = benchmark.pool_ids()
    query_vectors, pool_vectors = embed_benchmark(embedder, benchmark, pool_ids, max_pixels, min_size,
                                                  truncate_instructions)
    return score_embeddings(benchmark, query_vectors, pool_ids, pool_vectors, k or ranking_depth(benchmark),
                            cirr_targets, embedder.device)


def retrieval_set_recall(embedder: Embedder, path: str | PathLike,
                         truncate_instructions: bool = True) -> dict[str, float]:
    """Recall@1/5/10 in percent, keyed `recall@k`, of a retrieval set (a folder or held-out triplets) scored
    as the `synthetic` benchmark, so `jobs.evaluate --benchmark synthetic` reports the same numbers. This
    is training validation; it truncates over-long instructions unless told not to."""
    benchmark = load_benchmark("synthetic", path)
    metrics = evaluate_embedder(embedder, benchmark, truncate_instructions=truncate_instructions).metrics
    (task,) = benchmark.tasks
    return {f"recall@{k}": metrics[f"{task.name}/R@{k}"] for k in protocol(benchmark.name).recall_ks}
