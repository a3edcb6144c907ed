"""When an image table's vector columns get an ANN index, with which build parameters, and how its search is tuned.

`index_table` brings a table's search up to date after an indexing run. Per vector column, with `rows` the
table's rows now, `current` the column's index, `stored` its stored search parameters and `--index` the
kind asked for:

    --index      current            condition                              action
    none         any                stored not exact for `rows` rows       store exact search
    auto         none               rows < min_rows                        store exact search
    auto         none               rows >= min_rows                       build IVF_HNSW_SQ, tune
    auto         kind K             -                                      as `--index K` (an index is kept)
    K            none, or not K     -                                      build K, tune
    K            K                  rows >= 2 x the rows it was built on   rebuild K, tune
    K            K                  rows != rows stored tuned for          re-tune with the same build
    K            K                  nothing changed                        nothing

Before deciding, rows added by the run are folded into the existing indexes and small appends compacted.
Tuning measures recall@10 against exact search on vectors the index does not hold, as a user's query is
(`tuning_queries`), and stores the cheapest parameters that reach the target recall (the best found when
none does) with the column, where every reader of the table finds them.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from magiclens_core.search.store import CLIP_VECTOR, VECTOR, ImageTable, IndexKind, SearchParams

AUTO_INDEX = IndexKind.IVF_HNSW_SQ


def build_parameters(kind: IndexKind, rows: int, dim: int, **overrides: int) -> dict[str, int]:
    """Build parameters for an index of `kind` over `rows` vectors of `dim` dimensions (`overrides` win)."""
    if kind is IndexKind.IVF_PQ:
        defaults = {"num_partitions": max(1, int(np.sqrt(rows))), "num_sub_vectors": _pq_sub_vectors(dim)}
    elif kind is IndexKind.IVF_HNSW_SQ:
        defaults = {"num_partitions": max(1, rows // 250_000), "m": 20, "ef_construction": 150}
    else:
        raise ValueError(f"no index of kind {kind!r} to build; expected ivf_pq or ivf_hnsw_sq")
    return {**defaults, **overrides}


def build_index(table: ImageTable, kind: IndexKind, column: str = VECTOR, **overrides: int) -> dict[str, Any]:
    """Train an index of `kind` on the column (replacing any); returns what it was built with."""
    rows = table.count()
    build = build_parameters(kind, rows, table.schema.field(column).type.list_size, **overrides)
    table.create_index(kind, column, **build)
    return {"kind": kind.value, "rows": rows, **build}


def use_exact_search(table: ImageTable, column: str = VECTOR) -> SearchParams:
    """Store exact (flat) search as the column's search parameters, even when it has an index."""
    params = SearchParams(indexed_rows=table.count(), recall_at_10=1.0)
    table.store_search_params(column, params)
    return params


def tune(table: ImageTable, target_recall: float = 0.95, column: str = VECTOR, queries: int = 100, k: int = 10,
         build: dict[str, Any] | None = None, seed: int = 0) -> SearchParams:
    """Measure recall@k of the column's index against exact search on `tuning_queries`, and store the cheapest
    search parameters that reach `target_recall` (the best found when none does)."""
    kind = table.index_kind(column)
    if kind is None:
        raise ValueError(f"column {column!r} has no vector index to tune")
    rows = table.count()
    sample = tuning_queries(table, queries, column, seed)
    truth = table.exact_neighbors(sample, k, column)
    chosen: SearchParams | None = None
    best: SearchParams | None = None
    for group in _candidates(kind, (build or {}).get("num_partitions", 1)):
        for candidate in group:  # increasing cost: stop at the first that reaches the target
            measured = _measure(table, SearchParams(
                index_type=kind.value, target_recall=target_recall, queries=len(sample), indexed_rows=rows,
                build=build or {}, **candidate), sample, truth, k, column)
            if best is None or (measured.recall_at_10 or 0) > (best.recall_at_10 or 0):
                best = measured
            if (measured.recall_at_10 or 0) >= target_recall:
                if chosen is None or (measured.p50_ms or 0) < (chosen.p50_ms or 0):
                    chosen = measured
                break
    params = chosen or best
    assert params is not None
    table.store_search_params(column, params)
    return params


