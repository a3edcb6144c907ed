"""Loaders for the benchmarks MagicLens reports, each reading the folder as its official release lays it out.

`load_benchmark(name, root, split)` returns a `Benchmark`: tasks of queries (reference image id,
instruction text built as the protocol does, ground truth), the pool ids, and `images` (id → path).
Loaders read annotations only; no image is opened until something embeds it.
"""

from __future__ import annotations

from collections.abc import Callable
from os import PathLike
from pathlib import Path

from magiclens_core.evaluation.benchmarks import circo, cirr, dtin, fashioniq, genecis, synthetic
from magiclens_core.evaluation.benchmarks.base import (
    Benchmark,
    BenchmarkDataError,
    ImageId,
    ImageRef,
    Query,
    Task,
    crop_instance,
    open_image,
)

LOADERS: dict[str, Callable[[Path, str], Benchmark]] = {
    "circo": circo.load,
    "cirr": cirr.load,
    "fashioniq": fashioniq.load,
    "dtin": dtin.load,
    "genecis": genecis.load,
    "synthetic": synthetic.load,
}


def load_benchmark(name: str, root: str | PathLike, split: str = "val") -> Benchmark:
    """Read benchmark `name` from its folder `root`; `BenchmarkDataError` names what is missing."""
    if name not in LOADERS:
        raise BenchmarkDataError(f"unknown benchmark {name!r}; choose from {', '.join(LOADERS)}")
    root = Path(root)
    if not root.is_dir():
        raise BenchmarkDataError(f"benchmark folder not found: {root}")
    return LOADERS[name](root, split)


__all__ = [
    "LOADERS",
    "Benchmark",
    "BenchmarkDataError",
    "ImageId",
    "ImageRef",
    "Query",
    "Task",
    "crop_instance",
    "load_benchmark",
    "open_image",
]
