"""What the deployments' health checks ask: can the replica still answer?

A replica's blocking work (parsing and checking requests, reading and decoding images, embedding, searching
the table) runs on its event loop's worker threads through `WorkerThreads`, which knows when each running call
started. Every input is bounded, so no call should run long: one that has run for `stuck_after_s` is stuck, and
the replica fails its health check (Serve then replaces it). A busy replica, whose calls queue but finish, stays
healthy.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

STUCK_AFTER_S = 60.0
Result = TypeVar("Result")


class WorkerThreads:
    """Blocking calls run off the event loop, with the start time of each one running."""

    def __init__(self, stuck_after_s: float = STUCK_AFTER_S) -> None:
        self.stuck_after_s = stuck_after_s
        self._running: dict[int, float] = {}  # worker thread → when its call started
        self._lock = threading.Lock()
        self._model = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    async def run(self, call: Callable[..., Result], *args: Any, **kwargs: Any) -> Result:
        """`call(*args, **kwargs)` on a worker thread."""
        return await asyncio.to_thread(self._timed, call, args, kwargs)

    async def run_model(self, call: Callable[..., Result], *args: Any, **kwargs: Any) -> Result:
        """`call(*args, **kwargs)` on the replica's one model thread, which no other work queues for: a batch
        never waits behind the requests' own checks, decoding and searches for a worker of the shared pool."""
        return await asyncio.get_running_loop().run_in_executor(
            self._model, functools.partial(self._timed, call, args, kwargs))

    def _timed(self, call: Callable[..., Result], args: tuple, kwargs: dict[str, Any]) -> Result:
        thread = threading.get_ident()
        with self._lock:
            self._running[thread] = time.monotonic()
        try:
            return call(*args, **kwargs)
        finally:
            with self._lock:
                del self._running[thread]

    def check(self) -> None:
        """Raise `RuntimeError` when a call has run for `stuck_after_s` or longer."""
        with self._lock:
            oldest = min(self._running.values(), default=None)
        if oldest is not None and time.monotonic() - oldest >= self.stuck_after_s:
            raise RuntimeError(f"a worker thread has been on one call for {time.monotonic() - oldest:.0f} s")