def index_table(table: ImageTable, kind: IndexKind | str = IndexKind.AUTO, added: int = 0, min_rows: int = 20_000,
                target_recall: float = 0.95, queries: int = 100, partitions: int | None = None,
                sub_vectors: int | None = None, clip_vector: bool = False) -> dict[str, Any]:
    """Bring the table's search up to date after `added` new rows (see the module's decision table) and
    return the search parameters in use; `partitions` and `sub_vectors` override the build parameters of
    an index built now."""
    kind = IndexKind(kind)
    table.refresh()  # decide on what every writer has committed
    if added:
        table.update_index()
    rows = table.count()
    summary: dict[str, Any] = {}
    for column in (VECTOR, CLIP_VECTOR) if clip_vector else (VECTOR,):
        params = table.search_params(column)
        current = table.index_kind(column)
        wanted = _wanted(kind, current, rows, min_rows)
        if wanted is None:
            if params.index_type is not None or params.indexed_rows != rows:
                params = use_exact_search(table, column)
        elif current is not wanted or rows >= 2 * params.build.get("rows", rows):
            overrides = {"num_partitions": partitions,
                         "num_sub_vectors": sub_vectors if wanted is IndexKind.IVF_PQ else None}
            build = build_index(table, wanted, column, **{name: v for name, v in overrides.items() if v})
            params = tune(table, target_recall, column, queries, build=build)
        elif params.indexed_rows != rows:
            params = tune(table, target_recall, column, queries, build=params.build)
        summary[column] = {"type": params.index_type, "nprobes": params.nprobes,
                           "refine_factor": params.refine_factor, "ef": params.ef,
                           "recall_at_10": params.recall_at_10, "p50_ms": params.p50_ms,
                           "indexed_rows": params.indexed_rows, "build": params.build}
    return summary[VECTOR] if not clip_vector else {**summary[VECTOR], "clip_vector": summary[CLIP_VECTOR]}


def _wanted(kind: IndexKind, current: IndexKind | None, rows: int, min_rows: int) -> IndexKind | None:
    """The index a column should have (None: exact search)."""
    if kind is IndexKind.NONE:
        return None
    if kind is IndexKind.AUTO:
        if current is not None:
            return current
        return AUTO_INDEX if rows >= min_rows else None
    return kind


def tuning_queries(table: ImageTable, count: int, column: str = VECTOR, seed: int = 0) -> np.ndarray:
    """`count` unit vectors like a user's query, which the index does not hold: sample rows, each turned in a
    random direction by the median angle between a sample row and its nearest other row. Rows themselves
    overstate recall, as their graph nodes already link their neighbours. Measured with IVF_HNSW_SQ on
    clustered 512-d rows, against new vectors from the same clusters: at 20k rows, tuning on rows picked
    ef 64 (new vectors: recall 0.87), on these ef 128 (0.953); at 200k, rows picked ef 64 (0.90), these
    ef 256 (0.988, where 128 would do: 6.1 ms a query instead of 5.1), an error on the safe side."""
    _, rows = table.sample(count, column, seed)
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    nearest_other = table.exact_nearest(rows, 2, column)[1][:, -1]  # [:, 0] is the row itself
    angle = float(np.median(np.arccos(np.clip(nearest_other, -1.0, 1.0))))
    away = np.random.default_rng(seed).standard_normal(rows.shape)
    away -= np.sum(away * rows, axis=1, keepdims=True) * rows  # orthogonal to each row
    away /= np.linalg.norm(away, axis=1, keepdims=True)
    return (np.cos(angle) * rows + np.sin(angle) * away).astype(np.float32)


def _measure(table: ImageTable, params: SearchParams, queries: np.ndarray, truth: np.ndarray, k: int,
             column: str) -> SearchParams:
    """Recall@k and median latency of `params` on `queries`, against their exact neighbours `truth`."""
    latencies, hits = [], 0
    for vector, expected in zip(queries, truth, strict=True):
        start = time.perf_counter()
        found = table.search(vector, k, column=column, select=["id"], params=params).column("id")
        latencies.append(time.perf_counter() - start)
        hits += len(set(found.to_pylist()) & set(expected))
    params.recall_at_10 = round(hits / (k * len(queries)), 4)
    params.p50_ms = round(1000 * float(np.median(latencies)), 3)
    return params


def _pq_sub_vectors(dim: int) -> int:
    """Sub-vectors of 4 dimensions (the finest PQ that keeps SIMD-friendly codes), at most `dim`."""
    for dims_per_code in (4, 2, 1):
        if dim % dims_per_code == 0:
            return dim // dims_per_code
    return dim


def _candidates(kind: IndexKind, partitions: int) -> list[list[dict[str, int | None]]]:
    """Search parameters to try: groups along which the cost (and recall) grows. HNSW over scalar-quantised
    vectors can top out under the target recall whatever `ef`; re-ranking the candidates on the full vectors
    (`refine_factor`) lifts that ceiling, so those groups come last."""
    if kind is IndexKind.IVF_HNSW_SQ:
        probes = sorted({p for p in (1, 2, 4, partitions) if p <= partitions})
        return [[{"nprobes": nprobes, "ef": ef, "refine_factor": refine} for ef in (16, 32, 64, 128, 256, 512)]
                for refine in (None, 2, 5) for nprobes in probes]
    probes = [p for p in (5, 10, 20, 40, 80, 160, 320) if p < partitions] + [partitions]
    return [[{"nprobes": nprobes, "refine_factor": refine} for nprobes in probes] for refine in (1, 2, 5, 10)]
