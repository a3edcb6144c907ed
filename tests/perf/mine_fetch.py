"""Fetch throughput of the mining fetcher vs a bare asyncio/httpx loop over the same URLs, same run.

    python tests/perf/mine_fetch.py [--images 2000] [--concurrency 64 256]

A local HTTP server on 127.0.0.1 (tests/mine_server.py, threaded) serves distinct small PNGs; each URL is
fetched once per measurement (a query string makes every run's URLs new). The fetcher runs with its checks
on (address guard with 127.0.0.1 allowed, deadline, byte limit, sniffing, noai) and no per-host rate limit;
the bare loop is `httpx.AsyncClient.get` under a semaphore. Goal: fetcher >= 0.8 of the bare loop. Prints
one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mine_corpus import png  # noqa: E402
from mine_server import WebServer  # noqa: E402

from magiclens_core.mining.fetch import Fetcher, FetchOptions  # noqa: E402


async def bare_loop(urls: list[str], concurrency: int) -> int:
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, trust_env=False, timeout=60) as client:
        async def one(url: str) -> int:
            async with semaphore:
                response = await client.get(url)
                return len(response.content) if response.status_code == 200 else 0
        return sum(1 for size in await asyncio.gather(*(one(url) for url in urls)) if size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args()
    server = WebServer()
    for index in range(args.images):
        server.images[f"/img/{index}.png"] = png(64, 64, (index % 255, 90, 160), stripe=index)
    results = {}
    try:
        for concurrency in args.concurrency:
            def urls(tag: str, c: int = concurrency) -> list[str]:
                return [server.url(f"/img/{i}.png?{tag}{c}") for i in range(args.images)]
            started = time.perf_counter()
            fetched = asyncio.run(bare_loop(urls("bare"), concurrency))
            bare = fetched / (time.perf_counter() - started)
            fetcher = Fetcher(FetchOptions(concurrency=concurrency, per_host_rate=0, allow_networks=("127.0.0.1/32",)))
            started = time.perf_counter()
            outcome = fetcher.fetch(urls("fetcher"))
            ours = sum(1 for r in outcome if r.data) / (time.perf_counter() - started)
            results[str(concurrency)] = {"bare_images_per_s": round(bare, 1), "fetcher_images_per_s": round(ours, 1),
                                         "ratio": round(ours / bare, 3)}
    finally:
        server.close()
    print(json.dumps({"images": args.images, "by_concurrency": results}))


if __name__ == "__main__":
    main()
