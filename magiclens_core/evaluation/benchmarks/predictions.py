"""Prediction files: `{"<query id>": [image ids, best first]}`, read for scoring and written by each
benchmark's protocol in its submission format.

A file may carry the CIRR server's header entries, `"version": "rc2"` and `"metric": "recall" |
"recall_subset"`; the reader checks and returns them apart from the rankings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from magiclens_core.evaluation.metrics import PredictionError

SUBMISSION_DEPTH = 50  # results per query in the CIRCO and CIRR server files
HEADER_VERSION = "rc2"
HEADER_METRICS = ("recall", "recall_subset")


@dataclass
class Predictions:
    """Rankings read from one file; `metric` is the header's `recall` / `recall_subset` (None without one)."""

    rankings: dict[str, list[str]]
    metric: str | None = None


def read_predictions(path: str | PathLike) -> Predictions:
    """A predictions or submission file; ids become strings, the `version`/`metric` header is checked."""
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
    if version is not None and version != HEADER_VERSION:
        raise PredictionError(f"{path}: version {version!r} is not {HEADER_VERSION!r}")
    if metric is not None and metric not in HEADER_METRICS:
        raise PredictionError(f"{path}: metric {metric!r} is neither 'recall' nor 'recall_subset'")
    rankings = {}
    for query_id, ranking in data.items():
        if not isinstance(ranking, list):
            raise PredictionError(f"{path}: query {query_id} maps to {type(ranking).__name__}, not a list of ids")
        rankings[str(query_id)] = [str(image_id) for image_id in ranking]
    return Predictions(rankings, metric)


def write_json(path: Path, data: Mapping) -> Path:
    """Write one predictions file (creating its folder); returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path
