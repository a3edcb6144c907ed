"""Learning curve: a tiny MagicLens trained from random weights on the synthetic world with the training
job (2 CPU workers by default); held-out Recall@1/5/10 against training time. Prints one JSON object.

    python tests/perf/train_learning_curve.py [--steps 3000] [--validate-every 250] [--pool 300]

The benchmark is held out by construction (its query/change pairs never occur in the training triplets)
and its pool holds every query's target plus distractors, one right answer each. Times are seconds of
the training loop on rank 0 (`elapsed_s`, startup excluded) and of the whole job (`job_seconds`).
Goal: R@1 >= 50% on a pool of >= 300 within 15 minutes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from jobs.common import init_ray
from jobs.train import TrainConfig, demand, run
from jobs.train_loop import SCORE
from magiclens_core.synthetic import SyntheticWorld


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triplets", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--pool", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64, help="per worker")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--validate-every", type=int, default=250)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        world = SyntheticWorld(seed=args.seed)
        started = time.perf_counter()
        triplets = world.write_triplets(Path(folder) / "train.parquet", args.triplets)
        bench = world.write_benchmark(Path(folder) / "bench", args.queries, pool_size=args.pool)
        data_seconds = time.perf_counter() - started
        config = TrainConfig(
            triplets=str(triplets), init="tiny", name="curve", storage=folder, workers=args.workers,
            batch_size=args.batch_size, steps=args.steps, lr=args.lr, warmup_steps=args.steps // 20,
            weight_decay=0.05, temperature=0.07, learn_temperature=True, validation=str(bench),
            checkpoint_every=args.validate_every, keep_checkpoints=args.steps // args.validate_every + 1,
            seed=args.seed, log_every=args.validate_every)
        init_ray(demand(config))
        started = time.perf_counter()
        summary = run(config)
        job_seconds = time.perf_counter() - started
    curve = [{"step": p["step"], "seconds": round(p["elapsed_s"], 1), "loss": round(p["loss"], 4),
              **{k.removeprefix("val_"): p[k] for k in ("val_recall@1", "val_recall@5", "val_recall@10")}}
             for p in summary["history"] if SCORE in p]
    reached = next((p["seconds"] for p in curve if p["recall@1"] >= 50.0), None)
    print(json.dumps({
        "benchmark": "train_learning_curve", "workers": args.workers, "batch_size": args.batch_size,
        "steps": args.steps, "pool": args.pool, "queries": args.queries, "chance_recall@1": 100 / args.pool,
        "data_seconds": round(data_seconds, 1), "job_seconds": round(job_seconds, 1),
        "best_recall@1": summary["best_val_recall@1"], "seconds_to_recall@1_50": reached, "curve": curve,
    }))


if __name__ == "__main__":
    main()
