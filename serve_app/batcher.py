"""Opportunistic batching on a replica's event loop: calls queue while the model works, and when it is free
the next batch takes every call waiting (up to `max_batch_size`).

Serve's `@serve.batch` (Ray 2.60) forms its next batch as soon as the last one is handed on, not when it has
finished: under load each batch holds the one or two calls that arrived meanwhile, and batches queue for the
model instead of calls. Measured with 32 clients on one replica: mean batch 1.95 (`base` on CPU) and 2.4
(`tiny`), with each call waiting 15 s and 0.8 s for its turn.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """Calls `run` on batches of the items passed in; `run` returns one result per item, in order."""

    def __init__(self, run: Callable[[list[Item]], Awaitable[list[Result]]], max_batch_size: int,
                 wait_s: float = 0.0) -> None:
        self.run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s  # how long a batch that is not full waits for more calls before it runs
        self._waiting: deque[tuple[Item, asyncio.Future[Result]]] = deque()
        self._worker: asyncio.Task[None] | None = None

    async def __call__(self, item: Item) -> Result:
        """The result for `item`, computed in a batch with the calls waiting beside it."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Run batches until no call is waiting."""
        while self._waiting:
            if self.wait_s and len(self._waiting) < self.max_batch_size:
                await asyncio.sleep(self.wait_s)
            batch = self._take()
            if not batch:
                continue
            try:
                results = await self.run([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch function answered {len(results)} of {len(batch)} items")
            except Exception as error:  # every call of the batch gets it; the next batch still runs
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():  # a call given up meanwhile (its client gone) is cancelled
                    future.set_result(result)

    def _take(self) -> list[tuple[Item, asyncio.Future[Result]]]:
        """The next batch: the calls waiting longest that are still wanted, at most `max_batch_size`."""
        batch: list[tuple[Item, asyncio.Future[Result]]] = []
        while self._waiting and len(batch) < self.max_batch_size:
            item, future = self._waiting.popleft()
            if not future.done():
                batch.append((item, future))
        return batch
