"""The benchmarks MagicLens reports, and the registry that picks one by name: the only place that does.

Each benchmark module (`circo`, `cirr`, `fashioniq`, `dtin`, `genecis`, `synthetic`) defines one
`BenchmarkProtocol`: its loader (reading the folder as the official release lays it out), its metrics and
k values, its prediction files and the paper's numbers. Adding a benchmark means one module and one
entry in `PROTOCOLS`. `load_benchmark(name, root, split)` returns a `Benchmark`: tasks of queries
(reference image id, instruction text built as the protocol does, ground truth), the pool ids, and
`images` (id → path). Loaders read annotations only; no image is opened until something embeds it.
"""

from __future__ import annotations

from os import PathLike

from magiclens_core.evaluation.benchmarks import circo, cirr, dtin, fashioniq, genecis, synthetic
from magiclens_core.evaluation.benchmarks.base import (
    Benchmark,
    BenchmarkDataError,
    BenchmarkProtocol,
    CirrTargets,
    ImageId,
    ImageRef,
    PaperResults,
    Query,
    Task,
    crop_instance,
    open_image,
)

PROTOCOLS: dict[str, BenchmarkProtocol] = {
    module.PROTOCOL.name: module.PROTOCOL for module in (circo, cirr, fashioniq, dtin, genecis, synthetic)
}
NAMES = tuple(PROTOCOLS)


def protocol(name: str) -> BenchmarkProtocol:
    """The protocol of benchmark `name`; `BenchmarkDataError` for an unknown name."""
    if name not in PROTOCOLS:
        raise BenchmarkDataError(f"unknown benchmark {name!r}; choose from {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def load_benchmark(name: str, root: str | PathLike, split: str = "val") -> Benchmark:
    """Read benchmark `name` from `root`; `BenchmarkDataError` names what is missing."""
    return protocol(name).load(root, split)


__all__ = [
    "NAMES",
    "PROTOCOLS",
    "Benchmark",
    "BenchmarkDataError",
    "BenchmarkProtocol",
    "CirrTargets",
    "ImageId",
    "ImageRef",
    "PaperResults",
    "Query",
    "Task",
    "crop_instance",
    "load_benchmark",
    "open_image",
    "protocol",
]
