"""Index an image pool: embed every image with MagicLens into a LanceDB table, then build and tune its ANN index.

    python -m jobs.index --images SRC --model MODEL --db URI --table NAME [options]

Resumable and idempotent: ids already in the table are skipped before decoding, results stream back to
this driver and are committed in batches (one LanceDB version each) that insert only ids the table does
not hold, so a rerun after a kill at any point, or runs at the same time on one table, end with exactly
one row per good image. Image URIs are read only under the source's own folder (or bucket) and the places
given with `--allow-uri-prefix`. Rejects go to `NAME_rejects`. The last line printed is a JSON summary.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import ray

import magiclens_core  # its describe_model is imported on first use: worker processes here need no model
from jobs.common import require_model, require_paths, run_job
from jobs.stages.embed import (
    CLIP_EMBEDDING,
    DETAIL,
    EMBEDDING,
    HEIGHT,
    ID,
    MODEL_ID,
    NEW,
    PRESENT,
    REASON,
    REJECTED,
    STATUS,
    WIDTH,
    EmbedOptions,
    embed_images,
    embedding_demand,
    read_images,
    user_columns,
)
from jobs.stages.sources import IMAGE_EXTENSIONS, SourceFormat, source_dataset
from magiclens_core.images.sources import UriPolicy
from magiclens_core.search.index_policy import index_table
from magiclens_core.search.store import CLIP_VECTOR, VECTOR, ImageTable, IndexKind, image_schema, metadata_fields

# the image table's own columns, from the embedding stages' working columns (the rest is carried metadata)
TABLE_COLUMNS = {"id": ID, "width": WIDTH, "height": HEIGHT, VECTOR: EMBEDDING, "model_id": MODEL_ID,
                 CLIP_VECTOR: CLIP_EMBEDDING}


@dataclass(kw_only=True)
class IndexConfig(EmbedOptions):
    images: str = field(metadata={"help": "folder, glob, text file of paths/URIs, or Parquet/Lance dataset"})
    db: str = field(metadata={"help": "LanceDB URI (a local folder or object storage)"})
    table: str = field(metadata={"help": "table name; rejects go to NAME_rejects"})
    source_format: SourceFormat = field(default="auto", metadata={"help": "how to read --images"})
    id_column: str | None = field(default=None, metadata={"help": "source column holding ids (else content hash)"})
    allow_uri_prefix: list[str] = field(default_factory=list, metadata={
        "help": "also read image URIs under these folders or URI prefixes; by default only the "
                "source's own folder or bucket"})
    extensions: list[str] = field(default_factory=lambda: list(IMAGE_EXTENSIONS),
                                  metadata={"help": "file name endings indexed from a folder or glob"})
    vector_dtype: Literal["float32", "float16"] = "float32"
    commit_rows: int = field(default=2048, metadata={"help": "rows per table commit"})
    index: IndexKind = field(default=IndexKind.AUTO, metadata={"help": "vector index (auto: by table size)"})
    index_min_rows: int = field(default=20_000, metadata={"help": "below this, auto keeps exact search"})
    index_partitions: int | None = field(default=None, metadata={"help": "IVF partitions (default: by size)"})
    index_sub_vectors: int | None = field(default=None, metadata={"help": "PQ sub-vectors (default: dim/4)"})
    target_recall: float = field(default=0.95, metadata={"help": "recall@10 the tuned search must reach"})
    tune_queries: int = field(default=100, metadata={"help": "queries when tuning the search index"})

    def __post_init__(self) -> None:
        self.index = IndexKind(self.index)  # from a config file it is text; a bad value stops the job here


def check_metadata_columns(names: list[str], id_column: str | None) -> None:
    """Refuse a source whose columns would be the image table's own (its `id` only as `--id-column id`)."""
    clashes = [name for name in names if name in TABLE_COLUMNS and not (name == "id" and id_column == "id")]
    if clashes:
        hint = "; pass --id-column id to use its `id` column as the ids" if "id" in clashes else ""
        raise SystemExit(f"error: source column(s) {clashes} are columns the image table fills itself: "
                         f"rename them{hint}")


def _table_rows(batch: pa.Table) -> pa.Table:
    """Stage output rows as image table rows: its own columns, then the source's columns as metadata."""
    own = {name: batch.column(column) for name, column in TABLE_COLUMNS.items() if column in batch.column_names}
    carried = {name: batch.column(name) for name in user_columns(batch) if name not in own}
    return pa.table({**own, **carried})


