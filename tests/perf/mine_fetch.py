"""Fetch throughput of the mining fetcher vs a bare asyncio/httpx loop over the same URLs, same run.

    python tests/perf/mine_fetch.py [--images 500] [--concurrency 64 256] [--repeats 3] [--timeout-s 60]

A local HTTP server on 127.0.0.1 (tests/mine_server.py, threaded) serves distinct small PNGs; each URL is
fetched once per measurement (a query string makes every measurement's URLs new). The fetcher runs with its
checks on (address guard with 127.0.0.1 allowed, deadline, byte limit, sniffing, noai) and no per-host rate
limit; the bare loop is `httpx.AsyncClient.get` under a semaphore. At each concurrency the two alternate
`--repeats` times (bare first, then the fetcher) and the medians are reported; a measurement that takes
longer than `--timeout-s` is stopped and reported as timed out, so the script always ends. Goal: fetcher
>= 0.8 of the bare loop. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mine_corpus import png  # noqa: E402
from mine_server import WebServer  # noqa: E402

from magiclens_core.mining.fetch import Fetcher, FetchOptions  # noqa: E402


async def bare_loop(urls: list[str], concurrency: int) -> int:
    """Images fetched by plain `httpx.AsyncClient.get` calls under a semaphore."""
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, trust_env=False, timeout=60) as client:
        async def one(url: str) -> int:
            async with semaphore:
                response = await client.get(url)
                return len(response.content) if response.status_code == 200 else 0
        return sum(1 for size in await asyncio.gather(*(one(url) for url in urls)) if size)


async def fetcher_loop(urls: list[str], concurrency: int) -> int:
    """Images fetched by the mining fetcher."""
    fetcher = Fetcher(FetchOptions(concurrency=concurrency, per_host_rate=0, allow_networks=("127.0.0.1/32",)))
    return sum(1 for result in await fetcher.fetch_all(urls) if result.data)


def measure(loop: Callable[[list[str], int], Awaitable[int]], urls: list[str], concurrency: int,
            timeout_s: float) -> float | None:
    """Images per second of one loop over `urls`, None when it did not finish within `timeout_s`."""
    async def bounded() -> int:
        return await asyncio.wait_for(loop(urls, concurrency), timeout_s)

    started = time.perf_counter()
    try:
        fetched = asyncio.run(bounded())
    except TimeoutError:
        return None
    return fetched / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=60.0, help="limit of one measurement")
    args = parser.parse_args()
    server = WebServer()
    for index in range(args.images):
        server.images[f"/img/{index}.png"] = png(64, 64, (index % 255, 90, 160), stripe=index)
    results = {}
    try:
        for concurrency in args.concurrency:
            rates: dict[str, list[float | None]] = {"bare": [], "fetcher": []}
            for repeat in range(args.repeats):
                for name, loop in (("bare", bare_loop), ("fetcher", fetcher_loop)):
                    urls = [server.url(f"/img/{i}.png?{name}{concurrency}-{repeat}") for i in range(args.images)]
                    rates[name].append(measure(loop, urls, concurrency, args.timeout_s))
            finished = {name: [rate for rate in values if rate is not None] for name, values in rates.items()}
            medians = {name: statistics.median(values) if values else None for name, values in finished.items()}
            results[str(concurrency)] = {
                "bare_images_per_s": round(medians["bare"], 1) if medians["bare"] else None,
                "fetcher_images_per_s": round(medians["fetcher"], 1) if medians["fetcher"] else None,
                "ratio": round(medians["fetcher"] / medians["bare"], 3) if all(medians.values()) else None,
                "ratios_per_repeat": [round(ours / bare, 3) if ours and bare else None
                                      for bare, ours in zip(rates["bare"], rates["fetcher"], strict=True)],
                "timed_out": {name: sum(rate is None for rate in values) for name, values in rates.items()}}
    finally:
        server.close()
    print(json.dumps({"benchmark": "mine_fetch", "images": args.images, "repeats": args.repeats,
                      "timeout_s": args.timeout_s, "by_concurrency": results}))


if __name__ == "__main__":
    main()
