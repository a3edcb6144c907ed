"""Search at scale: the image table's search side by side with raw LanceDB, pylance, in-memory HNSW graphs and
exact search, on N clustered unit vectors, with and without a metadata filter that keeps ~10% of rows.

    OPENBLAS_NUM_THREADS=1 python tests/perf/search_at_scale.py [--rows 200000] [--dim 512] [--db /tmp/search_200k]
        [--graphs faiss hnswlib usearch] [--lancedb-ef 128]

(one BLAS thread: numpy's exact search otherwise leaves threads spinning that slow the next path timed).

Writes the table through `magiclens_core.search.store` (as the indexing job does: a `shard` column, row % 10,
is carried as metadata), builds and tunes its IVF_HNSW_SQ index with `index_policy` (kept when `--db` already
holds a table of N rows with tuned parameters), then times single queries of held-out vectors from the same
distribution, the paths taking turns, each on a different query in a turn (interleaved: no path finds the CPU
caches warmed by another's walk of the same query), the paths through Lance in a group of their own (see
`LANCE_PATHS`), without and with `shard = 3`:

- `ours`: `ImageTable.search` with the stored parameters; `ours_memory`: the same table opened with
  `memory_index="faiss"` (build seconds: building its graph from the table);
- `lancedb`: a raw `lancedb` query with the stored parameters; `pylance`: `dataset.to_table(nearest=...)`;
- `faiss_hnsw` (`IndexHNSWFlat`, M 32, efSearch the smallest reaching the target recall on these queries, one
  thread; the filter as an `IDSelectorBitmap`), `faiss_hnsw_same_ef` (the same graph walked with the ef
  `ours_memory` uses), `faiss_our_graph` (the bare faiss walk of `ours_memory`'s own graph at its ef: the same
  results, so the ratio to it is what our path adds), and `hnswlib` / `usearch` when installed and asked for;
- `exact`: numpy brute force over the vectors held in memory (the ground truth; timed after the others, as its
  scan of every row empties the CPU caches).

Prints one JSON object: per path recall@10, p50/p99 ms and build seconds, and the ratios of `ours_memory` to
`faiss_hnsw` and to `faiss_hnsw_same_ef`. Goal: p50 <= 2x and p99 <= 3x faiss at the same recall (>= 0.95);
filtered, recall >= 0.95 and p50 <= 3x.
Vectors: 1000 cluster centres plus noise with a decaying spectrum (as embeddings have), L2 normalised.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import lance
import lancedb
import numpy as np
import pyarrow as pa

from magiclens_core.search.filters import column_kinds, parse_filter
from magiclens_core.search.index_policy import build_index, tune
from magiclens_core.search.memory_index import MemoryIndex
from magiclens_core.search.store import DISTANCE, VECTOR, ImageTable, IndexKind, SearchParams, image_schema

CHUNK = 100_000
FILTER = "shard = 3"
# paths through Lance, timed in a group of their own: Lance's worker threads are still busy as a query
# returns, and slowed whichever in-memory path came next (200k rows: ours_memory 1.19 ms p50 right after
# pylance, 0.60 ms without the Lance paths in the run; faiss 0.49 and 0.34)
LANCE_PATHS = ("ours", "lancedb", "pylance")
WARMUP_QUERIES = 50
SHARDS = 10
EF_STEPS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)

Query = Callable[[np.ndarray, np.ndarray | None], list[str]]  # (vector, filter mask or None) -> ids, best first


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


def prepare(db: str, rows: int, dim: int, target_recall: float, lancedb_index: bool = True) -> tuple[ImageTable, dict]:
    """The table of `rows` rows with a tuned IVF_HNSW_SQ index (when `lancedb_index`), written and built unless
    `db` holds it."""
    data = ClusteredVectors(dim)
    table = ImageTable.create(db, "pool", image_schema(dim, metadata=pa.schema([pa.field("shard", pa.int32())])))
    timings: dict = {}
    start = time.perf_counter()
    for stream, first in enumerate(range(table.count(), rows, CHUNK)):
        count = min(CHUNK, rows - first)
        table.add({"id": [f"r{i}" for i in range(first, first + count)], "vector": data.chunk(count, stream),
                   "shard": pa.array(np.arange(first, first + count) % SHARDS, pa.int32())})
        timings["write_s"] = round(time.perf_counter() - start, 1)
    if table.count() != rows:
        raise SystemExit(f"{db} holds {table.count()} rows, not {rows}: use another --db")
    stored = table.search_params()
    if lancedb_index and (stored.index_type is None or stored.indexed_rows != rows):
        table.update_index()  # compact the appends, as the job does before indexing
        start = time.perf_counter()
        build = build_index(table, IndexKind.IVF_HNSW_SQ)
        timings["lancedb_build_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        tune(table, target_recall, build=build)
        timings["lancedb_tune_s"] = round(time.perf_counter() - start, 1)
    return ImageTable.open(db, "pool"), timings


def ours_ef(graph: MemoryIndex, mask: np.ndarray | None, k: int = 10) -> int | None:
    """The ef the memory index walks its graph with for this filter (`MemoryIndex.breadth`), None when it scans
    instead."""
    ef = graph.breadth(None if mask is None else int(mask.sum()))
    return None if ef is None else max(ef, k)


def exact_top(matrix: np.ndarray, vector: np.ndarray, mask: np.ndarray | None, k: int = 10) -> np.ndarray:
    """Row numbers of the k rows of `matrix` (unit rows) nearest to `vector`, among those `mask` keeps."""
    if mask is not None:
        rows = np.flatnonzero(mask)
        return rows[exact_top(matrix[rows], vector, None, k)]
    scores = matrix @ vector
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top])]


def lancedb_paths(table: ImageTable, params: SearchParams, where: str) -> dict[str, Query]:
    """Raw LanceDB and pylance queries with the stored parameters (the filter applied before the search)."""
    raw = lancedb.connect(str(table.uri).rsplit("/", 1)[0]).open_table("pool")
    dataset = lance.dataset(table.uri)

    def lancedb_query(vector: np.ndarray, mask: np.ndarray | None) -> list[str]:
        query = raw.search(vector, vector_column_name=VECTOR).distance_type(DISTANCE).limit(10)
        query = query.nprobes(params.nprobes).ef(params.ef)
        if params.refine_factor:
            query = query.refine_factor(params.refine_factor)
        if mask is not None:
            query = query.where(where, prefilter=True)
        return query.select(["id", "_distance"]).to_arrow().column("id").to_pylist()

    def pylance_query(vector: np.ndarray, mask: np.ndarray | None) -> list[str]:
        nearest = {"column": VECTOR, "q": vector, "k": 10, "metric": DISTANCE, "nprobes": params.nprobes,
                   "ef": params.ef, "refine_factor": params.refine_factor}
        found = dataset.to_table(nearest=nearest, columns=["id", "_distance"],
                                 filter=where if mask is not None else None, prefilter=True)
        return found.column("id").to_pylist()

    return {"lancedb": lancedb_query, "pylance": pylance_query}


def graph(library: str, matrix: np.ndarray, ids: np.ndarray) -> tuple[Callable[[int], Query], float]:
    """An in-memory HNSW graph (M 32) of `library` over `matrix`: a query maker by ef, and its build seconds."""
    start = time.perf_counter()
    if library == "faiss":
        import faiss

        index = faiss.IndexHNSWFlat(matrix.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.add(matrix)
        faiss.omp_set_num_threads(1)
        return lambda ef: faiss_walk(index, ef, ids), time.perf_counter() - start
    if library == "hnswlib":
        import hnswlib

        index = hnswlib.Index(space="ip", dim=matrix.shape[1])
        index.init_index(max_elements=len(matrix), M=32, ef_construction=100)
        index.add_items(matrix)
        index.set_num_threads(1)

        def hnswlib_maker(ef: int) -> Query:
            def query(vector: np.ndarray, mask: np.ndarray | None) -> list[str]:
                index.set_ef(ef)
                keep = None if mask is None else (lambda label: bool(mask[label]))
                return list(ids[index.knn_query(vector, 10, filter=keep)[0][0]])
            return query
        return hnswlib_maker, time.perf_counter() - start
    from usearch.index import Index

    index = Index(ndim=matrix.shape[1], metric="ip", connectivity=32)
    index.add(np.arange(len(matrix)), matrix)

    def usearch_maker(ef: int) -> Query:
        def query(vector: np.ndarray, mask: np.ndarray | None) -> list[str]:
            if mask is not None:
                raise NotImplementedError
            index.expansion_search = ef
            return list(ids[index.search(vector, 10, threads=1).keys])
        return query
    return usearch_maker, time.perf_counter() - start


def faiss_walk(index: Any, ef: int, ids: np.ndarray) -> Query:
    """Single queries walking the faiss HNSW `index` (rows in `ids` order) with breadth `ef`."""
    import faiss

    plain = faiss.SearchParametersHNSW(efSearch=ef)
    filtered: dict[int, tuple] = {}  # per mask, built once as ours is: (mask, bitmap, params) kept alive

    def query(vector: np.ndarray, mask: np.ndarray | None) -> list[str]:
        params = plain
        if mask is not None:
            if id(mask) not in filtered:
                bitmap = np.packbits(mask, bitorder="little")
                filtered[id(mask)] = (mask, bitmap, faiss.SearchParametersHNSW(
                    efSearch=ef, sel=faiss.IDSelectorBitmap(bitmap)))
            params = filtered[id(mask)][2]
        return list(ids[index.search(vector[None], 10, params=params)[1][0]])
    return query


def recall(found: list[list[str]], truth: list[np.ndarray]) -> float:
    return round(float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])), 4)


def tuned_ef(maker: Callable[[int], Query], queries: np.ndarray, truth: list[np.ndarray], mask: np.ndarray | None,
             target: float) -> int:
    """The smallest ef in `EF_STEPS` whose recall@10 on `queries` reaches `target` (the largest when none does)."""
    for ef in EF_STEPS:
        if recall([maker(ef)(vector, mask) for vector in queries], truth) >= target:
            return ef
    return EF_STEPS[-1]


def interleaved(paths: dict[str, Query], queries: np.ndarray, mask: np.ndarray | None,
                warmup: np.ndarray) -> dict[str, tuple]:
    """Each path's ids and latencies (ids in query order), the paths taking turns, one query each a turn, in an
    order that rotates from turn to turn. In a turn every path runs a different query (path j is j/len(paths)
    of the queries ahead), so no path walks a neighbourhood that another path's walk of the same query has just
    brought into the CPU caches: paths over one graph (faiss at two efs) would otherwise warm each other, while a
    graph of its own (ours) always starts cold. Each path first answers the `warmup` queries, untimed: a graph
    built minutes before (ours, first) paid for first touches that one built last did not (1M rows: p99 5.9 ms
    for ours and 4.4 for the bare walk of its graph, 0.7 for faiss's)."""
    for query in paths.values():
        for vector in warmup:
            query(vector, mask)
    count, names = len(queries), list(paths)
    ahead = {name: index * count // len(names) for index, name in enumerate(names)}
    found: dict[str, list] = {name: [None] * count for name in paths}
    seconds: dict[str, list] = {name: [] for name in paths}
    for turn in range(count):
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            position = (turn + ahead[name]) % count
            query = paths[name]
            start = time.perf_counter()
            result = query(queries[position], mask)
            seconds[name].append(time.perf_counter() - start)
            found[name][position] = result
    return {name: (found[name], seconds[name]) for name in paths}


def ms(seconds: list[float], quantile: float) -> float:
    return round(1000 * float(np.quantile(seconds, quantile)), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200, help="held-out single queries")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--graphs", nargs="+", default=["faiss"], choices=["faiss", "hnswlib", "usearch"],
                        help="in-memory graph libraries to compare (faiss first: the baseline)")
    parser.add_argument("--lancedb-ef", type=int, default=None,
                        help="ef of the LanceDB paths (default: the stored tuned one)")
    parser.add_argument("--no-memory-index", action="store_true", help="leave out the `ours_memory` row")
    parser.add_argument("--no-lancedb-index", action="store_true",
                        help="build no LanceDB index and leave out the LanceDB rows (`ours`, `lancedb`, `pylance`): "
                             "at 1M rows its build alone takes longer than the rest on 2 cores")
    parser.add_argument("--db", default=None, help="LanceDB folder, reused when it holds the table (default: temp)")
    args = parser.parse_args()

    if args.db is None:
        args.db = tempfile.mkdtemp(prefix="search_at_scale_")
        atexit.register(shutil.rmtree, args.db, ignore_errors=True)
    table, timings = prepare(args.db, args.rows, args.dim,
                             args.target_recall, lancedb_index=not args.no_lancedb_index)
    params = table.search_params()
    if args.lancedb_ef:
        params = SearchParams(**{**params.__dict__, "ef": args.lancedb_ef})
    snapshot = lance.dataset(table.uri).to_table(columns=["id", VECTOR, "shard"])
    ids = snapshot.column("id").to_numpy(zero_copy_only=False)
    matrix = np.stack(snapshot.column(VECTOR).to_numpy(zero_copy_only=False)).astype(np.float32)
    masks = {"none": None, FILTER: (snapshot.column("shard").to_numpy() == 3)}
    queries = ClusteredVectors(args.dim).chunk(args.queries, stream=10**6)
    warmup = ClusteredVectors(args.dim).chunk(WARMUP_QUERIES, stream=10**6 + 1)
    tree = parse_filter(FILTER, column_kinds(table.schema))

    paths: dict[str, Query] = {} if args.no_lancedb_index else {
        "ours": lambda vector, mask: table.search(vector, 10, tree if mask is not None else None, select=["id"],
                                                  params=params).column("id").to_pylist(),
        **lancedb_paths(table, params, FILTER),
    }
    lancedb_build = timings.get("lancedb_build_s")  # None: the index in --db was built by an earlier run
    build_s: dict[str, float | None] = {"ours": lancedb_build, "lancedb": lancedb_build, "pylance": lancedb_build,
                                        "exact": 0.0}
    if not args.no_memory_index:
        start = time.perf_counter()
        memory = ImageTable.open(args.db, "pool", memory_index="faiss")
        build_s["ours_memory"] = round(time.perf_counter() - start, 1)
        graph_index = memory.memory_index
        timings["memory_index"] = {"ef": graph_index.ef, "recall_at_10_on_tuning_queries": graph_index.recall_at_k,
                                   "filtered_ef": dict(graph_index.breadths.filtered)}
        paths["ours_memory"] = lambda vector, mask: memory.search(
            vector, 10, tree if mask is not None else None, select=["id"]).column("id").to_pylist()
    makers = {}
    for library in args.graphs:
        makers[library], seconds = graph(library, matrix, ids)
        build_s[f"{library}_hnsw"] = round(seconds, 1)

    report: dict = {"benchmark": "search_at_scale", "rows": args.rows, "dim": args.dim, "queries": args.queries,
                    **timings, "lancedb_params": {"nprobes": params.nprobes, "ef": params.ef,
                                                  "refine_factor": params.refine_factor}, "runs": {}}
    for label, mask in masks.items():
        truth = [ids[exact_top(matrix, vector, mask)] for vector in queries]
        run = dict(paths)
        efs = {}
        for library, maker in makers.items():
            if library == "usearch" and mask is not None:
                continue
            efs[f"{library}_hnsw"] = tuned_ef(maker, queries, truth, mask, args.target_recall)
        same_ef = ours_ef(memory.memory_index, mask) if "ours_memory" in paths else None
        if same_ef and "faiss" in makers:  # the same graph walk as ours: the same recall
            efs["faiss_hnsw_same_ef"] = same_ef
        for name, ef in efs.items():
            run[name] = makers[name.split("_")[0]](ef)
        if same_ef:  # the bare walk of our own graph: what our path adds, without the graphs' cache luck
            efs["faiss_our_graph"] = same_ef
            run["faiss_our_graph"] = faiss_walk(memory.memory_index.graph, same_ef, ids)
        exact = {"exact": lambda vector, mask: list(ids[exact_top(matrix, vector, mask)])}
        on_lance = {name: run.pop(name) for name in LANCE_PATHS if name in run}
        rows = {}  # groups timed apart: see LANCE_PATHS; exact, a scan of every row, empties the CPU caches
        timed = {name: result for group in (on_lance, run, exact) if group
                 for name, result in interleaved(group, queries, mask, warmup).items()}
        for name, (found, seconds) in timed.items():
            rows[name] = {"recall_at_10": recall(found, truth), "p50_ms": ms(seconds, 0.5),
                          "p99_ms": ms(seconds, 0.99), "build_s": build_s.get(name)}
        for name, ef in efs.items():
            rows[name]["ef"] = ef
        for baseline in ("faiss_hnsw", "faiss_hnsw_same_ef", "faiss_our_graph"):
            if "ours_memory" in rows and baseline in rows:
                rows[f"ratios_ours_memory_to_{baseline}"] = {
                    "p50": round(rows["ours_memory"]["p50_ms"] / rows[baseline]["p50_ms"], 2),
                    "p99": round(rows["ours_memory"]["p99_ms"] / rows[baseline]["p99_ms"], 2)}
        report["runs"][label] = rows
    filtered, plain = report["runs"][FILTER], report["runs"]["none"]
    if "ours_memory" in filtered and "faiss_hnsw" in plain:
        filtered["ratios_ours_memory_to_faiss_hnsw"]["p50_to_unfiltered_faiss"] = round(
            filtered["ours_memory"]["p50_ms"] / plain["faiss_hnsw"]["p50_ms"], 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
