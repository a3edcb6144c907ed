"""The LanceDB image table: schema, open/create, batched appends, exact and ANN search, tuned index parameters.

This is the only module that knows LanceDB's API. A table holds one row per image (`id`, `uri`, `width`,
`height`, `vector`, `model_id`, optional `clip_vector`, any carried metadata columns); its rejects live in
a sibling table `NAME_rejects` (`id`, `uri`, `reason`, `detail`). The tuned search parameters of each
vector column are stored in that column's field metadata (key `magiclens:search`, JSON), so every reader
of the table (the server, batch retrieval, plain `lancedb`) finds them without flags.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.index import HnswSq, IvfPq

from magiclens_core.search.filters import And, Comparison, Filter, InList, IsNull, Not, Or

VECTOR = "vector"
CLIP_VECTOR = "clip_vector"
SEARCH_KEY = "magiclens:search"
DISTANCE = "cosine"
REJECTS_SUFFIX = "_rejects"

VectorDType = Literal["float32", "float16"]
IndexKind = Literal["auto", "none", "ivf_pq", "ivf_hnsw_sq"]

_VALUE_TYPES = {"float32": pa.float32(), "float16": pa.float16()}

REJECTS_SCHEMA = pa.schema([
    pa.field("id", pa.string()),       # content hash when the bytes could be read, else null
    pa.field("uri", pa.string()),
    pa.field("reason", pa.string()),   # empty, not_an_image, corrupt, too_many_pixels, too_small, unreadable
    pa.field("detail", pa.string()),
])


def image_schema(dim: int, vector_dtype: VectorDType = "float32", clip_dim: int | None = None,
                 metadata: pa.Schema | None = None) -> pa.Schema:
    """The image table's schema: fixed columns, the vector column(s), then carried metadata columns."""
    value = _VALUE_TYPES[vector_dtype]
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field(VECTOR, pa.list_(value, dim)),
        pa.field("model_id", pa.string()),
    ]
    if clip_dim:
        fields.append(pa.field(CLIP_VECTOR, pa.list_(value, clip_dim)))
    taken = {f.name for f in fields}
    for extra in metadata or []:
        if extra.name in taken:
            raise ValueError(f"metadata column {extra.name!r} clashes with a column of the image table")
        fields.append(extra)
    return pa.schema(fields)


def metadata_fields(schema: pa.Schema) -> pa.Schema:
    """The fields of `schema` that are not the image table's own columns (carried as metadata)."""
    own = {*image_schema(1).names, CLIP_VECTOR}
    return pa.schema([f for f in schema if f.name not in own])


@dataclass
class SearchParams:
    """How to search one vector column: the index it has and the tuned query parameters.

    `index_type` None means exact (flat) search. `recall_at_10` is the recall measured against exact
    search on `queries` sample rows of the table when the parameters were tuned.
    """

    index_type: str | None = None
    nprobes: int | None = None
    refine_factor: int | None = None
    ef: int | None = None
    recall_at_10: float | None = None
    target_recall: float | None = None
    p50_ms: float | None = None
    queries: int = 0
    indexed_rows: int = 0
    build: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SearchParams:
        return cls(**json.loads(text))


def _connect(uri: str) -> lancedb.DBConnection:
    return lancedb.connect(uri)


def _vectors_to_arrow(vectors: np.ndarray, value: pa.DataType) -> pa.FixedSizeListArray:
    vectors = np.ascontiguousarray(vectors, dtype=value.to_pandas_dtype())
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def _column_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list column as a float32 matrix [rows, dim]."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


