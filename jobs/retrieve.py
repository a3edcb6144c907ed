"""Batch retrieval without the server: embed (image, instruction) queries with Ray Data, search the table.

    python -m jobs.retrieve --queries Q.parquet --model MODEL --db URI --table NAME --out R.parquet --k 50

`--queries` is a Parquet (or Lance) dataset with one row per query: the query image as `image` bytes or a
`uri`, an `instruction`, and optionally a `query_id` column (else the id is a hash of the image's uri or
bytes and the instruction). Image URIs are read only under the folder (or bucket) holding `--queries` and
the places given with `--allow-uri-prefix`; others are rejected (`uri_not_allowed`). Queries go through
the same stages as indexing (`jobs.stages.embed`: read, decode, `Embedder` actors) and are searched by a
pool of actors with the table's tuned parameters, as the server does, so both return the same ids for the
same query.

`--out` is a Parquet dataset (a folder of part files, read whole with `pyarrow.parquet.read_table(OUT)`) of
`query_id`, `uri`, `instruction`, `ids` (best first) and `scores` (cosine similarity). Resumable: each part
is written whole, and a rerun skips the query ids already in `--out`. Queries that cannot be used (image
unreadable, not allowed or not an image, instruction over 77 tokens) are listed with their reason in
`OUT/_rejects.parquet` (rewritten by every run). One run writes an `--out` at a time: a run holds an
exclusive lock on `OUT/_writer.lock` (naming its pid and host) while it writes, and a second run on the
same `--out` stops at once with an error naming the lock and its holder, so no query is answered twice.
The lock is the kernel's (`flock`), released when its run ends or dies, so no stale lock survives a crash;
it needs a local or shared (POSIX) filesystem, and on object storage one run per `--out` is up to the user.
The last line printed is a JSON summary.
"""

import hashlib
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

import magiclens_core  # its describe_model is imported on first use: worker processes here need no model
from jobs.common import Demand, require_model, require_paths, require_table, run_job
from jobs.stages.embed import (
    DETAIL,
    EMBEDDING,
    NEW,
    PRESENT,
    REASON,
    REJECTED,
    STATUS,
    EmbedOptions,
    check_instructions,
    embed_images,
    embedding_demand,
    read_images,
)
from jobs.stages.pools import actor_pool
from jobs.stages.sources import source_dataset
from jobs.writer_lock import WriterLock
from magiclens_core.images.sources import UriPolicy, filesystem_of
from magiclens_core.search.filters import Filter, column_kinds, parse_filter
from magiclens_core.search.store import ImageTable

OUTPUT_COLUMNS = ("query_id", "uri", "instruction", "ids", "scores")
REJECT_COLUMNS = ("query_id", "uri", "instruction", "reason", "detail")
REJECTS_FILE = "_rejects.parquet"  # a leading underscore keeps it out of the dataset when OUT is read


@dataclass(kw_only=True)
class RetrieveConfig(EmbedOptions):
    queries: str = field(metadata={"help": "Parquet/Lance dataset: image (bytes) or uri, instruction, [query_id]"})
    db: str = field(metadata={"help": "LanceDB URI"})
    table: str = field(metadata={"help": "image table to search (indexed with --model)"})
    out: str = field(metadata={"help": "output Parquet dataset (folder); reruns skip the queries it holds"})
    k: int = field(default=50, metadata={"help": "results per query"})
    filter: str | None = field(default=None, metadata={"help": "metadata filter, as the server's `filter`"})
    id_column: str = field(default="query_id", metadata={"help": "column of query ids (hashed when absent)"})
    allow_uri_prefix: list[str] = field(default_factory=list, metadata={
        "help": "also read query image URIs under these folders or URI prefixes; by default only "
                "the queries' own folder or bucket"})
    source_format: Literal["auto", "parquet", "lance"] = "auto"
    search_workers: int = field(default=2, metadata={"help": "table-searching actors"})
    cpus_per_search_worker: float = field(default=0.5, metadata={"help": "CPUs reserved per search actor"})
    commit_rows: int = field(default=1024, metadata={"help": "queries per output part file"})


