"""Exact cosine ranking of queries against a pool of embeddings, in bounded memory; the ranking every
evaluation uses (`jobs.evaluate`, training validation).

Ties are broken one way everywhere: equal scores rank in pool order (candidates: in their listed order),
so a ranking depends on the vectors alone, never on the sort's internals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from magiclens_core.evaluation.benchmarks.base import Task

DEFAULT_MAX_SCORES = 1 << 24  # query × pool scores held at once (64 MiB of float32)
Rankings = dict[str, list[str]]


def _unit_rows(vectors: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(vectors, dtype=np.float32) if isinstance(vectors, np.ndarray) else vectors)
    return torch.nn.functional.normalize(tensor.float(), dim=1)


def _top(similarity: torch.Tensor, take: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `take` best scores of each row and their columns, best first, ties in column order."""
    values, columns = similarity.topk(take, dim=1)
    columns, order = columns.sort(dim=1)  # column order first, then a stable sort by score keeps it for ties
    values, order = values.gather(1, order).sort(dim=1, descending=True, stable=True)
    columns = columns.gather(1, order)
    # where the cut falls inside a run of equal scores, topk may have kept any of them: take the first columns
    split = ((similarity >= values[:, -1:]).sum(dim=1) > take).nonzero().flatten().tolist()
    for row in split:
        row_values, row_columns = similarity[row].sort(descending=True, stable=True)
        values[row], columns[row] = row_values[:take], row_columns[:take]
    return values, columns


def rank_pool(query_vectors: np.ndarray | torch.Tensor, pool_vectors: np.ndarray | torch.Tensor,
              pool_ids: Sequence[str], k: int, exclude: Sequence[str | None] | None = None,
              max_scores: int = DEFAULT_MAX_SCORES, device: str | torch.device | None = None) -> list[list[str]]:
    """The top `k` pool ids of each query by cosine similarity, best first (ties in pool order).

    `exclude[i]` (an id or None) is left out of query i's ranking. Queries are scored in chunks so that at
    most `max_scores` similarities exist at once, whatever the pool size; `device` is where (default: CPU).
    Fewer than `k` ids come back only when the pool is smaller.
    """
    if len(pool_ids) != len(pool_vectors):
        raise ValueError(f"{len(pool_ids)} pool ids for {len(pool_vectors)} pool vectors")
    queries, pool = _unit_rows(query_vectors).to(device), _unit_rows(pool_vectors).to(device)
    if exclude is not None and len(exclude) != len(queries):
        raise ValueError(f"{len(exclude)} exclusions for {len(queries)} queries")
    row_of = {image_id: row for row, image_id in enumerate(pool_ids)} if exclude is not None else {}
    take = min(k + (exclude is not None), len(pool_ids))
    chunk = max(1, max_scores // max(1, len(pool_ids)))
    rankings: list[list[str]] = []
    for start in range(0, len(queries), chunk):
        similarity = queries[start:start + chunk] @ pool.T
        if exclude is not None:
            for offset, image_id in enumerate(exclude[start:start + chunk]):
                if image_id in row_of:
                    similarity[offset, row_of[image_id]] = float("-inf")
        values, rows = _top(similarity, take)
        for value_row, index_row in zip(values.tolist(), rows.tolist(), strict=True):
            kept = [pool_ids[i] for v, i in zip(value_row, index_row, strict=True) if v != float("-inf")]
            rankings.append(kept[:k])
    return rankings


def rank_candidates(query_vectors: np.ndarray | torch.Tensor, pool_vectors: np.ndarray | torch.Tensor,
                    pool_ids: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[list[str]]:
    """Each query's own candidates (ids of the pool) by cosine similarity, best first; ties keep their order."""
    if len(candidates) != len(query_vectors):
        raise ValueError(f"{len(candidates)} candidate lists for {len(query_vectors)} queries")
    queries, pool = _unit_rows(query_vectors), _unit_rows(pool_vectors)
    row_of = {image_id: row for row, image_id in enumerate(pool_ids)}
    rankings = []
    for query, ids in zip(queries, candidates, strict=True):
        similarity = pool[[row_of[image_id] for image_id in ids]] @ query
        order = torch.sort(similarity, descending=True, stable=True).indices.tolist()
        rankings.append([ids[i] for i in order])
    return rankings


def rank_tasks(tasks: Sequence[Task], query_vectors: np.ndarray, pool_ids: Sequence[str], pool_vectors: np.ndarray,
               k: int, device: str | torch.device | None = None) -> tuple[Rankings, Rankings | None]:
    """Each task's queries (their vectors in task order, as `Benchmark.queries`) against the task's pool,
    top `k`, each query's `exclude` left out; a `candidates_only` task ranks each query's own candidates
    (GeneCIS). Where every query of a pool task has candidates (CIRR's subset), those are ranked too:
    the second result (None when no task has them)."""
    row_of = {image_id: row for row, image_id in enumerate(pool_ids)}
    rankings: Rankings = {}
    subsets: Rankings = {}
    start = 0
    for task in tasks:
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
    if start != len(query_vectors):
        raise ValueError(f"{len(query_vectors)} query vectors for {start} queries")
    return rankings, subsets or None
