"""Prediction files: reading any of them for scoring, writing them in each benchmark's submission format.

CIRCO (test server): `{"<query id>": [top-50 image ids as ints]}` for every query. CIRR (test server):
one file per metric, `{"version": "rc2", "metric": "recall" | "recall_subset", "<pairid>": [names]}` with
the top 50 of the gallery or the top 3 of the subset. The other benchmarks have no server; their file has
the same shape as CIRCO's, `{"<query id>": [image ids]}`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from magiclens_core.evaluation.benchmarks.base import Benchmark
from magiclens_core.evaluation.benchmarks.cirr import FILE_SPLIT as CIRR_FILE_SPLIT
from magiclens_core.evaluation.metrics import PredictionError

SUBMISSION_DEPTH = 50
CIRR_SUBSET_DEPTH = 3
CIRR_VERSION = "rc2"


@dataclass
class Predictions:
    """Rankings read from one file; `metric` is CIRR's `recall` / `recall_subset` entry (None elsewhere)."""

    rankings: dict[str, list[str]]
    metric: str | None = None


def read_predictions(path: str | PathLike) -> Predictions:
    """A predictions or submission file; ids become strings, CIRR's `version`/`metric` entries are checked."""
    path = Path(path)
    if not path.is_file():
        raise PredictionError(f"predictions file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PredictionError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise PredictionError(f"{path} must hold a JSON object of query id → ranked image ids")
    version, metric = data.pop("version", None), data.pop("metric", None)
    if version is not None and version != CIRR_VERSION:
        raise PredictionError(f"{path}: version {version!r} is not {CIRR_VERSION!r}")
    if metric not in (None, "recall", "recall_subset"):
        raise PredictionError(f"{path}: metric {metric!r} is neither 'recall' nor 'recall_subset'")
    rankings = {}
    for query_id, ranking in data.items():
        if not isinstance(ranking, list):
            raise PredictionError(f"{path}: query {query_id} maps to {type(ranking).__name__}, not a list of ids")
        rankings[str(query_id)] = [str(image_id) for image_id in ranking]
    return Predictions(rankings, metric)


def _write_json(path: Path, data: Mapping) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_predictions(benchmark: Benchmark, rankings: Mapping[str, Sequence[str]],
                      subset_rankings: Mapping[str, Sequence[str]] | None, out_dir: str | PathLike) -> list[Path]:
    """The benchmark's submission (or predictions) files for every query, in query order; returns their paths."""
    out_dir = Path(out_dir)
    order = [query.id for query in benchmark.queries]
    if benchmark.name == "circo":
        data = {qid: [int(image_id) for image_id in rankings[qid][:SUBMISSION_DEPTH]] for qid in order}
        return [_write_json(out_dir / f"circo_{benchmark.split}_submission.json", data)]
    if benchmark.name == "cirr":
        stem = f"cirr_{CIRR_FILE_SPLIT[benchmark.split]}"
        header = {"version": CIRR_VERSION}
        written = [_write_json(out_dir / f"{stem}_recall.json", {
            **header, "metric": "recall", **{qid: list(rankings[qid][:SUBMISSION_DEPTH]) for qid in order}})]
        if subset_rankings is not None:
            written.append(_write_json(out_dir / f"{stem}_recall_subset.json", {
                **header, "metric": "recall_subset",
                **{qid: list(subset_rankings[qid][:CIRR_SUBSET_DEPTH]) for qid in order}}))
        return written
    data = {qid: list(rankings[qid]) for qid in order}
    return [_write_json(out_dir / f"{benchmark.name}_{benchmark.split}_predictions.json", data)]


def rankings_from_files(benchmark: Benchmark, paths: Sequence[str | PathLike]
                        ) -> tuple[dict[str, list[str]] | None, dict[str, list[str]] | None]:
    """The gallery rankings and the subset rankings (CIRR) that a set of files holds.

    A CIRR `recall_subset` file gives the subset rankings; a file without a `metric` entry is a full
    ranking, from which the subset ranking is taken too (its members in ranked order) when no subset file
    is given.
    """
    rankings = subset = full = None
    for path in paths:
        predictions = read_predictions(path)
        if predictions.metric == "recall_subset":
            subset = predictions.rankings
        elif predictions.metric == "recall":
            rankings = predictions.rankings
        else:
            rankings = full = predictions.rankings
    if benchmark.name == "cirr" and subset is None:
        subset = full
    return rankings, subset