def query_id(source: bytes | str, instruction: str) -> str:
    """The id of a query without one: a 128-bit hash of its image (uri or bytes) and its instruction."""
    data = source.encode() if isinstance(source, str) else source
    return hashlib.blake2b(data + b"\x00" + instruction.encode(), digest_size=16).hexdigest()


def _add_query_ids(batch: pa.Table, id_column: str) -> pa.Table:
    sources = (batch.column("image") if "image" in batch.column_names else batch.column("uri")).to_pylist()
    ids = [query_id(source or b"", instruction or "")
           for source, instruction in zip(sources, batch.column("instruction").to_pylist(), strict=True)]
    return batch.append_column(id_column, pa.array(ids, pa.string()))


class SearchWorker:
    """One table handle per actor: the k nearest images of each embedded query."""

    def __init__(self, db: str, table: str, k: int, where: Filter | None, id_column: str) -> None:
        self.table = ImageTable.open(db, table)
        self.params = self.table.search_params()
        self.k, self.where, self.id_column = k, where, id_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        status = batch.column(STATUS).to_pylist()
        vectors = batch.column(EMBEDDING).combine_chunks()
        ids: list[list[str] | None] = [None] * batch.num_rows
        scores: list[list[float] | None] = [None] * batch.num_rows
        for row in np.nonzero(np.array(status) == NEW)[0]:
            vector = np.asarray(vectors[int(row)].values.to_numpy(zero_copy_only=False), dtype=np.float32)
            found = self.table.search(vector, self.k, self.where, select=["id"], params=self.params)
            ids[row] = found.column("id").to_pylist()
            scores[row] = (1.0 - pc.cast(found.column("_distance"), pa.float64()).to_numpy()).tolist()
        return pa.table({
            "query_id": batch.column(self.id_column).cast(pa.string()),
            "uri": batch.column("uri"),
            "instruction": batch.column("instruction"),
            "ids": pa.array(ids, pa.list_(pa.string())),
            "scores": pa.array(scores, pa.list_(pa.float32())),
            "status": batch.column(STATUS), "reason": batch.column(REASON), "detail": batch.column(DETAIL),
        })


class Output:
    """The output dataset: ids already answered, whole part files, the rejects file; a context manager that
    holds the folder for one writer (`WriterLock`: a lock on a local or shared filesystem, a lease in object
    storage) from its start to its end."""

    def __init__(self, uri: str) -> None:
        self.filesystem, self.root = filesystem_of(uri)
        self.filesystem.create_dir(self.root, recursive=True)
        self.run = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.parts = 0
        self.lock = WriterLock(uri, "jobs.retrieve")

    def __enter__(self) -> "Output":
        self.lock.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.__exit__(*exc)

    def done_ids(self) -> np.ndarray:
        """Query ids already written, sorted, as numpy bytes (the form `read_images` skips)."""
        files = [info.path for info in self.filesystem.get_file_info(pafs.FileSelector(self.root))
                 if info.base_name.endswith(".parquet") and not info.base_name.startswith(("_", "."))]
        parts = [pq.read_table(path, columns=["query_id"], filesystem=self.filesystem).column(0)
                 .to_numpy(zero_copy_only=False).astype(np.bytes_) for path in files]
        return np.sort(np.concatenate(parts)) if parts else np.array([], dtype="S1")

    def _write(self, name: str, table: pa.Table) -> None:
        final = f"{self.root}/{name}"
        temporary = f"{self.root}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        pq.write_table(table, temporary, filesystem=self.filesystem)
        self.filesystem.move(temporary, final)

    def add(self, rows: pa.Table) -> None:
        self.lock.check()
        self._write(f"part-{self.run}-{self.parts:05d}.parquet", rows.select(list(OUTPUT_COLUMNS)))
        self.parts += 1

    def write_rejects(self, rows: list[pa.Table]) -> None:
        schema = pa.schema([pa.field(name, pa.string()) for name in REJECT_COLUMNS])
        table = pa.concat_tables([row.select(list(REJECT_COLUMNS)).cast(schema) for row in rows]) if rows \
            else schema.empty_table()
        self._write(REJECTS_FILE, table)