class ImageTable:
    """One LanceDB table of image embeddings (and its rejects table)."""

    def __init__(self, db: lancedb.DBConnection, table: Any, name: str) -> None:
        self._db = db
        self._table = table
        self.name = name

    # ------------------------------------------------------------------ open / create

    @classmethod
    def open(cls, uri: str, name: str) -> ImageTable:
        """An existing table; `FileNotFoundError` naming it when there is none."""
        db = _connect(uri)
        try:
            table = db.open_table(name)
        except (ValueError, FileNotFoundError) as err:
            raise FileNotFoundError(f"no table {name!r} in {uri}") from err
        return cls(db, table, name)

    @classmethod
    def create(cls, uri: str, name: str, schema: pa.Schema) -> ImageTable:
        """Open `name` if it exists (its vector columns must match `schema`), else create it empty."""
        db = _connect(uri)
        if name in db.list_tables().tables:
            table = cls(db, db.open_table(name), name)
            for column in (VECTOR, CLIP_VECTOR):
                wanted = schema.field(column).type if column in schema.names else None
                have = table.schema.field(column).type if column in table.schema.names else None
                if wanted is not None and wanted != have:
                    raise ValueError(f"table {name!r} has {column} of type {have}, this run writes {wanted}; "
                                     "use another table or the same model and vector options")
            return table
        return cls(db, db.create_table(name, schema=schema), name)

    @property
    def schema(self) -> pa.Schema:
        return self._table.schema

    @property
    def dim(self) -> int:
        return self.schema.field(VECTOR).type.list_size

    @property
    def uri(self) -> str:
        """The table's own location (a `.lance` dataset readable by `lance.dataset`)."""
        return self._table.uri

    @property
    def version(self) -> int:
        return self._table.version

    def count(self) -> int:
        return self._table.count_rows()

    def refresh(self) -> None:
        """See rows committed by other writers since this handle was opened."""
        self._table.checkout_latest()

    # ------------------------------------------------------------------ rows

    def ids(self) -> np.ndarray:
        """Every id in the table, sorted, as a numpy bytes array (for `np.searchsorted` membership tests)."""
        parts = [batch.column(0).to_numpy(zero_copy_only=False).astype(np.bytes_)
                 for batch in self._table.to_lance().to_batches(columns=["id"]) if batch.num_rows]
        if not parts:
            return np.array([], dtype="S1")
        return np.sort(np.concatenate(parts))

    def add(self, rows: pa.Table | dict[str, Any]) -> int:
        """Append rows in one commit (one table version); returns how many.

        `rows` is an Arrow table or a dict of columns (vectors as [N, D] numpy matrices). Columns are cast
        to the table's schema (float32 vectors land in a float16 table as float16); missing ones are null.
        """
        if isinstance(rows, dict):
            rows = pa.table({name: _vectors_to_arrow(value, pa.float32()) if isinstance(value, np.ndarray)
                             and value.ndim == 2 else value for name, value in rows.items()})
        if rows.num_rows == 0:
            return 0
        schema = self.schema
        columns = [rows.column(target.name).cast(target.type) if target.name in rows.column_names
                   else pa.nulls(rows.num_rows, target.type) for target in schema]
        self._table.add(pa.Table.from_arrays(columns, schema=schema))
        return rows.num_rows

    def scan(self, columns: list[str], batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
        """Stream the table's rows (chosen columns) in record batches."""
        yield from self._table.to_lance().to_batches(columns=columns, batch_size=batch_rows)

    def get(self, ids: list[str], columns: list[str] | None = None) -> pa.Table:
        """The rows with these ids (any order; unknown ids are simply absent)."""
        if not ids:
            return self.schema.empty_table().select(columns) if columns else self.schema.empty_table()
        listed = ", ".join(_sql_string(value) for value in ids)
        return self._table.to_lance().to_table(columns=columns, filter=f"id IN ({listed})")

    def head(self, limit: int, offset: int = 0, columns: list[str] | None = None) -> pa.Table:
        """`limit` rows from position `offset`, in storage order (for browsing the table)."""
        return self._table.to_lance().to_table(columns=columns, offset=offset, limit=limit)

    def sample(self, count: int, column: str = VECTOR, seed: int = 0) -> tuple[list[str], np.ndarray]:
        """Ids and stored vectors of `count` random rows (fewer when the table is smaller)."""
        dataset = self._table.to_lance()
        rows = dataset.count_rows()
        chosen = np.sort(np.random.default_rng(seed).choice(rows, size=min(count, rows), replace=False))
        taken = dataset.take(chosen, columns=["id", column])
        return taken.column("id").to_pylist(), _column_matrix(taken.column(column))

    # ------------------------------------------------------------------ search

    def search_params(self, column: str = VECTOR) -> SearchParams:
        """The stored search parameters of a vector column (exact search when none are stored)."""
        metadata = self.schema.field(column).metadata or {}
        raw = metadata.get(SEARCH_KEY.encode())
        return SearchParams.from_json(raw.decode()) if raw else SearchParams()

    def _query(self, vector: np.ndarray, k: int, column: str, filter: str | Filter | None,
               params: SearchParams | None, exact: bool):
        query = self._table.search(np.asarray(vector, dtype=np.float32), vector_column_name=column)
        query = query.distance_type(DISTANCE).limit(k)
        if filter:
            query = query.where(filter if isinstance(filter, str) else filter_sql(filter), prefilter=True)
        params = params or self.search_params(column)
        if exact or params.index_type is None:
            return query.bypass_vector_index()
        if params.nprobes:
            query = query.nprobes(params.nprobes)
        if params.refine_factor:
            query = query.refine_factor(params.refine_factor)
        if params.ef:  # HNSW must explore at least the candidates asked of it (k, times the refine factor)
            query = query.ef(max(params.ef, k * (params.refine_factor or 1)))
        return query

    def search(self, vector: np.ndarray, k: int = 10, filter: str | Filter | None = None, column: str = VECTOR,
               select: list[str] | None = None, exact: bool = False,
               params: SearchParams | None = None) -> pa.Table:
        """The k nearest rows to `vector` (cosine), best first, with a `_distance` column.

        Uses the column's stored tuned parameters unless `params` is given; `exact=True` scans all rows.
        `filter` is a SQL predicate over the table's columns, or a parsed `magiclens_core.search.filters.Filter`
        (applied before the vector search).
        """
        query = self._query(vector, k, column, filter, params, exact)
        if select is not None:
            query = query.select([*select, *(["_distance"] if "_distance" not in select else [])])
        return query.to_arrow()

    def exact_neighbors(self, queries: np.ndarray, k: int = 10, column: str = VECTOR,
                        batch_rows: int = 65_536) -> np.ndarray:
        """Ids [Q, k] of the exact cosine nearest neighbours, by one streaming pass over the table."""
        queries = _unit_rows(np.asarray(queries, dtype=np.float32))
        best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        best_ids = np.empty((len(queries), 0), dtype=object)
        for batch in self.scan(["id", column], batch_rows):
            scores = queries @ _unit_rows(_column_matrix(batch.column(1))).T
            ids = batch.column(0).to_numpy(zero_copy_only=False)
            scores = np.concatenate([best_scores, scores], axis=1)
            candidates = np.concatenate([best_ids, np.broadcast_to(ids, (len(queries), len(ids)))], axis=1)
            keep = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
            best_scores = np.take_along_axis(scores, keep, axis=1)
            best_ids = np.take_along_axis(candidates, keep, axis=1)
        order = np.argsort(-best_scores, axis=1)
        return np.take_along_axis(best_ids, order, axis=1)

    # ------------------------------------------------------------------ index

    def index_type(self, column: str = VECTOR) -> str | None:
        for index in self._table.list_indices():
            if column in index.columns:
                return index.index_type
        return None

    def _store_search_params(self, column: str, params: SearchParams) -> None:
        self._table.update_field_metadata({"path": column, "metadata": {SEARCH_KEY: params.to_json()}})

    def build_index(self, kind: Literal["ivf_pq", "ivf_hnsw_sq"], column: str = VECTOR,
                    **build: int) -> dict[str, Any]:
        """Train a vector index on the column (replacing any); returns the build parameters used."""
        rows = self.count()
        dim = self.schema.field(column).type.list_size
        if kind == "ivf_pq":
            build = {"num_partitions": max(1, int(np.sqrt(rows))), "num_sub_vectors": _pq_sub_vectors(dim),
                     **build}
            config = IvfPq(distance_type=DISTANCE, **build)
        elif kind == "ivf_hnsw_sq":
            build = {"num_partitions": max(1, rows // 250_000), "m": 20, "ef_construction": 150, **build}
            config = HnswSq(distance_type=DISTANCE, **build)
        else:
            raise ValueError(f"unknown index kind {kind!r}; expected ivf_pq or ivf_hnsw_sq")
        self._table.create_index(column, config=config, replace=True)
        return {"kind": kind, "rows": rows, **build}

    def use_exact_search(self, column: str = VECTOR) -> SearchParams:
        """Store exact (flat) search as the column's search parameters, even when it has an index."""
        params = SearchParams(indexed_rows=self.count(), recall_at_10=1.0)
        self._store_search_params(column, params)
        return params

    def update_index(self) -> None:
        """Fold rows appended since the index was built into it, and compact small appends."""
        self._table.optimize()

    def tune(self, target_recall: float = 0.95, column: str = VECTOR, queries: int = 100,
             k: int = 10, build: dict[str, Any] | None = None, seed: int = 0) -> SearchParams:
        """Measure recall@k of the column's index against exact search, with sample rows as queries (each row
        itself left out), and store
        the cheapest search parameters that reach `target_recall` (the best found when none does)."""
        kind = self.index_type(column)
        if kind is None:
            raise ValueError(f"column {column!r} has no vector index to tune")
        rows = self.count()
        sample_ids, sample = self.sample(queries, column, seed)
        truth = [_without(row, own, k) for row, own in
                 zip(self.exact_neighbors(sample, k + 1, column), sample_ids, strict=True)]
        chosen: SearchParams | None = None
        best: SearchParams | None = None
        for group in _candidates(kind, (build or {}).get("num_partitions", 1)):
            for candidate in group:  # increasing cost: stop at the first that reaches the target
                measured = self._measure(SearchParams(
                    index_type=kind, target_recall=target_recall, queries=len(sample), indexed_rows=rows,
                    build=build or {}, **candidate), sample_ids, sample, truth, k, column)
                if best is None or (measured.recall_at_10 or 0) > (best.recall_at_10 or 0):
                    best = measured
                if (measured.recall_at_10 or 0) >= target_recall:
                    if chosen is None or (measured.p50_ms or 0) < (chosen.p50_ms or 0):
                        chosen = measured
                    break
        params = chosen or best
        assert params is not None
        self._store_search_params(column, params)
        return params

    def _measure(self, params: SearchParams, sample_ids: list[str], sample: np.ndarray, truth: list[list[str]],
                 k: int, column: str) -> SearchParams:
        """Recall@k (the query row itself left out of both lists) and median latency of `params`."""
        latencies, hits = [], 0
        for own, vector, expected in zip(sample_ids, sample, truth, strict=True):
            start = time.perf_counter()
            found = self.search(vector, k + 1, column=column, select=["id"], params=params).column("id")
            latencies.append(time.perf_counter() - start)
            hits += len(set(_without(found.to_pylist(), own, k)) & set(expected))
        params.recall_at_10 = round(hits / (k * len(sample)), 4)
        params.p50_ms = round(1000 * float(np.median(latencies)), 3)
        return params

    # ------------------------------------------------------------------ model and rejects

    def check_model(self, model_id: str | None) -> None:
        """Raise `ValueError` when the table's rows were embedded by another model than `model_id`."""
        if self.count() == 0:
            return
        stored = self._table.to_lance().take([0], columns=["model_id"]).column("model_id")[0].as_py()
        if stored != model_id:
            raise ValueError(f"table {self.name!r} holds embeddings of model {stored!r}, not {model_id!r}; "
                             "index into another table or use the same model")

    @staticmethod
    def rejects_of(uri: str, name: str) -> RejectsTable:
        """The `NAME_rejects` table beside table `name` (created when missing)."""
        return RejectsTable.create(_connect(uri), name + REJECTS_SUFFIX)


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, str):
        return _sql_string(value)
    return repr(value)


def filter_sql(tree: Filter) -> str:
    """A parsed filter as a LanceDB SQL predicate: every column name and value quoted by this function."""
    if isinstance(tree, Comparison):
        return f"`{tree.column}` {tree.op} {_sql_value(tree.value)}"
    if isinstance(tree, InList):
        return f"`{tree.column}` IN ({', '.join(_sql_value(value) for value in tree.values)})"
    if isinstance(tree, IsNull):
        return f"`{tree.column}` IS {'NOT ' if tree.negated else ''}NULL"
    if isinstance(tree, Not):
        return f"NOT ({filter_sql(tree.item)})"
    joiner = " AND " if isinstance(tree, And) else " OR "
    assert isinstance(tree, (And, Or))
    return "(" + joiner.join(f"({filter_sql(item)})" for item in tree.items) + ")"


def _without(ids: Any, own: str, k: int) -> list[str]:
    """The first k ids other than `own` (a query row's neighbours, itself excluded)."""
    return [i for i in list(ids) if i != own][:k]


def _pq_sub_vectors(dim: int) -> int:
    """Sub-vectors of 4 dimensions (the finest PQ that keeps SIMD-friendly codes), at most `dim`."""
    for dims_per_code in (4, 2, 1):
        if dim % dims_per_code == 0:
            return dim // dims_per_code
    return dim


def _candidates(kind: str, partitions: int) -> list[list[dict[str, int | None]]]:
    """Search parameters to try: groups along which the cost (and recall) grows. HNSW over scalar-quantised
    vectors can top out under the target recall whatever `ef`; re-ranking the candidates on the full vectors
    (`refine_factor`) lifts that ceiling, so those groups come last."""
    if kind.replace("_", "").upper().startswith("IVFHNSW"):
        probes = sorted({p for p in (1, 2, 4, partitions) if p <= partitions})
        return [[{"nprobes": nprobes, "ef": ef, "refine_factor": refine} for ef in (16, 32, 64, 128, 256, 512)]
                for refine in (None, 2, 5) for nprobes in probes]
    probes = [p for p in (5, 10, 20, 40, 80, 160, 320) if p < partitions] + [partitions]
    return [[{"nprobes": nprobes, "refine_factor": refine} for nprobes in probes] for refine in (1, 2, 5, 10)]


class RejectsTable:
    """The `NAME_rejects` table: one row per distinct (uri, reason), so reruns add nothing twice."""

    def __init__(self, table: Any) -> None:
        self._table = table

    @classmethod
    def create(cls, db: lancedb.DBConnection, name: str) -> RejectsTable:
        if name in db.list_tables().tables:
            return cls(db.open_table(name))
        return cls(db.create_table(name, schema=REJECTS_SCHEMA))

    def add_new(self, rows: pa.Table) -> int:
        """Append the rows whose (uri, reason) is not recorded yet; returns how many were added."""
        if rows.num_rows == 0:
            return 0
        rows = pa.table({name: rows.column(name).cast(pa.string()) if name in rows.column_names
                         else pa.nulls(rows.num_rows, pa.string()) for name in REJECTS_SCHEMA.names})
        keys = pc.binary_join_element_wise(rows["uri"].fill_null(""), rows["reason"], "\x00")
        _, first = np.unique(keys.to_numpy(zero_copy_only=False), return_index=True)
        rows = rows.take(np.sort(first))
        uris = [uri for uri in rows["uri"].to_pylist() if uri is not None]
        if uris:
            quoted = ", ".join(_sql_string(uri) for uri in uris)
            present = self._table.to_lance().to_table(columns=["uri", "reason"], filter=f"uri IN ({quoted})")
            seen = set(zip(present["uri"].to_pylist(), present["reason"].to_pylist(), strict=True))
            keep = [(uri, reason) not in seen
                    for uri, reason in zip(rows["uri"].to_pylist(), rows["reason"].to_pylist(), strict=True)]
            rows = rows.filter(pa.array(keep))
        if rows.num_rows:
            self._table.add(rows)
        return rows.num_rows


AUTO_INDEX = "ivf_hnsw_sq"


def _same_kind(listed: str | None, kind: str) -> bool:
    return listed is not None and listed.replace("_", "").lower() == kind.replace("_", "").lower()


def index_table(table: ImageTable, kind: IndexKind = "auto", added: int = 0, min_rows: int = 20_000,
                target_recall: float = 0.95, queries: int = 100, partitions: int | None = None,
                sub_vectors: int | None = None, clip_vector: bool = False) -> dict[str, Any]:
    """Bring the table's search up to date after `added` new rows and return its search parameters.

    `none` searches exactly; `auto` keeps exact search below `min_rows`, then builds `AUTO_INDEX` (an
    existing index of another kind is kept). An index is (re)built when there is none of the wanted kind or
    the table has doubled since it was trained, else new rows are folded into it; search parameters are
    re-tuned whenever the rows changed, and stored with the table.
    """
    if added:
        table.update_index()
    rows = table.count()
    overrides = {name: value for name, value in
                 (("num_partitions", partitions), ("num_sub_vectors", sub_vectors)) if value}
    summary: dict[str, Any] = {}
    for column in (VECTOR, CLIP_VECTOR) if clip_vector else (VECTOR,):
        params = table.search_params(column)
        current = table.index_type(column)
        wanted: str | None = kind
        if kind == "none" or (kind == "auto" and current is None and rows < min_rows):
            wanted = None
        elif kind == "auto":
            wanted = AUTO_INDEX if current is None else current
        if wanted is None:
            if params.index_type is not None or params.indexed_rows != rows:
                params = table.use_exact_search(column)
        elif not _same_kind(current, wanted) or rows >= 2 * params.build.get("rows", rows):
            build = {k: v for k, v in overrides.items() if wanted == "ivf_pq" or k == "num_partitions"}
            params = table.tune(target_recall, column, queries, build=table.build_index(wanted, column, **build))
        elif params.indexed_rows != rows:
            params = table.tune(target_recall, column, queries, build=params.build)
        summary[column] = {"type": params.index_type, "nprobes": params.nprobes,
                           "refine_factor": params.refine_factor, "ef": params.ef,
                           "recall_at_10": params.recall_at_10, "p50_ms": params.p50_ms,
                           "indexed_rows": params.indexed_rows, "build": params.build}
    return summary[VECTOR] if not clip_vector else {**summary[VECTOR], "clip_vector": summary[CLIP_VECTOR]}
