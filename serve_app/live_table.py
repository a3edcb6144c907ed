"""An image table a replica keeps reading while an indexing job appends to it."""

from __future__ import annotations

import asyncio
import time

from magiclens_core.search.filters import ColumnKind, column_kinds
from magiclens_core.search.store import CLIP_VECTOR, VECTOR, ImageTable, SearchParams
from serve_app.schemas import ApiError

VECTOR_COLUMNS = (VECTOR, CLIP_VECTOR)


class LiveTable:
    """`ImageTable` moved to the latest committed version at most every `interval_s` (checked on use), with
    what depends on the version (search parameters, filterable columns) cached in between."""

    def __init__(self, db: str, name: str, interval_s: float, memory_index: str | None = None) -> None:
        self.table = ImageTable.open(db, name, memory_index=memory_index)
        self.interval_s = interval_s
        self._lock = asyncio.Lock()
        self._describe()

    def _describe(self) -> None:
        self.checked_at = time.monotonic()
        self.params: SearchParams = self.table.search_params()
        self.filter_columns: dict[str, ColumnKind] = column_kinds(self.table.schema)
        self.result_columns = [name for name in self.table.schema.names if name not in VECTOR_COLUMNS]

    def _refresh(self) -> None:
        version = self.table.version
        self.table.refresh()
        if self.table.version != version:
            self._describe()
        self.checked_at = time.monotonic()

    async def fresh(self) -> ImageTable:
        """The table, moved to the latest version first when the last check is older than the interval."""
        if time.monotonic() - self.checked_at >= self.interval_s:
            async with self._lock:
                if time.monotonic() - self.checked_at >= self.interval_s:
                    await asyncio.to_thread(self._refresh)
        return self.table

    async def image_uri(self, image_id: str) -> str:
        """Where the table says image `image_id` is stored; 404 `ApiError` for an unknown id or no stored file."""
        table = await self.fresh()
        rows = await asyncio.to_thread(table.get, [image_id], ["id", "uri"])
        if rows.num_rows == 0:
            raise ApiError(404, "unknown_image_id", f"no image with id {image_id!r} in table {table.name!r}")
        uri = rows.column("uri")[0].as_py()
        if not uri:
            raise ApiError(404, "image_unavailable", f"image {image_id!r} has no stored file to read")
        return uri
