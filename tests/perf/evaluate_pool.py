"""Time to evaluate a 100k-image pool, and the share spent embedding vs ranking; prints one JSON object.

    python tests/perf/evaluate_pool.py [--size base] [--pool 100000] [--queries 800] [--sample 64]

Embedding is timed through the evaluation job's own path (`jobs.evaluate.embed_rows`: one pass of the Ray
Data decode tasks and `Embedder` actors over the queries and the pool together) on a local Ray, over
generated 640x480 JPEGs. A run over `--sample` queries and as many pool images and one over twice as many
give the steady rate (their difference) and the pass's fixed cost (actor start, model load); both are
scaled to `--pool` images and `--queries` queries (CIRCO's test split has 800).
Ranking is timed at full size: `rank_pool` of `--queries` random unit vectors against `--pool` of them,
top 50. Each figure is the median of `--rounds` runs. float32 on CPU (this script's Ray cluster has no
GPU); weights are random and nothing is downloaded. The per-GPU hot path (decode + `Embedder`) is
`index_gpu_hot_path.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image

from jobs.evaluate import EvaluateConfig, embed_rows, image_rows
from magiclens_core import create_model, save_model
from magiclens_core.evaluation.benchmarks import Benchmark, ImageRef, Query, Task
from magiclens_core.evaluation.ranking import rank_pool


def sample_benchmark(folder: Path, count: int) -> Benchmark:
    """`count` noise JPEGs of COCO's typical size, each also a query."""
    rng = np.random.default_rng(0)
    images = {}
    for index in range(count):
        path = folder / f"{index:06d}.jpg"
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(path, quality=90)
        images[str(index)] = ImageRef(path)
    queries = [Query(id=str(i), reference=str(i), text="find a red car but at night") for i in range(count)]
    return Benchmark("synthetic", "val", folder, [Task("sample", queries, list(images))], images)


def timed_rows(benchmark: Benchmark, count: int, config: EvaluateConfig, image_size: int, dim: int) -> float:
    """Seconds to embed `count` queries and `count` pool images in one pass."""
    rows = image_rows(benchmark, benchmark.queries[:count], benchmark.tasks[0].pool[:count])
    start = time.perf_counter()
    embed_rows(rows, config, image_size, dim, {})
    return time.perf_counter() - start


def pass_cost(benchmark: Benchmark, sample: int, config: EvaluateConfig, image_size: int, dim: int,
              rounds: int) -> tuple[float, float]:
    """(seconds per row at the steady rate, fixed seconds per pass), medians over `rounds`."""
    small = statistics.median(timed_rows(benchmark, sample, config, image_size, dim) for _ in range(rounds))
    large = statistics.median(timed_rows(benchmark, 2 * sample, config, image_size, dim) for _ in range(rounds))
    per_row = max(large - small, 1e-9) / (2 * sample)
    return per_row, max(small - per_row * 2 * sample, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base", choices=["base", "large"])
    parser.add_argument("--pool", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=800)
    parser.add_argument("--sample", type=int, default=64, help="queries (and pool images) in the smaller run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="embedding actors")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = create_model(args.size)
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
    with tempfile.TemporaryDirectory() as folder:
        save_model(model, Path(folder) / "model")
        config = EvaluateConfig(benchmark="synthetic", data=folder, model=str(Path(folder) / "model"),
                                batch_size=args.batch_size, workers=args.workers)
        benchmark = sample_benchmark(Path(folder), 2 * args.sample)
        sizes = (model.image_size, model.embed_dim)
        timed_rows(benchmark, args.batch_size, config, *sizes)  # warm-up
        row_s, fixed_s = pass_cost(benchmark, args.sample, config, *sizes, args.rounds)
    ray.shutdown()

    rng = np.random.default_rng(1)
    pool = rng.normal(size=(args.pool, model.embed_dim)).astype(np.float32)
    queries = rng.normal(size=(args.queries, model.embed_dim)).astype(np.float32)
    pool_ids = [str(i) for i in range(args.pool)]
    rank_times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        rank_pool(queries, pool, pool_ids, 50)
        rank_times.append(time.perf_counter() - start)
    rank_s = statistics.median(rank_times)

    embed_total = fixed_s + row_s * (args.pool + args.queries)
    total = embed_total + rank_s
    print(json.dumps({
        "benchmark": "evaluate_pool",
        "size": args.size,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "embedding_actors": args.workers,
        "pool": args.pool,
        "queries": args.queries,
        "rows_per_timed_pass": [2 * args.sample, 4 * args.sample],
        "rounds": args.rounds,
        "rows_per_s": round(1 / row_s, 2),
        "fixed_seconds_per_pass": round(fixed_s, 1),
        "seconds": {"embed": round(embed_total, 1), "rank": round(rank_s, 3), "total": round(total, 1)},
        "share": {"embedding": round(embed_total / total, 5), "ranking": round(rank_s / total, 5)},
    }))


if __name__ == "__main__":
    main()
