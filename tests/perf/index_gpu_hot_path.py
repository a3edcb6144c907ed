"""The indexing hot path on one GPU with plain torch: JPEG bytes → decode → `Embedder.embed_targets`, images/s.

    python tests/perf/index_gpu_hot_path.py [--size base] [--images 4096] [--batch 256] [--threads 16]

No Ray and no LanceDB: this measures what one embedding worker of `jobs.index` can do. Modes, each on the
same in-memory JPEGs (500x375, photo-like), random `base` weights, bf16 autocast on CUDA:
  embed_only   pixels already decoded and resized (the model's ceiling)
  pil_threads  PIL decode + crop/resize (`model_pixels`) in a thread pool, overlapped with the GPU
  nvjpeg       torchvision's `decode_jpeg` on CUDA + resize on the GPU (`decode_on_device`, `--gpu-decode`)
Prints one JSON object. Goal on one H100: >= 5,000 images/s from JPEG bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jpeg_pool import jpeg_pool  # noqa: E402

from magiclens_core import Embedder, create_model, load_model  # noqa: E402
from magiclens_core.images.pixels import as_float_batch, decode_on_device, model_pixels  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _batches(items: list, size: int) -> list[list]:
    return [items[start:start + size] for start in range(0, len(items), size)]


def embed_only(embedder: Embedder, pool: list[bytes], batch: int) -> int:
    size = embedder.model.image_size
    pixels = as_float_batch(np.stack([model_pixels(pool[0], size)[0]] * batch))
    for _ in range(0, len(pool), batch):
        embedder.embed_targets(pixels)
    return len(pool) // batch * batch


def pil_threads(embedder: Embedder, pool: list[bytes], batch: int, executor: ThreadPoolExecutor,
                threads: int) -> int:
    size = embedder.model.image_size

    def decode(chunk: list[bytes]) -> np.ndarray:
        return np.stack([model_pixels(data, size)[0] for data in chunk])

    decoded = executor.map(decode, _batches(pool, max(1, batch // threads)))  # runs ahead of the GPU
    done, pending = 0, []
    for part in decoded:
        pending.append(part)
        if sum(len(p) for p in pending) >= batch:
            done += len(embedder.embed_targets(as_float_batch(np.concatenate(pending))))
            pending = []
    if pending:
        done += len(embedder.embed_targets(as_float_batch(np.concatenate(pending))))
    return done


def nvjpeg(embedder: Embedder, pool: list[bytes], batch: int) -> int:
    done = 0
    for chunk in _batches(pool, batch):
        pixels, _ = decode_on_device(chunk, embedder.model.image_size, embedder.device)
        done += len(embedder.embed_targets(pixels))
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base", choices=["base", "large"])
    parser.add_argument("--model", default=None, help="a model folder or .pkl instead of random --size weights")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_model(args.model) if args.model else create_model(args.size)
    embedder = Embedder(model, batch_size=args.batch, precision=args.precision)
    device = embedder.device
    pool = jpeg_pool(args.images)
    executor = ThreadPoolExecutor(args.threads)
    modes = {"embed_only": lambda: embed_only(embedder, pool, args.batch),
             "pil_threads": lambda: pil_threads(embedder, pool, args.batch, executor, args.threads)}
    if device.type == "cuda":
        modes["nvjpeg"] = lambda: nvjpeg(embedder, pool, args.batch)
    for run in modes.values():  # warm-up: kernels, nvJPEG handles, thread pool
        run()
    rates: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, run in modes.items():
            _sync(device)
            start = time.perf_counter()
            count = run()
            _sync(device)
            rates[name].append(count / (time.perf_counter() - start))
    median = {name: round(statistics.median(values), 1) for name, values in rates.items()}
    print(json.dumps({
        "benchmark": "index_gpu_hot_path", "model": args.model or args.size,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "precision": embedder.precision, "images": len(pool), "batch": args.batch, "threads": args.threads,
        "rounds": args.rounds, "images_per_s": median,
        "vs_embed_only": {name: round(rate / median["embed_only"], 3) for name, rate in median.items()},
    }))


if __name__ == "__main__":
    main()
