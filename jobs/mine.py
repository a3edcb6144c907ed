"""Mine (query image, instruction, target image) triplets from web pages with Ray Data.

    python -m jobs.mine --pages SRC [SRC...] --model MODEL --out DIR [--config mine.yaml] [options]

SRC: WARC (`.warc`, `.warc.gz`), WAT (`.wat`, `.wat.gz`), HTML files (`.html`, `.htm`) and JSONL pages
(`.jsonl`), given as files, folders (searched recursively) or globs, local or in object storage. Writes, to a
local or shared folder or to object storage, `DIR/triplets/` (Parquet parts that `jobs.train --triplets
DIR/triplets` reads), `DIR/rejects/` and the commit records `DIR/pages/`. `--captioner FOLDER` describes each
image with a `transformers` image-to-text model too (its caption in the triplets' `*_caption` columns, the
page's own in `*_page_caption`); a folder or name that is not there is a usage error before Ray starts.
Resumable by page: a rerun skips the pages already committed and writes no triplet twice. Progress on stderr;
the last line printed is a JSON summary.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs
import ray

from jobs.common import InputError, require_model, require_paths, run_job
from jobs.stages.mining import (
    REJECT_SCHEMA,
    STAGES,
    TRIPLET_SCHEMA,
    MiningOptions,
    SeenImages,
    mine_pages,
    mining_demand,
    read_page_files,
)
from jobs.stages.sources import GLOB_CHARACTERS, list_files
from jobs.writer_lock import WriterLock
from magiclens_core.images.sources import filesystem_of
from magiclens_core.mining.output import MiningOutput
from magiclens_core.mining.pages import PAGE_EXTENSIONS


@dataclass(kw_only=True)
class MineConfig(MiningOptions):
    pages: list[str] = field(metadata={"help": "WARC/WAT/HTML/JSONL files, folders or globs"})
    out: str = field(metadata={"help": "output folder (triplets/, rejects/, pages/): local, shared or in object "
                                       "storage"})
    instructions: Literal["template", "llm"] = field(
        default="template", metadata={"help": "template: from the metadata; llm: a text-generation model"})
    commit_pages: int = field(default=64, metadata={"help": "pages per output commit"})


def list_page_files(sources: list[str]) -> tuple[list[str], tuple[str, ...], dict[str, int]]:
    """The page files the sources name (sorted, each once), the local folders their images may be read
    from (each source's folder), and the entries passed over by reason."""
    files, roots, skipped = [], [], Counter()
    for source in sources:
        filesystem, path = filesystem_of(source)
        is_file = not any(char in source for char in GLOB_CHARACTERS) and \
            filesystem.get_file_info(path).type == pafs.FileType.File
        if is_file:
            files.append(source)
        else:
            found, passed_over = list_files(source, PAGE_EXTENSIONS)
            if not found and not passed_over:
                raise SystemExit(f"error: no page files at {source}")
            files.extend(found)
            skipped.update(passed_over)
        if isinstance(filesystem, pafs.LocalFileSystem):
            globbed = [source.index(char) for char in GLOB_CHARACTERS if char in source]
            base = os.path.dirname(path) if is_file else os.path.dirname(source[:min(globbed)]) if globbed else path
            roots.append(os.path.abspath(base))
    return sorted(dict.fromkeys(files)), tuple(dict.fromkeys(roots)), dict(skipped)


def _flatten(column: pa.ChunkedArray, schema: pa.Schema) -> pa.Table:
    values = pa.concat_arrays([chunk.flatten() for chunk in column.chunks]) if column.num_chunks else None
    if values is None or not len(values):
        return schema.empty_table()
    return pa.Table.from_struct_array(values).cast(schema)


def run(config: MineConfig) -> dict:
    """Mine the pages not yet committed to `--out`, holding `--out` for this run meanwhile (`WriterLock`: a
    second run on the same folder is refused at once, since its clean-up of uncommitted parts would remove
    this run's); the summary."""
    with WriterLock(config.out, "jobs.mine") as lock:
        return _mine(config, lock)


def _mine(config: MineConfig, lock: WriterLock) -> dict:
    started = time.perf_counter()
    output = MiningOutput(config.out)
    done, kept_ids, triplets_before = output.committed_pages()
    files, roots, skipped = list_page_files(config.pages)
    seen = SeenImages.remote(kept_ids)
    dataset = mine_pages(read_page_files(files, done, config.cpus_per_task), config, roots, seen)
    counts = Counter()
    rejects_by = Counter()
    seconds = Counter()
    origins = Counter()
    last_report = 0.0
    for batch in dataset.iter_batches(batch_size=config.commit_pages, batch_format="pyarrow", prefetch_batches=1):
        triplets = _flatten(batch.column("triplets"), TRIPLET_SCHEMA)
        rejects = _flatten(batch.column("rejects"), REJECT_SCHEMA)
        image_ids = [[image["content_id"] for image in images if image["content_id"]]
                     for images in batch.column("images").to_pylist()]
        per_page = [len(items) for items in batch.column("triplets").to_pylist()]
        pages = pa.table({"page_id": batch.column("page_id"), "image_ids": image_ids,
                          "triplets": pa.array(per_page, pa.int32())})
        lock.check()
        output.commit(triplets, rejects, pages)
        is_page = [not any(r["stage"] == "read" and not r["page_url"] for r in rs)
                   for rs in batch.column("rejects").to_pylist()]
        counts["pages_read"] += sum(is_page)
        counts["images_found"] += sum(batch.column("images_found").to_pylist())
        counts["images_fetched"] += sum(batch.column("images_fetched").to_pylist())
        counts["images_kept"] += sum(len(ids) for ids in image_ids)
        counts["triplets_written"] += triplets.num_rows
        origins.update(triplets.column("instruction_origin").to_pylist())
        for stage, reason in zip(rejects.column("stage").to_pylist(), rejects.column("reason").to_pylist(),
                                 strict=True):
            rejects_by[f"{stage}/{reason}"] += 1
        counts["pairs_scored"] += sum(batch.column("pairs_scored").to_pylist())
        for stage in STAGES:
            seconds[stage] += sum(batch.column(f"seconds_{stage}").to_pylist())
        if time.perf_counter() - last_report > 10:
            last_report = time.perf_counter()
            print(f"[mine] {dict(counts)}", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started
    return {
        **{key: counts[key] for key in ("pages_read", "images_found", "images_fetched", "images_kept",
                                        "pairs_scored", "triplets_written")},
        "pages_already_done": len(done), "triplets_before": triplets_before,
        "uncommitted_parts_removed": output.removed_uncommitted,
        "rejects": dict(sorted(rejects_by.items())), "instructions_by_origin": dict(origins),
        "captioner": config.captioner,
        "seconds_per_stage": {stage: round(seconds[stage], 3) for stage in STAGES},
        "pages_per_s": round(counts["pages_read"] / elapsed, 2), "triplets_per_s": round(
            counts["triplets_written"] / elapsed, 3),
        "files": len(files), "skipped_files": skipped, "triplets": output.location("triplets"),
        "seconds": round(elapsed, 2),
    }


def check_inputs(config: MineConfig) -> None:
    """The page sources and the image model exist and `--out` is a folder pyarrow opens (before Ray
    starts)."""
    require_paths(config, "pages")
    require_model(config.model)
    try:
        filesystem_of(config.out)
    except (ValueError, OSError) as error:
        raise InputError(f"--out {config.out}: {error}") from None


def main(argv: list[str] | None = None) -> dict:
    return run_job(MineConfig, run, argv, __doc__.splitlines()[0], "python -m jobs.mine",
                   demand=mining_demand, check_inputs=check_inputs)


if __name__ == "__main__":
    main()
    ray.shutdown()
