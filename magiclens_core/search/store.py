"""The LanceDB image table: schema, open/create, appends, exact and ANN search, vector indexes, stored search
parameters.

This is the only module that knows LanceDB's API (when and how a table is indexed and tuned is
`magiclens_core.search.index_policy`). A table holds one row per image (`id`, `uri`, `width`, `height`,
`vector`, `model_id`, optional `clip_vector`, any carried metadata columns); its rejects live in a sibling
table `NAME_rejects` (`id`, `uri`, `reason`, `detail`, and `key`: the uri, or `id:ID` for an image given as
bytes without one). The tuned search parameters of each vector column are stored in that column's field
metadata (key `magiclens:search`, JSON), so every reader of the table (the server, batch retrieval, plain
`lancedb`) finds them without flags.

Any number of writers may work on one table at once. Rows go in by a merge on `id`, which the schema
declares the table's primary key, so Lance's commit detects two writers inserting the same id and redoes
the later merge against the newer version: one row per id under any interleaving (the rejects table
likewise, on (`reason`, `key`)). Every other commit that meets a concurrent one is retried against the
latest version, and of two writers creating one table, one creates it and the other opens it.
"""

from __future__ import annotations

import json
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Literal, TypeVar

import lance
import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.index import HnswSq, IvfPq

from magiclens_core.search.filters import And, Comparison, Filter, InList, IsNull, Or, integer_ranges, normalise
from magiclens_core.search.memory_index import MemoryIndex

VECTOR = "vector"
CLIP_VECTOR = "clip_vector"
SEARCH_KEY = "magiclens:search"
DISTANCE = "cosine"
REJECTS_SUFFIX = "_rejects"

PRIMARY_KEY = "lance-schema:unenforced-primary-key"  # Lance's field metadata for the columns of the key
COMMIT_ATTEMPTS = 8  # tries of one write whose commit meets concurrent writers' commits

VectorDType = Literal["float32", "float16"]
T = TypeVar("T")

_VALUE_TYPES = {"float32": pa.float32(), "float16": pa.float16()}
_KEY = {PRIMARY_KEY: "true"}
_CONFLICTS = ("commit conflict", "incompatible transaction", "concurrent writers")  # in LanceDB's errors

REJECTS_SCHEMA = pa.schema([
    pa.field("id", pa.string()),       # content hash when the bytes could be read, else null
    pa.field("uri", pa.string()),
    pa.field("reason", pa.string(), nullable=False, metadata=_KEY),  # empty, not_an_image, corrupt, ...
    pa.field("detail", pa.string()),
    pa.field("key", pa.string(), nullable=False, metadata=_KEY),     # the uri, else `id:ID`
])


class IndexKind(str, Enum):
    """A vector index kind. `ImageTable.create_index` builds `IVF_HNSW_SQ` and `IVF_PQ`; `AUTO` (by table
    size) and `NONE` (exact search) are choices for `magiclens_core.search.index_policy.index_table`."""

    AUTO = "auto"
    IVF_HNSW_SQ = "ivf_hnsw_sq"
    IVF_PQ = "ivf_pq"
    NONE = "none"

    def __str__(self) -> str:
        return self.value


_LISTED_KINDS = {"IvfHnswSq": IndexKind.IVF_HNSW_SQ, "IvfPq": IndexKind.IVF_PQ}  # LanceDB's index type names


