"""Pipeline efficiency of the indexing job: its images/s vs the slower of decoding alone and embedding alone.

    python tests/perf/index_pipeline.py [--size tiny|base] [--images 2000] [--model PATH]

In one run, on the same machine, model and JPEG files (500x375, photo-like, written to a temporary folder):
  decode_only  `model_pixels` (read, decode, crop/resize) over all files in one process per core
  embed_only   `Embedder.embed_targets` on already prepared pixels, one process (torch uses every core)
  job          `python -m jobs.index` in-process on a local Ray (whole run: listing, reading, decoding,
               embedding, LanceDB commits; model load included), `--index none`
efficiency = job / min(decode_only, embed_only); goal >= 0.8 for `base`, >= 0.6 for `tiny` (where Ray's
per-batch overhead shows). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import atexit
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jpeg_pool import jpeg_pool  # noqa: E402

from jobs import index  # noqa: E402
from magiclens_core import Embedder, create_model, save_model  # noqa: E402
from magiclens_core.images.pixels import as_float_batch, model_pixels  # noqa: E402

OFFICIAL_TINY = Path(__file__).resolve().parents[1] / "fixtures" / "official_tiny" / "params_tiny.pkl"


def _decode_files(paths: list[str], size: int) -> int:
    for path in paths:
        model_pixels(Path(path).read_bytes(), size)
    return len(paths)


def decode_only(paths: list[str], size: int, processes: int) -> float:
    chunks = [paths[i::processes] for i in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_decode_files, chunks[:1] * processes, [size] * processes))  # warm-up: imports
        start = time.perf_counter()
        done = sum(pool.map(_decode_files, chunks, [size] * processes))
    return done / (time.perf_counter() - start)


def embed_only(embedder: Embedder, count: int, batch: int) -> float:
    pixels = as_float_batch(np.zeros((batch, embedder.model.image_size, embedder.model.image_size, 3), np.uint8))
    embedder.embed_targets(pixels)
    start = time.perf_counter()
    for _ in range(0, count, batch):
        embedder.embed_targets(pixels)
    return (count // batch * batch or batch) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "base"])
    parser.add_argument("--model", default=None, help="a model folder or .pkl (default: by --size: random base "
                        "weights, or the tiny official-format checkpoint of the test fixtures)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the decode and embed measurements")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="index_pipeline_"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    torch.manual_seed(0)
    if args.model:
        model_dir = args.model
    elif args.size == "base":
        model_dir = str(save_model(create_model("base"), work / "model"))
    else:  # the official-format tiny checkpoint: 224-pixel input, so decoding costs what it costs with base
        model_dir = str(OFFICIAL_TINY)
    images = work / "images"
    images.mkdir()
    for number, data in enumerate(jpeg_pool(args.images)):
        (images / f"{number:06d}.jpg").write_bytes(data)
    paths = sorted(str(p) for p in images.iterdir())
    embedder = Embedder.load(model_dir, batch_size=args.batch)
    size = embedder.model.image_size
    cores = os.cpu_count() or 1
    decode = statistics.median(decode_only(paths, size, cores) for _ in range(args.rounds))
    embed = statistics.median(embed_only(embedder, min(len(paths), 512), args.batch) for _ in range(args.rounds))
    del embedder

    # The embedding actor reserves every core (so torch uses them all, as embed_only does); logical CPUs
    # beyond the cores leave room for the decode tasks, which the OS interleaves with the model.
    ray.init(num_cpus=2 * cores, include_dashboard=False)
    summary = index.main(["--images", str(images), "--model", model_dir, "--db", str(work / "db"),
                          "--table", "pool", "--index", "none", "--batch-size", str(args.batch),
                          "--cpus-per-worker", str(cores)])
    job = summary["images_per_s"]
    print(json.dumps({
        "benchmark": "index_pipeline", "size": args.size, "images": args.images, "batch": args.batch,
        "cores": cores, "torch_threads": torch.get_num_threads(),
        "decode_only_images_per_s": round(decode, 1), "embed_only_images_per_s": round(embed, 1),
        "job_images_per_s": job, "rows_added": summary["rows_added"],
        "efficiency": round(job / min(decode, embed), 3),
    }))


if __name__ == "__main__":
    main()
