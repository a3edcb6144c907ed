"""Latency and throughput of the search application, and what the server adds over the same work in-process.

    python tests/perf/serve_search.py [--rows 1000000] [--size base] [--clients 1 8 32] [--ingress haproxy]

Builds a table of `--rows` clustered unit vectors through `magiclens_core.search.store` (search parameters indexed and
tuned as the indexing job does; the uris name a few generated images), a MagicLens of `--size` with random
weights (or `--model`), and starts the application on the local Ray with one replica. Then, in one run:
- `in_process`: p50/p99 of decode + `Embedder.embed_queries` + `ImageTable.search`, called directly, one query
  at a time, on the same images and instructions;
- `http`: p50/p99 latency and queries/s of `POST /v1/search` (base64 image) at each client count;
- `in_process_beside_ray`: the same, measured again once the cluster and application are up (idle);
- `overhead_ms`: p50 of HTTP at one client minus p50 in-process beside Ray (goal: <= 5 ms), and
  `overhead_vs_quiet_machine_ms` against the measurement before Ray started;
- `breakdown_p50_ms` at each client count, from the server's `Server-Timing` header: proxy and network
  (the client's time minus the replica's), and in the replica reading and checks, decode, embed (batch wait
  included), search and the rest;
- `batching`: queries/s at `--batching-clients` clients with `max_batch_size` 16 vs 1 (goal: >= 2x on CPU with
  `base`).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import json
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search_at_scale import CHUNK, ClusteredVectors  # noqa: E402
from served_pool import APP_NAME, free_port, write_images  # noqa: E402

from magiclens_core import Embedder, create_model, save_model  # noqa: E402
from magiclens_core.images.pixels import as_float_batch, model_pixels  # noqa: E402
from magiclens_core.search.index_policy import index_table  # noqa: E402
from magiclens_core.search.store import ImageTable, IndexKind, image_schema  # noqa: E402
from serve_app.ingress import use_haproxy_locally  # noqa: E402

INSTRUCTIONS = ["the same, but blue", "two of them", "on a black background", "larger", "on the left", ""]


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(1000 * s for s in seconds)
    return {"p50_ms": round(statistics.median(ms), 2), "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2),
            "n": len(ms)}


def build_table(root: Path, rows: int, embedder: Embedder, images: list[Path],
                index: IndexKind) -> tuple[ImageTable, dict]:
    table = ImageTable.create(str(root / "db"), "bench", image_schema(embedder.dim))
    vectors = ClusteredVectors(embedder.dim)
    started = time.perf_counter()
    for stream, start in enumerate(range(0, rows, CHUNK)):
        count = min(CHUNK, rows - start)
        table.add({"id": [f"r{n}" for n in range(start, start + count)],
                   "uri": [str(images[n % len(images)]) for n in range(start, start + count)],
                   "vector": vectors.chunk(count, stream), "model_id": [embedder.model_id] * count})
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    search = index_table(table, index, added=rows)
    return table, {"rows": rows, "write_s": round(write_s, 1), "index_s": round(time.perf_counter() - started, 1),
                   "search": search}


def in_process(embedder: Embedder, table: ImageTable, queries: list[tuple[bytes, str]], k: int) -> dict:
    params = table.search_params()
    seconds = []
    for data, instruction in queries:
        start = time.perf_counter()
        pixels, _, _ = model_pixels(data, embedder.model.image_size)
        vector = embedder.embed_queries(as_float_batch(pixels[None]), [instruction])[0]
        table.search(vector, k, params=params, select=["id", "uri", "width", "height", "model_id"])
        seconds.append(time.perf_counter() - start)
    return percentiles(seconds[1:])  # the first call warms up


def load(url: str, queries: list[tuple[bytes, str]], clients: int, per_client: int, k: int) -> dict:
    bodies = [json.dumps({"image": base64.b64encode(data).decode(), "instruction": text, "k": k})
              for data, text in queries]
    seconds: list[float] = []
    batches: list[int] = []
    timings: list[dict[str, float]] = []

    def client(offset: int) -> None:
        with httpx.Client(timeout=600, headers={"content-type": "application/json"}) as http:
            for turn in range(per_client):
                start = time.perf_counter()
                answer = http.post(url + "/v1/search", content=bodies[(offset + turn) % len(bodies)])
                seconds.append(time.perf_counter() - start)
                answer.raise_for_status()
                batches.append(answer.json()["batch_size"])
                timings.append({"client": 1000 * seconds[-1], **parse_server_timing(answer.headers["server-timing"])})

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    return {**percentiles(seconds), "queries_per_s": round(len(seconds) / wall, 2),
            "mean_batch_size": round(float(np.mean(batches)), 2), "breakdown_p50_ms": breakdown(timings)}


def parse_server_timing(header: str) -> dict[str, float]:
    return {name.strip(): float(duration.removeprefix("dur=")) for name, duration in
            (part.split(";") for part in header.split(","))}


def breakdown(timings: list[dict[str, float]]) -> dict[str, float]:
    """Medians of where each request's time went, from the server's own timings: the proxy and the network
    (the client's time minus the replica's), and in the replica reading and checks, decode, embed (the batch
    wait included), search and the rest (routing inside the replica, the response's encoding)."""
    parts = {
        "proxy_and_network": lambda t: t["client"] - t["server"],
        "read_and_checks": lambda t: t["read"], "decode": lambda t: t["decode"], "embed": lambda t: t["embed"],
        "search": lambda t: t["search"],
        "replica_other": lambda t: t["server"] - t["read"] - t["decode"] - t["embed"] - t["search"],
    }
    return {name: round(statistics.median(part(t) for t in timings), 2) for name, part in parts.items()}


def deploy(config, replica_cpus: float, port: int) -> str:
    from ray import serve

    from serve_app.app import application

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    options = {"num_replicas": 1, "autoscaling_config": None, "ray_actor_options": {"num_cpus": replica_cpus},
               "max_ongoing_requests": max(64, config.max_batch_size)}
    serve.run(application(config, options), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    httpx.get(url + "/healthz", timeout=600).raise_for_status()
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--size", default="base", help="random-weight model size when --model is not given")
    parser.add_argument("--model", help="model folder or official .pkl (else random weights of --size)")
    parser.add_argument("--index", type=IndexKind, default=IndexKind.AUTO, choices=list(IndexKind))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--per-client", type=int, default=8, help="sequential requests per client")
    parser.add_argument("--in-process", type=int, default=30, help="queries timed in-process")
    parser.add_argument("--batching-clients", type=int, default=32)
    parser.add_argument("--skip-batching", action="store_true")
    parser.add_argument("--batch-wait-s", type=float, default=0.01)
    parser.add_argument("--replica-cpus", type=float, default=2.0)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--ingress", choices=["proxy", "haproxy"], default="proxy",
                        help="Serve's Python proxy, or HAProxy straight to the replica (serve_app.ingress)")
    args = parser.parse_args()
    if args.ingress == "haproxy":
        use_haproxy_locally()

    import ray

    from serve_app.config import AppConfig

    root = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    images = write_images(root / "images", 24)
    model = args.model
    if model is None:
        model = str(root / "model")
        save_model(create_model(args.size), model)
    embedder = Embedder.load(model, device="cpu", batch_size=1)
    table, built = build_table(root, args.rows, embedder, images, args.index)
    queries = [(path.read_bytes(), INSTRUCTIONS[n % len(INSTRUCTIONS)]) for n, path in enumerate(images)]
    result = {"rows": args.rows, "size": args.size if args.model is None else args.model, "k": args.k,
              "ingress": args.ingress,
              "table": built, "in_process": in_process(embedder, table, (queries * 4)[:args.in_process + 1], args.k)}

    ray.init(num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
    port = free_port()
    config = AppConfig(model=model, db=str(root / "db"), table="bench", device="cpu", max_batch_size=16,
                       batch_wait_timeout_s=args.batch_wait_s, refresh_interval_s=3600)
    url = deploy(config, args.replica_cpus, port)
    load(url, queries, 2, 2, args.k)  # warm up
    # the same in-process work again, now beside the idle Ray cluster and application (on 2 cores their
    # background processes alone slow the model down): the fair baseline of the HTTP path
    result["in_process_beside_ray"] = in_process(embedder, table, (queries * 4)[:args.in_process + 1], args.k)
    del embedder
    result["http"] = {str(clients): load(url, queries, clients, args.per_client, args.k) for clients in args.clients}
    one = result["http"].get("1")
    if one:
        result["overhead_ms"] = round(one["p50_ms"] - result["in_process_beside_ray"]["p50_ms"], 2)
        result["overhead_vs_quiet_machine_ms"] = round(one["p50_ms"] - result["in_process"]["p50_ms"], 2)
    if not args.skip_batching:
        clients = args.batching_clients
        on = result["http"].get(str(clients)) or load(url, queries, clients, args.per_client, args.k)
        deploy(config.model_copy(update={"max_batch_size": 1}), args.replica_cpus, port)
        load(url, queries, 2, 2, args.k)
        off = load(url, queries, clients, args.per_client, args.k)
        result["batching"] = {"clients": clients, "on": on, "off": off,
                              "speedup": round(on["queries_per_s"] / off["queries_per_s"], 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