def image_schema(dim: int, vector_dtype: VectorDType = "float32", clip_dim: int | None = None,
                 metadata: pa.Schema | None = None) -> pa.Schema:
    """The image table's schema: fixed columns, the vector column(s), then carried metadata columns."""
    value = _VALUE_TYPES[vector_dtype]
    fields = [
        pa.field("id", pa.string(), nullable=False, metadata=_KEY),
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
    search on `queries` tuning queries (`index_policy.tuning_queries`) when the parameters were tuned.
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


def _is_commit_conflict(error: Exception) -> bool:
    return any(marker in str(error).lower() for marker in _CONFLICTS)


def _committed(table: Any, write: Callable[[], T]) -> T:
    """`write()`, run again on the table's latest version (after a short random wait) when its commit meets a
    concurrent writer's commit; every write given here is one that may be redone."""
    for attempt in range(COMMIT_ATTEMPTS - 1):
        try:
            return write()
        except (RuntimeError, OSError) as error:
            if not _is_commit_conflict(error):
                raise
        time.sleep(random.uniform(0.0, 0.05 * 2**attempt))
        table.checkout_latest()
    return write()


def _open_or_create(db: lancedb.DBConnection, uri: str, name: str, schema: pa.Schema) -> Any:
    """Table `name`, created empty with `schema` when there is none. The creation commits the dataset's first
    version or fails (LanceDB's `create_table` may instead overwrite a table created a moment before), so a
    writer that loses a race to create it opens the winner's table."""
    try:
        return db.open_table(name)
    except (ValueError, FileNotFoundError):
        pass
    try:
        lance.LanceDataset.commit(f"{uri.rstrip('/')}/{name}.lance", lance.LanceOperation.Overwrite(schema, []),
                                  max_retries=0)
    except OSError as error:  # created by another writer meanwhile, or the location is unusable
        try:
            return db.open_table(name)
        except (ValueError, FileNotFoundError):
            raise error from None
    return db.open_table(name)


class TableVersion:
    """One version of the image table as searches read it: its Lance dataset handle (kept open, so its caches
    live on), schema and stored search parameters, read once."""

    def __init__(self, dataset: lance.LanceDataset) -> None:
        self.dataset = dataset
        self.version: int = dataset.version
        self.schema: pa.Schema = dataset.schema
        self.params = {column: _stored_params(self.schema, column) for column in (VECTOR, CLIP_VECTOR)
                       if column in self.schema.names}

    def moved_to(self, version: int) -> TableVersion:
        """This table at `version` (itself when it is there), sharing the dataset's caches."""
        return self if version == self.version else TableVersion(self.dataset.checkout_version(version))

    def ids(self) -> np.ndarray:
        """Every row's id, in scan order, as a numpy bytes array."""
        parts = [batch.column(0).to_numpy(zero_copy_only=False).astype(np.bytes_)
                 for batch in self.dataset.to_batches(columns=["id"]) if batch.num_rows]
        return np.concatenate(parts) if parts else np.array([], dtype="S1")

    def unit_vectors(self, column: str, offset: int = 0, batch_rows: int = 65_536) -> Iterator[np.ndarray]:
        """The column's vectors of the rows from position `offset` on, L2 normalised float32, in batches."""
        rows = self.dataset.count_rows()
        for first in range(offset, rows, batch_rows):
            batch = self.dataset.to_table(columns=[column], offset=first, limit=min(batch_rows, rows - first))
            yield _unit_rows(_column_matrix(batch.column(0)))

    def keeps(self, where: str) -> np.ndarray:
        """Whether each row satisfies the SQL predicate `where` (NULL: not), in scan order."""
        kept = self.dataset.to_table(columns={"keep": where}).column(0)
        return pc.fill_null(kept, False).to_numpy(zero_copy_only=False).astype(bool)

    def take(self, positions: np.ndarray, columns: list[str] | None) -> pa.Table:
        """The rows at these positions of the scan order, in that order."""
        return self.dataset.take(positions, columns=columns)


def _stored_params(schema: pa.Schema, column: str) -> SearchParams:
    raw = (schema.field(column).metadata or {}).get(SEARCH_KEY.encode())
    return SearchParams.from_json(raw.decode()) if raw else SearchParams()


class ImageTable:
    """One LanceDB table of image embeddings (and its rejects table).

    Reads go through a `TableVersion` of the handle's version, kept until a write or `refresh` moves the
    handle. `memory_index="faiss"` holds a faiss HNSW graph of the `vector` column in memory beside the table
    (`magiclens_core.search.memory_index`), built when the table is opened and kept in step with its versions
    by `refresh` and by this handle's writes; approximate searches of `vector` then use it, and the rows they
    return are read from the table.
    """

    def __init__(self, db: lancedb.DBConnection, table: Any, name: str, memory_index: str | None = None) -> None:
        self._db = db
        self._table = table
        self.name = name
        self._keyed = False
        self._read = TableVersion(table.to_lance())
        self._memory: MemoryIndex | None = None
        if memory_index == "faiss":
            self._memory = MemoryIndex(VECTOR)
            self._memory.follow(self._read)
        elif memory_index is not None:
            raise ValueError(f"no memory index {memory_index!r}; expected 'faiss' or None")

    def _moved(self) -> None:
        """Move the reads (and the memory index) to the version the handle is at now."""
        self._read = self._read.moved_to(self._table.version)
        if self._memory is not None:
            self._memory.follow(self._read)

    # ------------------------------------------------------------------ open / create

    @classmethod
    def open(cls, uri: str, name: str, memory_index: str | None = None) -> ImageTable:
        """An existing table; `FileNotFoundError` naming it when there is none. `memory_index`: see the class."""
        db = _connect(uri)
        try:
            table = db.open_table(name)
        except (ValueError, FileNotFoundError) as err:
            raise FileNotFoundError(f"no table {name!r} in {uri}") from err
        return cls(db, table, name, memory_index)

    @classmethod
    def create(cls, uri: str, name: str, schema: pa.Schema) -> ImageTable:
        """Open `name` if it exists (its vector columns must match `schema`), else create it empty; of writers
        creating it at once, one creates it and the others open it."""
        db = _connect(uri)
        table = cls(db, _open_or_create(db, uri, name, schema), name)
        for column in (VECTOR, CLIP_VECTOR):
            wanted = schema.field(column).type if column in schema.names else None
            have = table.schema.field(column).type if column in table.schema.names else None
            if wanted is not None and wanted != have:
                raise ValueError(f"table {name!r} has {column} of type {have}, this run writes {wanted}; "
                                 "use another table or the same model and vector options")
        return table

    @property
    def schema(self) -> pa.Schema:
        return self._read.schema

    @property
    def dim(self) -> int:
        return self.schema.field(VECTOR).type.list_size

    @property
    def uri(self) -> str:
        """The table's own location (a `.lance` dataset readable by `lance.dataset`)."""
        return self._table.uri

    @property
    def memory_index(self) -> MemoryIndex | None:
        """The graph held beside the table (None without `memory_index=`)."""
        return self._memory

    @property
    def version(self) -> int:
        """The version this handle reads."""
        return self._read.version

    def count(self) -> int:
        return self._read.dataset.count_rows()

    def refresh(self) -> None:
        """See rows committed by other writers since this handle was opened (or last refreshed)."""
        self._table.checkout_latest()
        self._moved()

    # ------------------------------------------------------------------ rows

    def ids(self) -> np.ndarray:
        """Every id in the table, sorted, as a numpy bytes array (for `np.searchsorted` membership tests)."""
        return np.sort(self._read.ids())

    def add(self, rows: pa.Table | dict[str, Any]) -> int:
        """Insert the rows whose id the table does not hold yet, in one commit (one table version); returns
        how many went in.

        `rows` is an Arrow table or a dict of columns (vectors as [N, D] numpy matrices). Columns are cast
        to the table's schema (float32 vectors land in a float16 table as float16); missing ones are null.
        An id repeated in `rows`, or committed meanwhile by another writer, goes in once.
        """
        if isinstance(rows, dict):
            rows = pa.table({name: _vectors_to_arrow(value, pa.float32()) if isinstance(value, np.ndarray)
                             and value.ndim == 2 else value for name, value in rows.items()})
        if rows.num_rows == 0:
            return 0
        schema = self.schema
        columns = [rows.column(target.name).cast(target.type) if target.name in rows.column_names
                   else pa.nulls(rows.num_rows, target.type) for target in schema]
        self._declare_key()
        inserted = _insert_new(self._table, pa.Table.from_arrays(columns, schema=schema), ["id"])
        self._moved()
        return inserted

    def _declare_key(self) -> None:
        """Declare `id` the primary key of a table made before it was (what makes concurrent merges safe)."""
        if not self._keyed and PRIMARY_KEY.encode() not in (self.schema.field("id").metadata or {}):
            _committed(self._table, lambda: self._table.update_field_metadata({"path": "id", "metadata": _KEY}))
            self._moved()
        self._keyed = True

    def scan(self, columns: list[str], batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
        """Stream the table's rows (chosen columns) in record batches."""
        yield from self._read.dataset.to_batches(columns=columns, batch_size=batch_rows)

    def get(self, ids: list[str], columns: list[str] | None = None) -> pa.Table:
        """The rows with these ids (any order; unknown ids are simply absent)."""
        if not ids:
            return self.schema.empty_table().select(columns) if columns else self.schema.empty_table()
        listed = ", ".join(_sql_string(value) for value in ids)
        return self._read.dataset.to_table(columns=columns, filter=f"id IN ({listed})")

    def head(self, limit: int, offset: int = 0, columns: list[str] | None = None) -> pa.Table:
        """`limit` rows from position `offset`, in storage order (for browsing the table)."""
        return self._read.dataset.to_table(columns=columns, offset=offset, limit=limit)

    def sample(self, count: int, column: str = VECTOR, seed: int = 0) -> tuple[list[str], np.ndarray]:
        """Ids and stored vectors of `count` random rows (fewer when the table is smaller)."""
        dataset = self._read.dataset
        rows = dataset.count_rows()
        chosen = np.sort(np.random.default_rng(seed).choice(rows, size=min(count, rows), replace=False))
        taken = dataset.take(chosen, columns=["id", column])
        return taken.column("id").to_pylist(), _column_matrix(taken.column(column))

    # ------------------------------------------------------------------ search

    def search_params(self, column: str = VECTOR) -> SearchParams:
        """The stored search parameters of a vector column (exact search when none are stored)."""
        read = self._read
        return read.params[column] if column in read.params else _stored_params(read.schema, column)

    def search(self, vector: np.ndarray, k: int = 10, filter: str | Filter | None = None, column: str = VECTOR,
               select: list[str] | None = None, exact: bool = False,
               params: SearchParams | None = None) -> pa.Table:
        """The k nearest rows to `vector` (cosine), best first, with a `_distance` column (only the `select`ed
        columns and `_distance` when `select` is given).

        Uses the column's stored tuned parameters unless `params` is given; `exact=True` scans all rows. With
        a memory index, approximate searches of `vector` use its graph (and its own tuned breadth) instead.
        `filter` is a SQL predicate over the table's columns, or a parsed `magiclens_core.search.filters.Filter`
        (applied before the vector search).
        """
        read = self._read
        where = filter if isinstance(filter, str) or filter is None else filter_sql(filter, read.schema)
        columns = None if select is None else [name for name in select if name != "_distance"]
        query = np.asarray(vector, dtype=np.float32)
        if self._memory is not None and column == VECTOR and not exact:
            found = self._memory.search(_unit_rows(query.reshape(1, -1)), k, where or None)
            rows = (pa.table({"id": pa.array(found.ids, pa.string())}) if columns == ["id"]  # ids: held by the graph
                    else found.table.take(found.positions, columns))
            return rows.append_column("_distance", pa.array(found.distances, pa.float32()))
        params = params or self.search_params(column)
        nearest: dict[str, Any] = {"column": column, "q": query, "k": k, "metric": DISTANCE}
        if exact or params.index_type is None:
            nearest["use_index"] = False
        else:
            nearest.update({name: value for name, value in (
                ("nprobes", params.nprobes), ("refine_factor", params.refine_factor),
                # HNSW must explore at least the candidates asked of it (k, times the refine factor)
                ("ef", params.ef and max(params.ef, k * (params.refine_factor or 1)))) if value})
        return read.dataset.to_table(nearest=nearest, columns=None if columns is None else [*columns, "_distance"],
                                     filter=where or None, prefilter=True)

    def exact_neighbors(self, queries: np.ndarray, k: int = 10, column: str = VECTOR,
                        batch_rows: int = 65_536) -> np.ndarray:
        """Ids [Q, k] of the exact cosine nearest neighbours, by one streaming pass over the table."""
        return self.exact_nearest(queries, k, column, batch_rows)[0]

    def exact_nearest(self, queries: np.ndarray, k: int = 10, column: str = VECTOR,
                      batch_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
        """Ids and cosine similarities [Q, k] of the exact nearest neighbours, best first, by one streaming
        pass over the table."""
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
        return np.take_along_axis(best_ids, order, axis=1), np.take_along_axis(best_scores, order, axis=1)

    # ------------------------------------------------------------------ index

    def index_kind(self, column: str = VECTOR) -> IndexKind | None:
        """The kind of the column's vector index (None when it has none, or one of a kind not built here)."""
        for index in self._table.list_indices():
            if column in index.columns:
                return _LISTED_KINDS.get(index.index_type)
        return None

    def create_index(self, kind: IndexKind, column: str = VECTOR, **build: int) -> None:
        """Train a vector index of `kind` on the column with these build parameters, replacing any."""
        configs = {IndexKind.IVF_PQ: IvfPq, IndexKind.IVF_HNSW_SQ: HnswSq}
        if kind not in configs:
            raise ValueError(f"no index of kind {kind!r} to build; expected ivf_pq or ivf_hnsw_sq")
        config = configs[kind](distance_type=DISTANCE, **build)
        _committed(self._table, lambda: self._table.create_index(column, config=config, replace=True))
        self._moved()

    def store_search_params(self, column: str, params: SearchParams) -> None:
        """Store how to search the column in its field metadata, where every reader finds it."""
        update = {"path": column, "metadata": {SEARCH_KEY: params.to_json()}}
        _committed(self._table, lambda: self._table.update_field_metadata(update))
        self._moved()

    def update_index(self) -> None:
        """Fold rows appended since the indexes were built into them, and compact small appends."""
        _committed(self._table, self._table.optimize)
        self._moved()

    # ------------------------------------------------------------------ model and rejects

    def check_model(self, model_id: str | None) -> None:
        """Raise `ValueError` when the table's rows were embedded by another model than `model_id`."""
        if self.count() == 0:
            return
        stored = self._read.dataset.take([0], columns=["model_id"]).column("model_id")[0].as_py()
        if stored != model_id:
            raise ValueError(f"table {self.name!r} holds embeddings of model {stored!r}, not {model_id!r}; "
                             "index into another table or use the same model")

    @staticmethod
    def rejects_of(uri: str, name: str) -> RejectsTable:
        """The `NAME_rejects` table beside table `name` (created when missing)."""
        return RejectsTable(_open_or_create(_connect(uri), uri, name + REJECTS_SUFFIX, REJECTS_SCHEMA))


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, str):
        return _sql_string(value)
    if value == -(2**63):  # written out, it is read as minus a literal that overflows int64
        return f"({value + 1} - 1)"
    return repr(value)


def filter_sql(tree: Filter, schema: pa.Schema) -> str:
    """A parsed filter over a table of `schema` as a LanceDB SQL predicate, normalised first (no `NOT` above a
    condition, integer columns compared with integers they can hold); every column name and value is quoted by
    this function."""
    return _predicate_sql(normalise(tree, integer_ranges(schema)))


def _predicate_sql(tree: Filter) -> str:
    if isinstance(tree, Comparison):
        return f"`{tree.column}` {tree.op} {_sql_value(tree.value)}"
    if isinstance(tree, InList) and tree.negated:  # LanceDB takes `c NOT IN (a) OR c NOT IN (b)` for TRUE, NULLs too
        return " AND ".join(f"`{tree.column}` != {_sql_value(value)}" for value in tree.values)
    if isinstance(tree, InList):
        return f"`{tree.column}` IN ({', '.join(_sql_value(value) for value in tree.values)})"
    if isinstance(tree, IsNull):
        return f"`{tree.column}` IS {'NOT ' if tree.negated else ''}NULL"
    assert isinstance(tree, (And, Or)), "normalise leaves no NOT above a condition"
    if not tree.items:
        return "TRUE" if isinstance(tree, And) else "FALSE"
    joiner = " AND " if isinstance(tree, And) else " OR "
    return joiner.join(f"({_predicate_sql(item)})" if isinstance(item, (And, Or)) or (
        isinstance(item, InList) and item.negated and len(item.values) > 1) else _predicate_sql(item)
        for item in tree.items)


def _primary_key(schema: pa.Schema) -> list[str]:
    """The columns of the table's primary key, in schema order (a merge on them in another order is not
    checked against concurrent merges)."""
    return [field.name for field in schema if PRIMARY_KEY.encode() in (field.metadata or {})]


def _insert_new(table: Any, rows: pa.Table, key: list[str]) -> int:
    """Insert in one commit the rows whose `key` the table does not hold (the first of rows sharing one);
    returns how many went in. Lance's own merge (several times faster than LanceDB's wrapper of it on
    tables of a million rows) joins them to the table's keys."""
    rows = _first_of_each(rows, key)

    def merge() -> int:
        return table.to_lance().merge_insert(key).when_not_matched_insert_all().execute(rows)["num_inserted_rows"]

    inserted = _committed(table, merge)
    table.checkout_latest()
    return inserted


def _first_of_each(rows: pa.Table, key: list[str]) -> pa.Table:
    """The rows whose `key` columns' values come first in `rows` (a merge inserts every unmatched row)."""
    seen: set[tuple] = set()
    keep = []
    for position, value in enumerate(zip(*(rows.column(name).to_pylist() for name in key), strict=True)):
        if value not in seen:
            seen.add(value)
            keep.append(position)
    return rows if len(keep) == rows.num_rows else rows.take(keep)


class RejectsTable:
    """The `NAME_rejects` table: one row per (uri, reason), per (id, reason) for an image given as bytes
    without a uri, however many runs record them, one after another or at once."""

    def __init__(self, table: Any) -> None:
        self._table = table

    def add_new(self, rows: pa.Table) -> int:
        """Record the rows (`uri`, `reason`, `id`, `detail`) not recorded yet; returns how many were added."""
        if rows.num_rows == 0:
            return 0
        columns = {name: rows.column(name).cast(pa.string()) if name in rows.column_names
                   else pa.nulls(rows.num_rows, pa.string()) for name in ("id", "uri", "reason", "detail")}
        columns["key"] = pa.array([uri if uri is not None else f"id:{image_id}" if image_id is not None else ""
                                   for uri, image_id in zip(columns["uri"].to_pylist(), columns["id"].to_pylist(),
                                                            strict=True)], pa.string())
        schema = self._table.schema
        key = _primary_key(schema) or ["uri", "reason"]  # a table made before it had a key: (uri, reason)
        return _insert_new(self._table, pa.table([columns[name] for name in schema.names], schema=schema), key)


def table_exists(uri: str, name: str) -> bool:
    """Whether the database at `uri` holds a table `name`, creating nothing (connecting to a local folder
    that is not there would create it)."""
    if "://" not in uri or uri.startswith("file://"):
        folder = uri.removeprefix("file://")
        return os.path.isdir(os.path.join(folder, f"{name}.lance"))
    return name in _connect(uri).table_names()


def silence_fork_warnings() -> None:
    """Silence the warnings lance and lancedb give at every fork of a process that has them loaded: Ray
    starts its processes with fork and exec (`subprocess`), which replaces the child at once."""
    warnings.filterwarnings("ignore", message="lancedb fork support is experimental", category=RuntimeWarning)
    warnings.filterwarnings("ignore", message="lance is not fork-safe", category=UserWarning)
