"""A mining run's output folder, local or in object storage, committed per batch of pages so that a rerun
resumes exactly.

    DIR/triplets/part-<run>-<n>.parquet   the triplets (what `jobs.train --triplets DIR/triplets` reads)
    DIR/rejects/part-<run>-<n>.parquet    one row per dropped page, image, pair or instruction
    DIR/pages/part-<run>-<n>.parquet      the commit record: the batch's page ids and kept image ids

A batch's triplet and reject parts are written first and its pages part last. Each part appears whole or
not at all: on a local filesystem it is written under a hidden name and renamed into place; in object
storage it is one upload, which becomes visible only once complete. A batch whose pages part is missing
never happened: its other parts are deleted when the folder is opened again, and its pages are mined again.
So a run killed at any point and rerun ends with every page's triplets exactly once; a rerun after success
finds every page done. One writer at a time (the job holds the folder's `WriterLock`).
"""

from __future__ import annotations

import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from magiclens_core.images.sources import filesystem_of

PARTS = ("triplets", "rejects", "pages")
PAGES_SCHEMA = pa.schema([("page_id", pa.string()), ("image_ids", pa.list_(pa.string())),
                          ("triplets", pa.int32())])


class MiningOutput:
    """The output folder of one mining job: a local path or a URI pyarrow opens (`s3://`, `gs://`, ...)."""

    def __init__(self, uri: str) -> None:
        self.filesystem, self.root = filesystem_of(uri)
        self.renames = isinstance(self.filesystem, pafs.LocalFileSystem)
        self.uri = uri.rstrip("/") if "://" in uri else self.root
        for part in PARTS:
            self.filesystem.create_dir(f"{self.root}/{part}", recursive=True)
        self.run = uuid.uuid4().hex[:12]
        self.batches = 0
        self.removed_uncommitted = self._remove_uncommitted()

    def location(self, part: str) -> str:
        """Where one kind of part lives, as the job's own `--out` names it (a path or a URI)."""
        return f"{self.uri}/{part}"

    def _files(self, part: str) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(f"{self.root}/{part}", allow_not_found=True)
        return [info for info in self.filesystem.get_file_info(selector) if info.type == pafs.FileType.File]

    def _remove_uncommitted(self) -> int:
        """Delete the parts of batches that have no pages part (and leftover hidden temporary files)."""
        committed = {info.base_name for info in self._files("pages") if info.base_name.startswith("part-")}
        removed = 0
        for part in ("triplets", "rejects"):
            for info in self._files(part):
                if info.base_name.startswith(".tmp-") or (info.base_name.startswith("part-")
                                                          and info.base_name not in committed):
                    self.filesystem.delete_file(info.path)
                    removed += 1
        for info in self._files("pages"):
            if info.base_name.startswith(".tmp-"):
                self.filesystem.delete_file(info.path)
        return removed

    def committed_pages(self) -> tuple[set[str], set[str], int]:
        """The ids of the pages done, the content ids of the images they kept, and their triplets."""
        pages, images, triplets = set(), set(), 0
        for info in sorted(self._files("pages"), key=lambda info: info.base_name):
            if not info.base_name.startswith("part-"):
                continue
            table = pq.read_table(info.path, filesystem=self.filesystem)
            pages.update(table.column("page_id").to_pylist())
            for ids in table.column("image_ids").to_pylist():
                images.update(ids or [])
            triplets += sum(table.column("triplets").to_pylist())
        return pages, images, triplets

    def _write(self, part: str, name: str, table: pa.Table) -> None:
        final = f"{self.root}/{part}/{name}"
        if not self.renames:  # one upload: the object appears whole, once complete
            pq.write_table(table, final, filesystem=self.filesystem)
            return
        temporary = f"{self.root}/{part}/.tmp-{name}"
        pq.write_table(table, temporary, filesystem=self.filesystem)
        self.filesystem.move(temporary, final)

    def commit(self, triplets: pa.Table | None, rejects: pa.Table | None, pages: pa.Table) -> None:
        """Write one batch: its triplets and rejects (if any), then its pages part, which commits it."""
        name = f"part-{self.run}-{self.batches:06d}.parquet"
        self.batches += 1
        if triplets is not None and triplets.num_rows:
            self._write("triplets", name, triplets)
        if rejects is not None and rejects.num_rows:
            self._write("rejects", name, rejects)
        self._write("pages", name, pages.cast(PAGES_SCHEMA))
