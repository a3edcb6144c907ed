"""What every benchmark shares: the loaded shape (queries, pools, the images behind the ids) and
`BenchmarkProtocol`, the one class a benchmark module subclasses to say how it is read, scored and
submitted, and what the paper reports on it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, ClassVar, Literal

from PIL import Image

from magiclens_core.evaluation.benchmarks.predictions import read_predictions, write_json
from magiclens_core.evaluation.metrics import PredictionError, Rankings, check_rankings, keyed, recall_at_k, restrict
from magiclens_core.images.decode import crop_instance, load_image
from magiclens_core.images.sources import read_uri

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

    def read_bytes(self) -> bytes:
        """The encoded image: `data`, else the file's bytes."""
        return self.data if self.data is not None else read_uri(str(self.path))


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
        """Every task's queries, task after task: the order query embeddings are kept in."""
        return [query for task in self.tasks for query in task.queries]

    @property
    def has_ground_truth(self) -> bool:
        """False on a hidden test split (CIRCO, CIRR test), where only the submission files can be scored."""
        return any(query.ground_truth for query in self.queries)

    def pool_ids(self) -> list[ImageId]:
        """The distinct pool images of all tasks, in first-listed order; a task without its pool list is a
        `BenchmarkDataError` naming what is missing."""
        absent = [task.name for task in self.tasks if task.pool is None]
        if absent:
            listed = ", ".join(f"{name} ({path})" for name, path in self.missing.items())
            raise BenchmarkDataError(f"no pool list for {', '.join(absent)}: missing {listed}")
        return list(dict.fromkeys(image_id for task in self.tasks for image_id in task.pool))


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


def open_image(ref: ImageRef) -> Image.Image:
    """Decode a benchmark image (cropped when it has a box); raises `ImageDecodeError` with its path."""
    image = load_image(ref.data if ref.data is not None else ref.path)
    return crop_instance(image, ref.box) if ref.box is not None else image


CirrTargets = Literal["hard", "soft"]


@dataclass(frozen=True)
class PaperResults:
    """The paper's numbers (Zhang et al., ICML 2024) as (MagicLens-B, MagicLens-L) per metric, and their split."""

    split: str
    numbers: Mapping[str, tuple[float, float]]


class BenchmarkProtocol:
    """How one benchmark is evaluated: its loader (`read`), its metrics (`metrics`, at `recall_ks`), its
    prediction files and the paper's numbers. Each benchmark module defines one subclass and one instance
    (`PROTOCOL`); the registry (`benchmarks.PROTOCOLS`) is the only place that picks one by name.

    The defaults suit a benchmark with one right answer set per query and no submission server: Recall@k
    per task (within each query's candidates when the task is `candidates_only`) and the average over
    tasks, written to `<name>_<split>_predictions.json`.
    """

    name: ClassVar[str]
    splits: ClassVar[tuple[str, ...]] = ("val",)
    recall_ks: ClassVar[tuple[int, ...]]
    submission_depth: ClassVar[int] = 1  # results per query its submission files hold (the least --k)
    paper: ClassVar[PaperResults | None] = None

    def load(self, root: str | PathLike, split: str = "val") -> Benchmark:
        """Read the benchmark from `root` as its official release lays it out; `BenchmarkDataError` names
        what is missing (an unknown split, the folder, an annotation file)."""
        if split not in self.splits:
            raise BenchmarkDataError(f"{self.name} has no split {split!r}; choose from {', '.join(self.splits)}")
        root = Path(root)
        if not root.exists():
            raise BenchmarkDataError(f"benchmark folder not found: {root}")
        return self.read(root, split)

    def read(self, root: Path, split: str) -> Benchmark:
        """The loader proper (annotations only; no image is opened)."""
        raise NotImplementedError

    def score(self, benchmark: Benchmark, rankings: Rankings | None, subset_rankings: Rankings | None = None,
              cirr_targets: CirrTargets = "hard") -> dict[str, float]:
        """The benchmark's official metrics, in percent, from rankings keyed by query id (empty on a hidden
        test split, where the rankings are still checked). `subset_rankings` rank each query's candidates
        (CIRR's subset)."""
        query_ids = [query.id for query in benchmark.queries]
        for given in (rankings, subset_rankings):
            if given is not None:
                check_rankings(query_ids, given)
        if not benchmark.has_ground_truth:
            return {}
        return self.metrics(benchmark, rankings, subset_rankings, cirr_targets)

    def metrics(self, benchmark: Benchmark, rankings: Rankings | None, subset_rankings: Rankings | None,
                cirr_targets: CirrTargets) -> dict[str, float]:
        """Checked rankings → metrics (see the class docstring for the default)."""
        if rankings is None:
            raise PredictionError(f"{self.name} needs a ranking for every query")
        metrics: dict[str, float] = {}
        for task in benchmark.tasks:
            ranked = [restrict(rankings[q.id], q.candidates or ()) if task.candidates_only else rankings[q.id]
                      for q in task.queries]
            metrics |= keyed(f"{task.name}/R", recall_at_k(ranked, [q.ground_truth for q in task.queries],
                                                           self.recall_ks))
        for k in self.recall_ks:
            metrics[f"average/R@{k}"] = sum(metrics[f"{t.name}/R@{k}"] for t in benchmark.tasks) / len(benchmark.tasks)
        return metrics

    def score_settings(self, cirr_targets: CirrTargets) -> dict[str, Any]:
        """The scoring options that changed this benchmark's numbers, for the summary (none by default)."""
        return {}

    def write_predictions(self, benchmark: Benchmark, rankings: Rankings, subset_rankings: Rankings | None,
                          out_dir: str | PathLike) -> list[Path]:
        """The benchmark's submission (or predictions) files for every query, in query order; their paths."""
        data = {query.id: list(rankings[query.id]) for query in benchmark.queries}
        return [write_json(Path(out_dir) / f"{self.name}_{benchmark.split}_predictions.json", data)]

    def rankings_from_files(self, benchmark: Benchmark, paths: Sequence[str | PathLike]
                            ) -> tuple[dict[str, list[str]] | None, dict[str, list[str]] | None]:
        """The rankings and the subset rankings a set of prediction files holds (a `recall_subset` file
        gives the latter)."""
        rankings, subsets, _ = self._read_files(paths)
        return rankings, subsets

    @staticmethod
    def _read_files(paths: Sequence[str | PathLike]) -> tuple[dict | None, dict | None, dict | None]:
        """(rankings, subset rankings, the rankings of a file without a `metric` header)."""
        rankings = subsets = full = None
        for path in paths:
            predictions = read_predictions(path)
            if predictions.metric == "recall_subset":
                subsets = predictions.rankings
            elif predictions.metric == "recall":
                rankings = predictions.rankings
            else:
                rankings = full = predictions.rankings
        return rankings, subsets, full
