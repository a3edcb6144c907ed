"""An HNSW graph of a table's vector column held in memory beside the table, kept in step with its versions.

The table stays the source of truth: the graph holds the column's unit vectors (inner product is cosine
similarity) under labels that are the rows' positions in the table version it mirrors, and a search returns
that version with the positions, from which the caller reads the rows. `follow(version)` brings the graph to
another version: when the ids of the rows it holds are still the first rows of that version (rows appended,
or appends compacted), only the rows after them are added; any other change (deleted or rewritten rows)
builds the graph anew. The graph is faiss's `IndexHNSWFlat`; its search breadth `ef` is tuned when it is
built, and again each time appends have doubled its rows, by recall@k against exact search, with the
newest rows as queries while they are not yet in the graph (they are added after): the smallest ef that
reaches the target on vectors the graph does not hold, as a user's query is. Rows of the graph as queries
would understate it (200k clustered rows: ef 48 reaches 0.95 on rows, 96 on new vectors; at 1M, 48 on
both). Where the ef that reaches the target would walk about as many vectors as the graph holds (ef x M >=
rows: small or hard tables), the graph is scanned instead, which is as fast there and exact (20k clustered
rows: faiss needs ef 768 for 0.95, 2.0 ms, as long as a scan; ef 512 gave 0.93).

A filter is a predicate the table version evaluates over its rows (so it means what it means on the table),
cached per version as a bitmap. The walk under a filter needs more breadth the fewer rows it keeps (200k
clustered rows: ef 96 reaches 0.95 unfiltered, 128 with 10% kept, over 512 with 2%), so breadths are tuned
too, with the same queries, for random filters keeping 20%, 10%, 5% and 2% of the rows; a filter gets the
breadth of the widest tuned one no wider than it. Where that breadth would walk as many vectors as the
filter keeps, the kept rows are scanned instead (`breadth`). Reading the table is the caller's, through the
`TableVersion` it passes in: this module knows no storage API.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

EF_STEPS = (16, 24, 32, 48, 64, 80, 96, 128, 192, 256, 384, 512)  # then x1.5 until a scan is as cheap
FILTER_FRACTIONS = (0.2, 0.1, 0.05, 0.02)  # the random filters breadths are tuned for, widest first
EXACT_ROWS = 2_000  # by default, a filter keeping at most this many rows is scanned (by gathering its rows)
CACHED_FILTERS = 32


class TableVersion(Protocol):
    """One version of a table, as the memory index reads it (rows in the table's scan order)."""

    @property
    def version(self) -> int: ...

    def ids(self) -> np.ndarray:
        """Every row's id, in scan order, as a numpy bytes array."""

    def unit_vectors(self, column: str, offset: int = 0) -> Iterator[np.ndarray]:
        """The column's vectors of the rows from position `offset` on, L2 normalised float32, in batches."""

    def keeps(self, where: str) -> np.ndarray:
        """Whether each row satisfies the predicate `where` (NULL: not), in scan order."""


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as error:
        raise ImportError("memory_index='faiss' needs the faiss-cpu package (pip install faiss-cpu)") from error
    return faiss


@dataclass(frozen=True)
class Found:
    """What one search found: the table version searched, the rows' positions in it, their ids (as the graph
    read them from that version) and cosine distances, best first."""

    table: TableVersion
    positions: np.ndarray
    ids: list[str]
    distances: np.ndarray


@dataclass(frozen=True)
class Breadths:
    """What tuning chose: the walk's ef (None: scan), the recall@k it reached on the tuning queries, and for
    each of `FILTER_FRACTIONS` (widest first) the ef under a random filter keeping that fraction (None: scan
    the kept rows; the narrower fractions after a None are not tuned, they scan too)."""

    ef: int | None = None
    recall_at_k: float | None = None
    filtered: tuple[tuple[float, int | None], ...] = ()


@dataclass(frozen=True)
class _Mask:
    """The rows of one version a filter keeps: how many, and faiss's selector over their bitmap."""

    rows: np.ndarray  # positions kept
    bitmap: np.ndarray  # kept alive for the selector, which points into it
    selector: Any

    @classmethod
    def keeping(cls, keep: np.ndarray, faiss: Any) -> _Mask:
        """The mask of the rows where `keep` (one bool per row) is true."""
        bitmap = np.packbits(keep, bitorder="little")
        return cls(np.flatnonzero(keep), bitmap, faiss.IDSelectorBitmap(bitmap))


class MemoryIndex:
    """A faiss HNSW graph (M `m`) of `column` over one version of a table; safe to search from many threads
    while one follows newer versions."""

    def __init__(self, column: str, m: int = 32, ef_construction: int = 40, target_recall: float = 0.95,
                 tune_queries: int = 100, k: int = 10, exact_rows: int = EXACT_ROWS) -> None:
        self.column = column
        self.exact_rows = exact_rows
        self.m = m
        self.ef_construction = ef_construction
        self.target_recall = target_recall
        self.tune_queries = tune_queries
        self.k = k
        self.breadths = Breadths()
        self._tuned_rows = 0
        self._faiss = _faiss()
        self._index: Any = None
        self._table: TableVersion | None = None
        self._ids = np.array([], dtype="S1")
        self._masks: OrderedDict[str, _Mask] = OrderedDict()
        self._lock = threading.Lock()  # the graph, the version it mirrors and its masks change together
        self._following = threading.Lock()  # one follower at a time

    @property
    def version(self) -> int | None:
        """The table version the graph mirrors (None before the first `follow`)."""
        table = self._table
        return None if table is None else table.version

    @property
    def rows(self) -> int:
        return len(self._ids)

    @property
    def graph(self) -> Any:
        """The faiss index itself, to measure a bare walk (searching it bypasses the filters and the lock)."""
        return self._index

    @property
    def ef(self) -> int | None:
        """The tuned breadth of an unfiltered walk; None: the graph is scanned (exact)."""
        return self.breadths.ef

    @property
    def recall_at_k(self) -> float | None:
        """The recall@k the tuned breadth reached on the tuning queries (1.0 for a scan)."""
        return self.breadths.recall_at_k

    def breadth(self, kept: int | None = None) -> int | None:
        """The ef an unfiltered search walks the graph with, or a search under a filter keeping `kept` rows (the
        breadth tuned for the widest of `FILTER_FRACTIONS` no wider than it); None when it scans instead."""
        chosen = self.breadths.ef
        if kept is None or chosen is None:
            return chosen
        if kept <= self.exact_rows:
            return None
        for fraction, ef in self.breadths.filtered:
            chosen = ef
            if fraction * self.rows <= kept:
                break
        return chosen

    def follow(self, table: TableVersion) -> str:
        """Bring the graph to `table`'s version; returns what it did: `same`, `appended` or `built`."""
        with self._following:
            if self._table is not None and table.version == self._table.version:
                return "same"
            ids = table.ids()
            held = len(self._ids)
            if self._index is not None and len(ids) >= held and np.array_equal(ids[:held], self._ids):
                batches = list(table.unit_vectors(self.column, held))
                retune = self.tune_queries > 0 and len(ids) >= 2 * self._tuned_rows and len(ids) > held
                head, tail = _split_last(batches, self.tune_queries) if retune else (batches, None)
                with self._lock:
                    for vectors in head:
                        self._index.add(vectors)
                    if tail is not None:  # tuned on the newest rows before they join the graph
                        self.breadths = self._tune(self._index, tail)
                        self._index.add(tail)
                        self._tuned_rows = len(ids)
                    self._moved(table, ids)
                return "appended"
            index, breadths = self._build(table, len(ids))
            with self._lock:
                self._index, self.breadths = index, breadths
                self._tuned_rows = len(ids)
                self._moved(table, ids)
            return "built"

    def _moved(self, table: TableVersion, ids: np.ndarray) -> None:
        self._table, self._ids = table, ids
        self._masks.clear()

    def _build(self, table: TableVersion, rows: int) -> tuple[Any, Breadths]:
        """A new graph of the version's vectors, and its breadths tuned on its last rows before they join it."""
        index, held = None, []
        tuning_from = rows - self.tune_queries
        position = 0
        for vectors in table.unit_vectors(self.column):
            if index is None:
                index = self._faiss.IndexHNSWFlat(vectors.shape[1], self.m, self._faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efConstruction = self.ef_construction
            cut = min(len(vectors), max(0, tuning_from - position))
            index.add(vectors[:cut])
            if cut < len(vectors):  # a copy: a view would keep the whole batch alive until the build ends
                held.append(vectors[cut:].copy())
            position += len(vectors)
        if index is None:  # no rows: the dimension comes with the first rows appended
            return None, Breadths()
        queries = np.concatenate(held) if held else np.empty((0, index.d), dtype=np.float32)
        breadths = self._tune(index, queries)
        index.add(queries)
        return index, breadths

    def _tune(self, index: Any, queries: np.ndarray) -> Breadths:
        """Breadths for `queries` (vectors the graph does not hold): unfiltered, then under random filters
        keeping each of `FILTER_FRACTIONS` of the rows. Without queries, the largest ef of `EF_STEPS`
        (recall unknown) for every search, or a scan where that walk would read as many vectors."""
        if not len(queries):
            return Breadths(None, 1.0) if EF_STEPS[-1] * self.m >= index.ntotal else Breadths(EF_STEPS[-1])
        faiss = self._faiss
        ef, recall = self._smallest_ef(index, queries, index.storage.search(queries, self.k)[1], EF_STEPS[0],
                                       index.ntotal)
        filtered: list[tuple[float, int | None]] = []
        keeps = np.random.default_rng(0).random(index.ntotal)
        for fraction in FILTER_FRACTIONS if ef is not None else ():
            mask = _Mask.keeping(keeps < fraction, faiss)
            truth = index.storage.search(queries, self.k, params=faiss.SearchParameters(sel=mask.selector))[1]
            ef_kept, _ = self._smallest_ef(index, queries, truth, ef, len(mask.rows), mask.selector)
            filtered.append((fraction, ef_kept))
            if ef_kept is None:
                break
        return Breadths(ef, recall, tuple(filtered))

    def _smallest_ef(self, index: Any, queries: np.ndarray, truth: np.ndarray, start: int, rows: int,
                     selector: Any = None) -> tuple[int | None, float]:
        """The smallest ef from `start` on whose recall@k for `queries` against `truth` (among the `rows` rows
        `selector` keeps) reaches the target, and that recall; (None, 1.0), a scan, once ef x M reaches `rows`,
        where a walk reads about as many vectors as a scan does."""
        for ef in _widening():
            if ef < start:
                continue
            if ef * self.m >= rows:
                return None, 1.0
            params = self._faiss.SearchParametersHNSW(efSearch=ef, sel=selector)
            recall = _recall(index.search(queries, self.k, params=params)[1], truth)
            if recall >= self.target_recall:
                return ef, recall
        raise AssertionError("unreachable: the breadths grow without bound")

    def search(self, query: np.ndarray, k: int, where: str | None = None) -> Found:
        """The k rows nearest the unit vector `query` among those the predicate `where` keeps."""
        faiss = self._faiss
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        with self._lock:
            table = self._table
            if table is None:
                raise RuntimeError("the memory index follows no table version yet")
            if self._index is None:
                return Found(table, np.array([], dtype=np.int64), [], np.array([], dtype=np.float32))
            mask = None if where is None else self._mask(table, where)
            selector = None if mask is None else mask.selector
            ef = self.breadth(None if mask is None else len(mask.rows))
            if mask is not None and len(mask.rows) <= self.exact_rows:
                scores, labels = _exact(self._index.reconstruct_batch(mask.rows), mask.rows, query, k)
            elif ef is None:
                params = faiss.SearchParameters(sel=selector)
                scores, labels = self._index.storage.search(query, k, params=params)
            else:
                params = faiss.SearchParametersHNSW(efSearch=max(ef, k), sel=selector)
                scores, labels = self._index.search(query, k, params=params)
            positions = labels[0][labels[0] >= 0]
            ids = [value.decode() for value in self._ids[positions]]
        return Found(table, positions, ids, 1.0 - scores[0][: len(positions)])

    def _mask(self, table: TableVersion, where: str) -> _Mask:
        """The rows of the mirrored version `where` keeps, cached."""
        mask = self._masks.get(where)
        if mask is not None:
            self._masks.move_to_end(where)
            return mask
        mask = _Mask.keeping(table.keeps(where), self._faiss)
        self._masks[where] = mask
        if len(self._masks) > CACHED_FILTERS:
            self._masks.popitem(last=False)
        return mask


def _widening() -> Iterator[int]:
    """`EF_STEPS`, then ever broader by half."""
    yield from EF_STEPS
    ef = EF_STEPS[-1]
    while True:
        ef = int(ef * 1.5)
        yield ef


def _split_last(batches: list[np.ndarray], count: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The batches (at least one row in all) without their last `count` rows, and those rows as one array."""
    head, tail = list(batches), []
    while head and count > 0:
        last = head.pop()
        cut = max(0, len(last) - count)
        tail.insert(0, last[cut:])
        if cut:
            head.append(last[:cut])
        count -= len(last) - cut
    return head, np.concatenate(tail)


def _exact(vectors: np.ndarray, rows: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and labels [1, <=k] of the `rows` (with these unit `vectors`) nearest `query`, best first."""
    scores = vectors @ query[0]
    top = np.argsort(-scores)[:k] if len(scores) <= k else np.argpartition(-scores, k)[:k]
    top = top[np.argsort(-scores[top])]
    return scores[top][None], rows[top][None]


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean recall of `found` against `truth` (label lists [Q, k])."""
    hits = sum(len(set(got) & set(expected)) for got, expected in zip(found, truth, strict=True))
    return round(hits / truth.size, 4)