def _reject_rows(batch: pa.Table) -> pa.Table:
    return pa.table({"id": batch.column(ID), "uri": batch.column("uri"), "reason": batch.column(REASON),
                     "detail": batch.column(DETAIL)})


def _commit(table: ImageTable | None, config: IndexConfig, rows: pa.Table, seen: set[str]) -> tuple[ImageTable, int]:
    """Insert the new rows not committed earlier (by this run or another); creates the table on first use."""
    keep = []
    for position, image_id in enumerate(rows.column("id").to_pylist()):
        if image_id not in seen:
            seen.add(image_id)
            keep.append(position)
    rows = rows.take(keep)
    if table is None:
        vector = rows.schema.field(VECTOR).type
        schema = image_schema(vector.list_size, config.vector_dtype,
                              vector.list_size if config.clip_vector else None, metadata_fields(rows.schema))
        table = ImageTable.create(config.db, config.table, schema)
    return table, table.add(rows)


def _existing_table(config: IndexConfig, model_id: str) -> ImageTable | None:
    """The table to append to, if there is one; it must hold this model's vectors and the chosen columns."""
    try:
        table = ImageTable.open(config.db, config.table)
    except FileNotFoundError:
        return None
    table.check_model(model_id)
    if config.clip_vector and CLIP_VECTOR not in table.schema.names:
        raise SystemExit(f"error: table {config.table!r} has no {CLIP_VECTOR} column; index --clip-vector "
                         "runs into a new table")
    return table


def run(config: IndexConfig) -> dict:
    started = time.perf_counter()
    info = magiclens_core.describe_model(config.model)
    table = _existing_table(config, info.model_id)
    rejects = ImageTable.rejects_of(config.db, config.table)
    listing = source_dataset(config.images, config.source_format, tuple(config.extensions))
    check_metadata_columns(listing.dataset.schema().names, config.id_column)
    policy = UriPolicy.allowing([*listing.roots, *config.allow_uri_prefix])
    dataset = read_images(listing.dataset, table.ids() if table else None, config.id_column, policy)
    dataset = embed_images(dataset, config, info.image_size, role="target")
    counts = {"rows_added": 0, "rows_already_present": 0, "duplicates": 0, "rejected": 0, "rejects_recorded": 0}
    seen: set[str] = set()
    embed_start, last_report = time.perf_counter(), 0.0
    for batch in dataset.iter_batches(batch_size=config.commit_rows, batch_format="pyarrow", prefetch_batches=1):
        status = batch.column(STATUS)
        new = _table_rows(batch.filter(pc.equal(status, NEW)))
        table, added = _commit(table, config, new, seen) if new.num_rows else (table, 0)
        bad = _reject_rows(batch.filter(pc.equal(status, REJECTED)))
        counts["rows_added"] += added
        counts["duplicates"] += new.num_rows - added
        counts["rows_already_present"] += pc.sum(pc.equal(status, PRESENT)).as_py() or 0
        counts["rejected"] += bad.num_rows
        counts["rejects_recorded"] += rejects.add_new(bad)
        if time.perf_counter() - last_report > 10:
            last_report = time.perf_counter()
            print(f"[index] {counts}", file=sys.stderr, flush=True)
    embed_seconds = time.perf_counter() - embed_start
    index = {"type": None}
    if table is not None:
        index = index_table(table, config.index, added=counts["rows_added"], min_rows=config.index_min_rows,
                            target_recall=config.target_recall, queries=config.tune_queries,
                            partitions=config.index_partitions, sub_vectors=config.index_sub_vectors,
                            clip_vector=config.clip_vector)
    embedded = counts["rows_added"] + counts["duplicates"]
    return {
        **counts,
        "skipped_files": listing.skipped_files,
        "skipped": listing.skipped,
        "allowed_uri_prefixes": policy.prefixes(),
        "images_per_s": round(embedded / embed_seconds, 2) if embed_seconds > 0 else None,
        "table_rows": table.count() if table is not None else 0,
        "table_uri": table.uri if table is not None else None,
        "index": index,
        "seconds": round(time.perf_counter() - started, 2),
    }


def check_inputs(config: IndexConfig) -> None:
    """The images and the model exist (before Ray starts)."""
    require_paths(config, "images")
    require_model(config.model)


def main(argv: list[str] | None = None) -> dict:
    return run_job(IndexConfig, run, argv, __doc__.splitlines()[0], "python -m jobs.index",
                   demand=embedding_demand, check_inputs=check_inputs)


if __name__ == "__main__":
    main()
    ray.shutdown()
