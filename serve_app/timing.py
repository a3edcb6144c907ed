"""Where a request's time goes, as the server measured it: named laps, sent back in a `Server-Timing` header."""

from __future__ import annotations

import time


class Stopwatch:
    """Laps of one request, in milliseconds, from its creation."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        """Record the time since the previous lap (or the start) as `name`."""
        now = time.perf_counter()
        self.laps[name] = 1000 * (now - self.last)
        self.last = now

    def laps_ms(self, total: str) -> dict[str, float]:
        """The laps and, as `total`, the time since the start, rounded to microseconds."""
        return {**{name: round(ms, 3) for name, ms in self.laps.items()},
                total: round(1000 * (time.perf_counter() - self.started), 3)}


def server_timing(timings_ms: dict[str, float]) -> str:
    """A `Server-Timing` header value (W3C Server Timing) of named durations in milliseconds."""
    return ", ".join(f"{name};dur={ms:.3f}" for name, ms in timings_ms.items())