def run(config: RetrieveConfig) -> dict:
    """Retrieve for every query not yet in `--out`, holding `--out`'s lock meanwhile; the summary."""
    with Output(config.out) as output:
        return _retrieve(config, output)


def _retrieve(config: RetrieveConfig, output: Output) -> dict:
    started = time.perf_counter()
    table = ImageTable.open(config.db, config.table)
    where = parse_filter(config.filter, column_kinds(table.schema)) if config.filter else None
    info = magiclens_core.describe_model(config.model)
    table.check_model(info.model_id)
    done = output.done_ids()
    listing = source_dataset(config.queries, config.source_format)
    dataset = listing.dataset
    names = dataset.schema().names
    if "instruction" not in names:
        raise ValueError(f"{config.queries}: queries need an `instruction` column; it has {names}")
    if config.id_column not in names:
        dataset = dataset.map_batches(_add_query_ids, batch_format="pyarrow", fn_kwargs={"id_column": config.id_column})
    policy = UriPolicy.allowing([*listing.roots, *config.allow_uri_prefix])
    dataset = read_images(dataset, done, config.id_column, policy)
    if not config.truncate_instructions:
        dataset = check_instructions(dataset, "instruction")
    dataset = embed_images(dataset, config, info.image_size, role="query", instruction_column="instruction")
    dataset = dataset.map_batches(
        SearchWorker, fn_constructor_kwargs={"db": config.db, "table": config.table, "k": config.k, "where": where,
                                             "id_column": config.id_column},
        batch_format="pyarrow", batch_size=config.batch_size,
        compute=actor_pool(config.search_workers), num_cpus=config.cpus_per_search_worker)
    counts = {"queries_searched": 0, "already_done": 0, "rejected": 0}
    rejects: list[pa.Table] = []
    last_report = time.perf_counter()
    for batch in dataset.iter_batches(batch_size=config.commit_rows, batch_format="pyarrow", prefetch_batches=1):
        status = batch.column("status")
        searched = batch.filter(pc.equal(status, NEW))
        if searched.num_rows:
            output.add(searched)
        rejects.append(batch.filter(pc.equal(status, REJECTED)))
        counts["queries_searched"] += searched.num_rows
        counts["rejected"] += rejects[-1].num_rows
        counts["already_done"] += pc.sum(pc.equal(status, PRESENT)).as_py() or 0
        if time.perf_counter() - last_report > 10:
            last_report = time.perf_counter()
            print(f"[retrieve] {counts}", file=sys.stderr, flush=True)
    output.write_rejects(rejects)
    seconds = time.perf_counter() - started
    return {**counts, "k": config.k, "out": config.out, "seconds": round(seconds, 2),
            "queries_per_s": round(counts["queries_searched"] / seconds, 2) if seconds > 0 else None}


def demand(config: RetrieveConfig) -> Demand:
    """The embedding stages' reservation plus the search actors'."""
    return embedding_demand(config, config.search_workers * config.cpus_per_search_worker,
                            "--search-workers or --cpus-per-search-worker")


def check_inputs(config: RetrieveConfig) -> None:
    """The queries, the model and the table exist (before Ray starts)."""
    require_paths(config, "queries")
    require_model(config.model)
    require_table(config.db, config.table)


def main(argv: list[str] | None = None) -> dict:
    """Parse options, check the inputs, connect to Ray, retrieve, print and return the summary."""
    return run_job(RetrieveConfig, run, argv, __doc__.splitlines()[0], "python -m jobs.retrieve",
                   demand=demand, check_inputs=check_inputs)


if __name__ == "__main__":
    main()
    ray.shutdown()
