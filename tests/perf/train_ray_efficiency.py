"""Ray Train overhead: step time of the job's Ray Train loop (one worker) against a plain single-process
PyTorch loop over the same model, batch size and decoded data held in memory, same run; prints one JSON object.

    python tests/perf/train_ray_efficiency.py [--init tiny] [--batch-size 32] [--steps 60] [--threads 1]

Both sides run `Learner.train_step`. The data is the job's pipeline output (`training_dataset`),
materialised once: the Ray side streams it from the object store with `iter_torch_batches`, the plain
side slices the same rows as tensors. The worker gets `--threads` CPUs and the plain loop as many torch
threads. Step times are medians (the Ray loop measures its own steps, data wait included, checkpoint
excluded); the plain loop runs before and after the Ray run and its median covers both.
`ratio` = plain step time / Ray step time (goal: at least 0.9).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from jobs.common import init_ray
from jobs.stages.triplets import training_dataset
from jobs.train import TrainConfig, demand
from jobs.train_loop import build_trainer
from magiclens_core.factory import initial_model
from magiclens_core.learning.learner import Learner
from magiclens_core.synthetic import SyntheticWorld


def plain_step_times(config: TrainConfig, rows: dict[str, torch.Tensor], steps: int) -> list[float]:
    """Per-step wall times of the plain loop over in-memory tensors (a fresh model, the same init)."""
    learner = Learner(initial_model(config.init, seed=config.seed), lr=config.lr, total_steps=steps,
                      warmup_steps=config.warmup_steps, temperature=config.temperature)
    count = rows["query_ids"].shape[0]
    times = []
    for step in range(steps):
        start = step * config.batch_size % (count - config.batch_size + 1)
        began = time.perf_counter()
        batch = {key: value[start:start + config.batch_size] for key, value in rows.items()}
        learner.train_step([batch])
        times.append(time.perf_counter() - began)
    return times[1:]  # the first step pays one-off allocation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", default="tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--triplets", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        path = SyntheticWorld(seed=0).write_triplets(Path(folder) / "triplets.parquet", args.triplets)
        config = TrainConfig(triplets=str(path), init=args.init, name="efficiency", storage=folder, workers=1,
                             cpus_per_worker=args.threads, batch_size=args.batch_size, steps=args.steps,
                             lr=1e-3, warmup_steps=5, checkpoint_every=args.steps, log_every=args.steps)
        init_ray(demand(config))
        model = initial_model(config.init, seed=config.seed)
        dataset = training_dataset(str(path), model.image_size).materialize()
        everything = dataset.take_batch(batch_size=dataset.count(), batch_format="numpy")
        rows = {key: torch.as_tensor(value) for key, value in everything.items()}
        before = plain_step_times(config, rows, args.steps // 2)
        result = build_trainer(config, dataset, args.steps, model).fit()
        after = plain_step_times(config, rows, args.steps // 2)
    plain = statistics.median(before + after)
    ray_step = result.metrics["step_time_s"]
    print(json.dumps({
        "benchmark": "train_ray_efficiency", "init": args.init, "batch_size": args.batch_size,
        "steps": args.steps, "threads": args.threads,
        "plain_step_s": plain, "ray_step_s": ray_step, "plain_samples_per_s": args.batch_size / plain,
        "ray_samples_per_s": args.batch_size / ray_step, "ratio": plain / ray_step,
    }))


if __name__ == "__main__":
    main()
