"""A mining run's output folder, committed per batch of pages so that a rerun resumes exactly.

    DIR/triplets/part-<run>-<n>.parquet   the triplets (what `jobs.train --triplets DIR/triplets` reads)
    DIR/rejects/part-<run>-<n>.parquet    one row per dropped page, image, pair or instruction
    DIR/pages/part-<run>-<n>.parquet      the commit record: the batch's page ids and kept image ids

A batch's triplet and reject parts are written first and its pages part last (each written under a hidden
name, then renamed into place). A batch whose pages part is missing never happened: its other parts are
deleted when the folder is opened again, and its pages are mined again. So a run killed at any point and
rerun ends with every page's triplets exactly once; a rerun after success finds every page done.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PARTS = ("triplets", "rejects", "pages")
PAGES_SCHEMA = pa.schema([("page_id", pa.string()), ("image_ids", pa.list_(pa.string())),
                          ("triplets", pa.int32())])


class MiningOutput:
    """The output folder of one mining job (a local folder)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        for part in PARTS:
            (self.folder / part).mkdir(parents=True, exist_ok=True)
        self.run = uuid.uuid4().hex[:12]
        self.batches = 0
        self.removed_uncommitted = self._remove_uncommitted()

    def _names(self, part: str) -> set[str]:
        return {path.name for path in (self.folder / part).glob("part-*.parquet")}

    def _remove_uncommitted(self) -> int:
        """Delete the parts of batches that have no pages part (and leftover hidden temporary files)."""
        committed = self._names("pages")
        removed = 0
        for part in ("triplets", "rejects"):
            for path in (self.folder / part).iterdir():
                if path.name.startswith(".tmp-") or (path.name.startswith("part-") and path.name not in committed):
                    path.unlink()
                    removed += 1
        for path in (self.folder / "pages").glob(".tmp-*"):
            path.unlink()
        return removed

    def committed_pages(self) -> tuple[set[str], set[str], int]:
        """The ids of the pages done, the content ids of the images they kept, and their triplets."""
        pages, images, triplets = set(), set(), 0
        for path in sorted((self.folder / "pages").glob("part-*.parquet")):
            table = pq.read_table(path)
            pages.update(table.column("page_id").to_pylist())
            for ids in table.column("image_ids").to_pylist():
                images.update(ids or [])
            triplets += sum(table.column("triplets").to_pylist())
        return pages, images, triplets

    def _write(self, part: str, name: str, table: pa.Table) -> None:
        temporary = self.folder / part / f".tmp-{name}"
        pq.write_table(table, temporary)
        os.replace(temporary, self.folder / part / name)

    def commit(self, triplets: pa.Table | None, rejects: pa.Table | None, pages: pa.Table) -> None:
        """Write one batch: its triplets and rejects (if any), then its pages part, which commits it."""
        name = f"part-{self.run}-{self.batches:06d}.parquet"
        self.batches += 1
        if triplets is not None and triplets.num_rows:
            self._write("triplets", name, triplets)
        if rejects is not None and rejects.num_rows:
            self._write("rejects", name, rejects)
        self._write("pages", name, pages.cast(PAGES_SCHEMA))
