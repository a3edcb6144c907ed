"""Search at scale: a LanceDB image table of N clustered unit vectors, exact search vs tuned ANN indexes.

    python tests/perf/search_at_scale.py [--rows 1000000] [--dim 512] [--kinds ivf_hnsw_sq ivf_pq]

Writes the table through `magiclens_core.search.store` (as the indexing job does), then for each index kind:
build time, the tuning `index_policy.tune` stores (recall@10 measured on sample rows of the table), and, with
those stored parameters, recall@10 and p50/p99 latency on held-out queries drawn from the same distribution
(ground truth by an exact streaming scan). Exact LanceDB search latency is measured on a few queries for
comparison. Vectors: 1000 cluster centres plus noise with a decaying spectrum (as embeddings have), L2
normalised. Prints one JSON object. Goal: recall@10 >= 0.95 at p50 <= 20 ms for 1M x 512 on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np

from magiclens_core.search.index_policy import build_index, tune
from magiclens_core.search.store import ImageTable, IndexKind, image_schema

CHUNK = 100_000


class ClusteredVectors:
    """Deterministic clustered unit vectors: centre + rotated noise whose variance decays over dimensions."""

    def __init__(self, dim: int, clusters: int = 1000, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.seed = seed
        centres = rng.standard_normal((clusters, dim)).astype(np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        self.rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
        spectrum = (np.arange(dim) + 1.0) ** -0.75
        self.spectrum = (spectrum / np.linalg.norm(spectrum)).astype(np.float32)

    def chunk(self, count: int, stream: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream])
        noise = (rng.standard_normal((count, len(self.spectrum))).astype(np.float32) * self.spectrum) @ self.rotation
        vectors = self.centres[rng.integers(0, len(self.centres), count)] + noise
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _latencies(table: ImageTable, queries: np.ndarray, **search) -> tuple[list[float], list[np.ndarray]]:
    seconds, found = [], []
    for vector in queries:
        start = time.perf_counter()
        result = table.search(vector, 10, select=["id"], **search)
        seconds.append(time.perf_counter() - start)
        found.append(np.asarray(result.column("id").to_pylist()))
    return seconds, found


def _recall(found: list[np.ndarray], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def _ms(seconds: list[float], quantile: float) -> float:
    return round(1000 * float(np.quantile(seconds, quantile)), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--kinds", nargs="+", default=["ivf_hnsw_sq", "ivf_pq"],
                        choices=[IndexKind.IVF_HNSW_SQ.value, IndexKind.IVF_PQ.value])
    parser.add_argument("--queries", type=int, default=200, help="held-out queries for the final figures")
    parser.add_argument("--exact-queries", type=int, default=5, help="queries timed with exact LanceDB search")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--db", default=None, help="LanceDB folder (default: a temporary one)")
    args = parser.parse_args()

    db = args.db or tempfile.mkdtemp(prefix="search_at_scale_")
    data = ClusteredVectors(args.dim)
    table = ImageTable.create(db, "pool", image_schema(args.dim))
    start = time.perf_counter()
    for stream, first in enumerate(range(table.count(), args.rows, CHUNK)):
        count = min(CHUNK, args.rows - first)
        table.add({"id": [f"r{i}" for i in range(first, first + count)], "vector": data.chunk(count, stream)})
    write_seconds = time.perf_counter() - start
    table.update_index()  # compact the appends, as the job does before indexing

    queries = data.chunk(args.queries, stream=10**6)
    start = time.perf_counter()
    truth = table.exact_neighbors(queries, 10)
    truth_seconds = time.perf_counter() - start
    exact_seconds, exact_found = _latencies(table, queries[: args.exact_queries], exact=True)

    results = []
    for kind in args.kinds:
        start = time.perf_counter()
        build = build_index(table, IndexKind(kind))
        build_seconds = time.perf_counter() - start
        start = time.perf_counter()
        tuned = tune(table, args.target_recall, build=build)
        tune_seconds = time.perf_counter() - start
        seconds, found = _latencies(table, queries)
        results.append({
            "kind": kind, "build": build, "build_s": round(build_seconds, 1), "tune_s": round(tune_seconds, 1),
            "tuned": {"nprobes": tuned.nprobes, "refine_factor": tuned.refine_factor, "ef": tuned.ef,
                      "recall_at_10_on_table_sample": tuned.recall_at_10},
            "recall_at_10": round(_recall(found, truth), 4),
            "p50_ms": _ms(seconds, 0.5), "p99_ms": _ms(seconds, 0.99),
            "goal_met": _recall(found, truth) >= args.target_recall and _ms(seconds, 0.5) <= 20,
        })
    print(json.dumps({
        "benchmark": "search_at_scale", "rows": table.count(), "dim": args.dim, "queries": args.queries,
        "write_s": round(write_seconds, 1), "exact_numpy_scan_s_all_queries": round(truth_seconds, 2),
        "exact_lancedb_p50_ms": round(1000 * statistics.median(exact_seconds), 1),
        "exact_lancedb_recall_at_10": round(_recall(exact_found, truth[: args.exact_queries]), 4),
        "target_recall": args.target_recall, "indexes": results,
    }))


if __name__ == "__main__":
    main()
