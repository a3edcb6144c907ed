"""Index an image pool: embed every image with MagicLens into a LanceDB table, then build and tune its ANN index.

    python -m jobs.index --images SRC --model MODEL --db URI --table NAME [options]

Resumable and idempotent: ids already in the table are skipped before decoding, results stream back to
this driver and are committed in batches (one LanceDB version each), so a rerun after a kill at any
point ends with exactly one row per good image. Rejects go to `NAME_rejects`. The last line printed is
a JSON summary.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import ray

from jobs.common import run_job
from jobs.stages.embed import NEW, PRESENT, REJECTED, EmbedOptions, embed_images, model_info, read_images
from jobs.stages.sources import IMAGE_EXTENSIONS, SourceFormat, read_source
from magiclens_core.search.store import CLIP_VECTOR, VECTOR, ImageTable, image_schema, index_table, metadata_fields

OUTCOME_COLUMNS = ("status", "reason", "detail")


@dataclass(kw_only=True)
class IndexConfig(EmbedOptions):
    images: str = field(metadata={"help": "folder, glob, text file of paths/URIs, or Parquet/Lance dataset"})
    db: str = field(metadata={"help": "LanceDB URI (a local folder or object storage)"})
    table: str = field(metadata={"help": "table name; rejects go to NAME_rejects"})
    source_format: SourceFormat = field(default="auto", metadata={"help": "how to read --images"})
    id_column: str | None = field(default=None, metadata={"help": "source column holding ids (else content hash)"})
    extensions: list[str] = field(default_factory=lambda: list(IMAGE_EXTENSIONS),
                                  metadata={"help": "file name endings indexed from a folder or glob"})
    vector_dtype: Literal["float32", "float16"] = "float32"
    commit_rows: int = field(default=2048, metadata={"help": "rows per table commit"})
    index: Literal["auto", "none", "ivf_pq", "ivf_hnsw_sq"] = "auto"
    index_min_rows: int = field(default=20_000, metadata={"help": "below this, auto keeps exact search"})
    index_partitions: int | None = field(default=None, metadata={"help": "IVF partitions (default: by size)"})
    index_sub_vectors: int | None = field(default=None, metadata={"help": "PQ sub-vectors (default: dim/4)"})
    target_recall: float = field(default=0.95, metadata={"help": "recall@10 the tuned search must reach"})
    tune_queries: int = field(default=100, metadata={"help": "sample rows used as queries when tuning"})


def _commit(table: ImageTable | None, config: IndexConfig, rows: pa.Table, seen: set[str]) -> tuple[ImageTable, int]:
    """Append the new rows not committed earlier in this run; creates the table on first use."""
    keep = []
    for position, image_id in enumerate(rows.column("id").to_pylist()):
        if image_id not in seen:
            seen.add(image_id)
            keep.append(position)
    rows = rows.take(keep).drop_columns([*OUTCOME_COLUMNS])
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
    info = model_info(config.model)
    table = _existing_table(config, info["model_id"])
    rejects = ImageTable.rejects_of(config.db, config.table)
    listing = read_source(config.images, config.source_format, tuple(config.extensions))
    dataset = read_images(listing.dataset, table.ids() if table else None, config.id_column)
    dataset = embed_images(dataset, config, info["image_size"])
    counts = {"rows_added": 0, "rows_already_present": 0, "duplicates": 0, "rejected": 0, "rejects_recorded": 0}
    seen: set[str] = set()
    embed_start, last_report = time.perf_counter(), 0.0
    for batch in dataset.iter_batches(batch_size=config.commit_rows, batch_format="pyarrow", prefetch_batches=1):
        status = batch.column("status")
        new = batch.filter(pc.equal(status, NEW))
        table, added = _commit(table, config, new, seen) if new.num_rows else (table, 0)
        bad = batch.filter(pc.equal(status, REJECTED))
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
        "images_per_s": round(embedded / embed_seconds, 2) if embed_seconds > 0 else None,
        "table_rows": table.count() if table is not None else 0,
        "table_uri": table.uri if table is not None else None,
        "index": index,
        "seconds": round(time.perf_counter() - started, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    return run_job(IndexConfig, run, argv, __doc__.splitlines()[0], "python -m jobs.index")


if __name__ == "__main__":
    main()
    ray.shutdown()
