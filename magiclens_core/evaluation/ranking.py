"""Exact cosine ranking of queries against a pool of embeddings, in bounded memory."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

DEFAULT_MAX_SCORES = 1 << 24  # query × pool scores held at once (64 MiB of float32)


def _unit_rows(vectors: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(vectors, dtype=np.float32) if isinstance(vectors, np.ndarray) else vectors)
    return torch.nn.functional.normalize(tensor.float(), dim=1)


def rank_pool(query_vectors: np.ndarray | torch.Tensor, pool_vectors: np.ndarray | torch.Tensor,
              pool_ids: Sequence[str], k: int, exclude: Sequence[str | None] | None = None,
              max_scores: int = DEFAULT_MAX_SCORES, device: str | torch.device | None = None) -> list[list[str]]:
    """The top `k` pool ids of each query by cosine similarity, best first.

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
        values, rows = similarity.topk(take, dim=1)
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
