"""Embedder throughput vs the bare open_clip image tower, in one run; prints one JSON object.

    python tests/perf/embedder_throughput.py [--size base] [--batches 1 16] [--rounds 7]
    python tests/perf/embedder_throughput.py --size tiny --rounds 2      # CPU smoke test

Every side gets the same [B,3,S,S] pixels in [0,1] at the model's input size S (224 for base and large).
"bare_image" is open_clip's `encode_image` on the normalised pixels; "bare_image_text" adds open_clip's
`encode_text` of the instruction (the whole backbone a query needs). "targets" and "queries" are
`Embedder.embed_targets` / `embed_queries` (preprocessing, the towers, the fusion head, the copy back to
numpy). The ratios compare like with like: targets / bare_image and queries / bare_image_text (goal: under
1.05). Rounds interleave the four so machine noise hits all alike; medians are reported. Runs on CUDA with
bf16 autocast when a GPU is present, else float32 on CPU. Weights are random (the speed does not depend on
them), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from magiclens_core import NAMED_CONFIGS, Embedder, create_model
from magiclens_core.images.preprocess import normalize

INSTRUCTION = "the same building, but an inside view at night"


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(embedder: Embedder, batch: int, rounds: int, iters: int) -> dict:
    device = embedder.device
    size = embedder.model.image_size
    pixels = torch.rand(batch, 3, size, size)
    instructions = [INSTRUCTION] * batch
    clip = embedder.model.clip

    token_ids = embedder.model.tokenize(instructions)

    @torch.inference_mode()
    def bare_image() -> None:
        with embedder.autocast():
            clip.encode_image(normalize(pixels.to(device))).float().cpu()

    @torch.inference_mode()
    def bare_image_text() -> None:
        with embedder.autocast():
            clip.encode_image(normalize(pixels.to(device))).float().cpu()
            clip.encode_text(token_ids.to(device)).float().cpu()

    runs = {
        "bare_image": bare_image,
        "bare_image_text": bare_image_text,
        "targets": lambda: embedder.embed_targets(pixels),
        "queries": lambda: embedder.embed_queries(pixels, instructions),
    }
    for fn in runs.values():  # warm-up (allocations, kernels, the cached empty-text embedding)
        fn()
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            seconds[name].append(_timed(lambda fn=fn: [fn() for _ in range(iters)], device) / iters)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "batch": batch,
        **{f"{name}_images_per_s": round(batch / median[name], 2) for name in runs},
        "targets_vs_bare_image": round(median["targets"] / median["bare_image"], 4),
        "queries_vs_bare_image_text": round(median["queries"] / median["bare_image_text"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base", choices=sorted(NAMED_CONFIGS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=0, help="calls per timed round (default: by device)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    args = parser.parse_args()

    torch.manual_seed(0)
    embedder = Embedder(create_model(args.size), batch_size=max(args.batches), precision=args.precision)
    iters = args.iters or (20 if embedder.device.type == "cuda" else 1)
    results = [measure(embedder, batch, args.rounds, iters) for batch in args.batches]
    device_name = torch.cuda.get_device_name() if embedder.device.type == "cuda" else "cpu"
    print(json.dumps({
        "benchmark": "embedder_throughput",
        "size": args.size,
        "device": device_name,
        "precision": embedder.precision,
        "torch_threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "iters_per_round": iters,
        "results": results,
    }))


if __name__ == "__main__":
    main()
