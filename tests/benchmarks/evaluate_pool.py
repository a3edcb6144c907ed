"""Time to evaluate a 100k-image pool, and the share spent embedding vs ranking; prints one JSON object.

    python tests/benchmarks/evaluate_pool.py [--size base] [--pool 100000] [--queries 800] [--sample 64]

Embedding is timed on `--sample` generated 640x480 JPEGs through the evaluation job's own `embed_pool` and
`embed_queries` (decode + preprocess + `Embedder`), and scaled to `--pool` images and `--queries` queries
(CIRCO's test split has 800). Ranking is timed at full size: `rank_pool` of `--queries` random unit vectors
against `--pool` of them, top 50. Each part is the median of `--rounds` runs in one process. Runs on CUDA
(bf16) when a GPU is present, else float32 on CPU; weights are random, nothing is downloaded, and nothing
here needs Ray.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from embedder_throughput import _timed  # the same timing (CUDA-synchronised) as the throughput benchmark
from PIL import Image

from jobs.evaluate import EvaluateConfig, embed_pool, embed_queries
from magiclens_core import Embedder, create_model
from magiclens_core.benchmarks import Benchmark, ImageRef, Query, Task
from magiclens_core.ranking import rank_pool


def sample_benchmark(folder: Path, count: int) -> Benchmark:
    """`count` noise JPEGs of COCO's typical size, each also a query."""
    rng = np.random.default_rng(0)
    images = {}
    for index in range(count):
        path = folder / f"{index:06d}.jpg"
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(path, quality=90)
        images[str(index)] = ImageRef(path)
    queries = [Query(id=str(i), reference=str(i), text="find a red car but at night") for i in range(count)]
    return Benchmark("circo", "val", folder, [Task("sample", queries, list(images))], images)


def median_seconds(fn, rounds: int, device: torch.device) -> float:
    return statistics.median(_timed(fn, device) for _ in range(rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base", choices=["base", "large"])
    parser.add_argument("--pool", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=800)
    parser.add_argument("--sample", type=int, default=64, help="images actually embedded per round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    embedder = Embedder(create_model(args.size), batch_size=args.batch_size)
    device = embedder.device
    config = EvaluateConfig(benchmark="circo", data="", batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as folder:
        benchmark = sample_benchmark(Path(folder), args.sample)
        ids = benchmark.tasks[0].pool
        embed_pool(embedder, benchmark, ids[: args.batch_size], config, Path(folder))  # warm-up
        pool_s = median_seconds(lambda: embed_pool(embedder, benchmark, ids, config, Path(folder)),
                                args.rounds, device)
        query_s = median_seconds(lambda: embed_queries(embedder, benchmark, config, Path(folder)),
                                 args.rounds, device)

    rng = np.random.default_rng(1)
    pool = rng.normal(size=(args.pool, embedder.dim)).astype(np.float32)
    queries = rng.normal(size=(args.queries, embedder.dim)).astype(np.float32)
    pool_ids = [str(i) for i in range(args.pool)]
    rank_s = median_seconds(lambda: rank_pool(queries, pool, pool_ids, 50, device=device), args.rounds, device)

    embed_pool_total = pool_s / args.sample * args.pool
    embed_queries_total = query_s / args.sample * args.queries
    total = embed_pool_total + embed_queries_total + rank_s
    print(json.dumps({
        "benchmark": "evaluate_pool",
        "size": args.size,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "precision": embedder.precision,
        "torch_threads": torch.get_num_threads(),
        "pool": args.pool,
        "queries": args.queries,
        "sample_images": args.sample,
        "rounds": args.rounds,
        "pool_images_per_s": round(args.sample / pool_s, 2),
        "queries_per_s": round(args.sample / query_s, 2),
        "seconds": {"embed_pool": round(embed_pool_total, 1), "embed_queries": round(embed_queries_total, 1),
                    "rank": round(rank_s, 3), "total": round(total, 1)},
        "share": {"embedding": round((embed_pool_total + embed_queries_total) / total, 5),
                  "ranking": round(rank_s / total, 5)},
    }))


if __name__ == "__main__":
    main()
