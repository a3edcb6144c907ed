"""The common shape every benchmark loader returns: queries, the pool, the images behind the ids."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from magiclens_core.images.decode import crop_instance, load_image

ImageId = str


class BenchmarkDataError(ValueError):
    """A benchmark folder that cannot be read: a missing annotation file or an unknown split."""


@dataclass(frozen=True)
class ImageRef:
    """Where an image lives; `box` ([x, y, w, h]) marks an instance to crop (GeneCIS attribute tasks).

    `data` holds the encoded image when the benchmark keeps its images inside its files (the synthetic
    benchmark); `path` then only names it in messages.
    """

    path: Path
    box: tuple[float, float, float, float] | None = None
    data: bytes | None = field(default=None, repr=False)

    @property
    def exists(self) -> bool:
        return self.data is not None or self.path.is_file()


@dataclass(frozen=True)
class Query:
    """One query: a reference image and an instruction, with what counts as a right answer.

    `ground_truth` holds every correct image (empty on a hidden test split); `target` is the single
    image the instruction was written for (CIRCO's Recall, CIRR's hard target). `candidates` is the
    small set some protocols rank within (CIRR's subset, GeneCIS's gallery), `exclude` an image taken
    out of this query's ranking (CIRR's reference).
    """

    id: str
    reference: ImageId
    text: str
    ground_truth: frozenset[ImageId] = frozenset()
    target: ImageId | None = None
    candidates: tuple[ImageId, ...] | None = None
    exclude: ImageId | None = None
    soft_targets: dict[ImageId, float] | None = None
    aspects: tuple[str, ...] = ()


@dataclass
class Task:
    """Queries ranked against one pool of image ids.

    `pool` is None when its list is not in the folder (CIRCO's gallery comes from COCO); when
    `candidates_only`, each query ranks its own `candidates` and `pool` is their union.
    """

    name: str
    queries: list[Query]
    pool: list[ImageId] | None
    candidates_only: bool = False


@dataclass
class Benchmark:
    """A loaded benchmark split: its tasks, every image the ids refer to, and what is missing."""

    name: str
    split: str
    root: Path
    tasks: list[Task]
    images: dict[ImageId, ImageRef]
    missing: dict[str, Path] = field(default_factory=dict)

    @property
    def queries(self) -> list[Query]:
        return [query for task in self.tasks for query in task.queries]


def read_json(path: Path) -> Any:
    """A JSON annotation file, or `BenchmarkDataError` naming the missing path."""
    if not path.is_file():
        raise BenchmarkDataError(f"annotation file not found: {path}")
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def read_lines(path: Path) -> list[list[str]]:
    """A whitespace-separated text annotation file as split lines (blank lines skipped)."""
    if not path.is_file():
        raise BenchmarkDataError(f"annotation file not found: {path}")
    return [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_split(benchmark: str, split: str, known: tuple[str, ...]) -> None:
    if split not in known:
        raise BenchmarkDataError(f"{benchmark} has no split {split!r}; choose from {', '.join(known)}")


def open_image(ref: ImageRef) -> Image.Image:
    """Decode a benchmark image (cropped when it has a box); raises `ImageDecodeError` with its path."""
    image = load_image(ref.data if ref.data is not None else ref.path)
    return crop_instance(image, ref.box) if ref.box is not None else image
