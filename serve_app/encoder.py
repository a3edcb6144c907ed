"""The query encoder each replica holds: decodes a query image, embeds (image, instruction) pairs in batches with
the `Embedder`, and searches the image table with its stored tuned parameters."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import ray
import torch

from magiclens_core import ImageDecodeError
from magiclens_core.images.pixels import as_float_batch, model_pixels
from magiclens_core.images.sources import image_bytes_or_path
from serve_app.batcher import Batcher
from serve_app.config import AppConfig
from serve_app.health import WorkerThreads
from serve_app.live_table import LiveTable
from serve_app.schemas import ApiError, CheckedQuery
from serve_app.timing import Stopwatch

# every other decode reason is a 422; a stored URI outside `allowed_uri_prefixes` is as absent as a missing file
IMAGE_ERROR_STATUS = {"too_many_pixels": 413, "unreadable": 404, "uri_not_allowed": 404}


def image_error(err: ImageDecodeError) -> ApiError:
    """The API's answer to an image that cannot be used; the code is the decoder's reason."""
    return ApiError(IMAGE_ERROR_STATUS.get(err.reason, 422), err.reason, f"image cannot be used: {err}")


def rows_to_hits(rows: Any) -> list[dict[str, Any]]:
    """Search rows (Arrow, with `_distance`) as result dicts: the columns and `score` = cosine similarity."""
    hits = []
    for row in rows.to_pylist():
        distance = row.pop("_distance")
        hits.append({**row, "score": round(1.0 - float(distance), 6)})
    return hits


class QueryEncoder:
    """A replica's model and search: decodes a query image, embeds concurrent (image, instruction) pairs
    together (`serve_app.batcher`) and searches the live table with its stored parameters."""

    def __init__(self, config: AppConfig, live: LiveTable, threads: WorkerThreads) -> None:
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        device = config.device
        if device == "auto":
            device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.config = config
        self.policy = config.uri_policy()
        self.live = live
        self.threads = threads
        from magiclens_core.embedder import Embedder  # the model's imports only where a replica starts

        self.embedder = Embedder.load(config.model, device=device, precision=config.precision,
                                      batch_size=config.max_batch_size, preprocess=config.preprocess)
        live.table.check_model(self.embedder.model_id)
        self.embed = Batcher(self._embed_batch, config.max_batch_size, config.batch_wait_timeout_s)

    def info(self) -> dict[str, Any]:
        """What this replica serves: the model, its device and the batching settings."""
        return {"model_id": self.embedder.model_id, "dim": self.embedder.dim, "device": str(self.embedder.device),
                "precision": self.embedder.precision, "max_batch_size": self.config.max_batch_size}

    async def _pixels(self, image: bytes | None, image_id: str | None) -> np.ndarray:
        config = self.config
        try:
            data = image
            if data is None:
                data = await self.threads.run(image_bytes_or_path, await self.live.image_uri(image_id or ""),
                                              self.policy)
            pixels, _, _ = await self.threads.run(model_pixels, data, self.embedder.model.image_size,
                                                  config.preprocess, config.max_pixels, config.min_image_side)
        except ImageDecodeError as err:
            raise image_error(err) from err
        return pixels

    async def search(self, query: CheckedQuery, clock: Stopwatch) -> dict[str, Any]:
        """The k best images for one checked query (`ApiError` when its image cannot be used or the search
        runs out of time), with the batch's size; `clock` gets the laps `decode`, `embed` and `search`."""
        pixels = await self._pixels(query.image, query.image_id)
        clock.lap("decode")
        vector, batch_size = await self.embed((pixels, query.instruction))
        clock.lap("embed")  # the wait for the batch to fill included
        table = await self.live.fresh()
        timeout_s = self.config.search_timeout_s
        try:
            rows = await asyncio.wait_for(self.threads.run(
                table.search, vector, query.k, query.filter, select=self.live.result_columns,
                params=self.live.params), timeout_s)
        except TimeoutError as err:
            raise ApiError(503, "search_timeout",
                           f"the table search took longer than {timeout_s} s; retry later") from err
        clock.lap("search")
        return {"results": rows_to_hits(rows), "batch_size": batch_size, "table_version": table.version}

    async def _embed_batch(self, queries: list[tuple[np.ndarray, str]]) -> list[tuple[np.ndarray, int]]:
        """Query embeddings of a batch of (model pixels, instruction), each with the batch's size."""
        batch = as_float_batch(np.stack([pixels for pixels, _ in queries]))
        vectors = await self.threads.run_model(self.embedder.embed_queries, batch,
                                               [instruction for _, instruction in queries])
        return [(vector, len(queries)) for vector in vectors]
