"""Training-step throughput: the project's step (`Learner.train_step`, the one the Ray loop runs) against a
bare PyTorch loop written inline, same model, batch and data, same run; prints one JSON object.

    python tests/perf/train_gpu_step.py --size base --batch 256 --steps 10          # on a GPU
    python tests/perf/train_gpu_step.py --size tiny --batch 16 --steps 3 --rounds 2 # CPU smoke test

Plain PyTorch, no Ray. Weights are random (speed does not depend on them). On CUDA: bf16 autocast;
on CPU: float32. Full fine-tuning (every parameter but CLIP's unused logit scale) with gradient
checkpointing of both towers unless `--no-grad-checkpointing`. Each round times `--steps` steps of one
side then the other (after one warm-up step each); the figures are medians over rounds. `ratio` is the
step's triplets/s over the bare loop's (goal: at least 0.9).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from magiclens_core.factory import initial_model
from magiclens_core.learning.learner import Learner, set_trainable
from magiclens_core.model.precision import autocast, resolve_precision

INSTRUCTIONS = ["same shape but blue", "two of them, on the left", "the same building, inside view at night",
                "make it bigger, on a black background"]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_step_factory(model, device: torch.device, precision: str, lr: float):
    """A bare loop step: towers + head, query negatives, cross-entropy, clipping, AdamW; nothing else."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    empty_ids = model.tokenize([""]).to(device)
    scale = 50.0

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        query = batch["query_pixels"].to(device).permute(0, 3, 1, 2).float().div_(255)
        target = batch["target_pixels"].to(device).permute(0, 3, 1, 2).float().div_(255)
        rows = query.shape[0]
        with autocast(precision, device):
            images = model.encode_image(torch.cat([query, target]))
            texts = model.encode_text(batch["query_ids"].to(device))
            empty = model.encode_text(empty_ids).expand(2 * rows, -1)
            queries = model.fuse(images[:rows], texts)
            candidates = model.fuse(torch.cat([images[rows:], images[:rows]]), empty)
        logits = scale * queries.float() @ candidates.float().T
        loss = F.cross_entropy(logits, torch.arange(rows, device=device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _timed(step, batch, steps: int, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    _synchronize(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base", help="base | large | tiny")
    parser.add_argument("--batch", type=int, default=256, help="triplets per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-grad-checkpointing", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision("auto", device)
    checkpointing = not args.no_grad_checkpointing

    learner = Learner(initial_model(args.size), device=device, lr=1e-5, total_steps=10_000,
                      grad_checkpointing=checkpointing)
    bare_model = initial_model(args.size).to(device).train()
    set_trainable(bare_model, "all")
    bare_model.clip.set_grad_checkpointing(checkpointing)
    bare = bare_step_factory(bare_model, device, precision, lr=1e-5)

    size = learner.model.image_size
    generator = torch.Generator().manual_seed(0)
    batch = {
        "query_pixels": torch.randint(0, 256, (args.batch, size, size, 3), dtype=torch.uint8, generator=generator),
        "target_pixels": torch.randint(0, 256, (args.batch, size, size, 3), dtype=torch.uint8, generator=generator),
        "query_ids": learner.model.tokenize([INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(args.batch)]),
    }
    if device.type == "cuda":
        batch = {key: value.pin_memory() for key, value in batch.items()}
    ours = lambda b: learner.train_step([b])  # noqa: E731
    ours(batch), bare(batch)  # warm-up (allocator, kernels)
    ours_times, bare_times = [], []
    for _ in range(args.rounds):
        ours_times.append(_timed(ours, batch, args.steps, device))
        bare_times.append(_timed(bare, batch, args.steps, device))
    ours_s, bare_s = statistics.median(ours_times), statistics.median(bare_times)
    print(json.dumps({
        "benchmark": "train_gpu_step", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "size": args.size, "precision": precision, "grad_checkpointing": checkpointing,
        "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
        "trainable_params": learner.trainable,
        "ours_triplets_per_s": args.batch / ours_s, "bare_triplets_per_s": args.batch / bare_s,
        "ratio": bare_s / ours_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }))


if __name__ == "__main__":
    main()
