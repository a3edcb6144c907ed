"""CIRR (Cuberick-Orion/CIRR, branch `cirr_dataset`), release rc2.

Layout: `ROOT/captions/cap.rc2.{val,test1}.json`, `ROOT/image_splits/split.rc2.{val,test1}.json` and the
NLVR2 image folders (`dev/`, `test1/`) under `ROOT/img_raw/` (CIRR's layout) or directly under `ROOT`.
The gallery is every image of the split file; each query's reference is excluded from its ranking, and its
subset is the other five members of its `img_set`. The query text is the caption as is.

Metrics: Recall@1/2/5/10/50 over the gallery without the reference, Recall_subset@1/2/3 within the
subset, against `target_hard` (CLIP4Cir, SEARLE, most papers) or, with `cirr_targets="soft"`, against
`target_soft` the CIRPLANT way. Submission (test server): `cirr_<val|test1>_recall.json` (top 50) and
`cirr_<val|test1>_recall_subset.json` (top 3 of the subset), each with the `version`/`metric` header.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

from magiclens_core.evaluation.benchmarks.base import (
    Benchmark,
    BenchmarkProtocol,
    CirrTargets,
    ImageRef,
    PaperResults,
    Query,
    Task,
    read_json,
)
from magiclens_core.evaluation.benchmarks.predictions import HEADER_VERSION, SUBMISSION_DEPTH, write_json
from magiclens_core.evaluation.metrics import PredictionError, Rankings, keyed, recall_at_k, restrict, soft_recall_at_k

FILE_SPLIT = {"val": "val", "test": "test1"}
SUBSET_KS = (1, 2, 3)
SUBSET_DEPTH = 3


def image_dir(root: Path) -> Path:
    """Where the split files' relative paths start: `img_raw/` when it exists, else the root."""
    return root / "img_raw" if (root / "img_raw").is_dir() else root


def _query(record: dict) -> Query:
    reference = record["reference"]
    target = record.get("target_hard")
    return Query(
        id=str(record["pairid"]),
        reference=reference,
        text=record["caption"],
        ground_truth=frozenset([target]) if target else frozenset(),
        target=target,
        candidates=tuple(member for member in record["img_set"]["members"] if member != reference),
        exclude=reference,
        soft_targets=record.get("target_soft"),
    )


def _recall(prefix: str, ranked: list[list[str]], queries: Sequence[Query], ks: Sequence[int],
            targets: CirrTargets) -> dict[str, float]:
    if targets == "soft":
        return keyed(prefix, soft_recall_at_k(ranked, [q.soft_targets or {} for q in queries], ks))
    return keyed(prefix, recall_at_k(ranked, [{q.target} for q in queries], ks))


class Cirr(BenchmarkProtocol):
    name = "cirr"
    splits = ("val", "test")
    recall_ks = (1, 2, 5, 10, 50)
    submission_depth = SUBMISSION_DEPTH
    paper = PaperResults("test", {"R@1": (27.0, 30.1), "R@5": (58.0, 61.7), "R@10": (70.9, 74.4),
                                  "R@50": (91.1, 92.6), "R_subset@1": (66.7, 68.1), "R_subset@2": (83.9, 84.8),
                                  "R_subset@3": (92.4, 93.2)})

    def read(self, root: Path, split: str) -> Benchmark:
        """CIRR queries of `split` (`test` reads the `test1` files) over the split's gallery."""
        name = FILE_SPLIT[split]
        records = read_json(root / "captions" / f"cap.rc2.{name}.json")
        gallery = read_json(root / "image_splits" / f"split.rc2.{name}.json")
        base = image_dir(root)
        images = {image_id: ImageRef(base / relative) for image_id, relative in gallery.items()}
        queries = [_query(record) for record in records]
        return Benchmark(self.name, split, root, [Task("cirr", queries, list(gallery))], images)

    def metrics(self, benchmark: Benchmark, rankings: Rankings | None, subset_rankings: Rankings | None,
                cirr_targets: CirrTargets) -> dict[str, float]:
        """Recall@k with the reference removed and Recall_subset@k within the subset; either may be absent."""
        if rankings is None and subset_rankings is None:
            raise PredictionError("cirr needs a ranking or a subset ranking for every query")
        queries = benchmark.tasks[0].queries
        metrics: dict[str, float] = {}
        if rankings is not None:
            ranked = [[item for item in rankings[q.id] if item != q.exclude] for q in queries]
            metrics |= _recall("R", ranked, queries, self.recall_ks, cirr_targets)
        if subset_rankings is not None:
            ranked = [restrict(subset_rankings[q.id], q.candidates or ()) for q in queries]
            metrics |= _recall("R_subset", ranked, queries, SUBSET_KS, cirr_targets)
        return metrics

    def score_settings(self, cirr_targets: CirrTargets) -> dict[str, Any]:
        return {"cirr_targets": cirr_targets}

    def write_predictions(self, benchmark: Benchmark, rankings: Rankings, subset_rankings: Rankings | None,
                          out_dir: str | PathLike) -> list[Path]:
        """The two server files (the subset one when there are subset rankings), with their header."""
        stem = Path(out_dir) / f"cirr_{FILE_SPLIT[benchmark.split]}"
        order = [query.id for query in benchmark.queries]
        header = {"version": HEADER_VERSION}
        written = [write_json(Path(f"{stem}_recall.json"), {
            **header, "metric": "recall", **{qid: list(rankings[qid][:SUBMISSION_DEPTH]) for qid in order}})]
        if subset_rankings is not None:
            written.append(write_json(Path(f"{stem}_recall_subset.json"), {
                **header, "metric": "recall_subset",
                **{qid: list(subset_rankings[qid][:SUBSET_DEPTH]) for qid in order}}))
        return written

    def rankings_from_files(self, benchmark: Benchmark, paths: Sequence[str | PathLike]
                            ) -> tuple[dict[str, list[str]] | None, dict[str, list[str]] | None]:
        """As the default, and a file without a `metric` header (a full ranking) gives the subset
        rankings too (its subset members in ranked order) when no `recall_subset` file is given."""
        rankings, subsets, full = self._read_files(paths)
        return rankings, subsets if subsets is not None else full


PROTOCOL = Cirr()
