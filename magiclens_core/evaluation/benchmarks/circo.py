"""CIRCO (miccunifi/CIRCO): `annotations/{val,test}.json`, images from COCO 2017 unlabeled.

Layout: `ROOT/annotations/{split}.json`, `ROOT/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json`
(the gallery list) and `ROOT/COCO2017_unlabeled/unlabeled2017/*.jpg`. Query text, as MagicLens builds it:
`find {shared_concept} but {relative_caption}`.

Metrics: mAP@5/10/25/50 over all ground truths (`AP@k = Σ_{i≤k} P@i·rel_i / min(|gt|, k)`), Recall@k of
the single target, mAP@10 per semantic aspect. Submission (test server): `circo_<split>_submission.json`,
`{"<query id>": [top-50 image ids as ints]}` for every query.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

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
from magiclens_core.evaluation.benchmarks.predictions import SUBMISSION_DEPTH, write_json
from magiclens_core.evaluation.metrics import (
    Rankings,
    average_precision_at_k,
    keyed,
    mean_average_precision,
    percent_mean,
    recall_at_k,
)

MAP_KS = (5, 10, 25, 50)
ASPECT_K = 10


def query_text(record: dict) -> str:
    return f"find {record['shared_concept']} but {record['relative_caption']}"


def _image_path(root: Path, image_id: int) -> Path:
    return root / "COCO2017_unlabeled" / "unlabeled2017" / f"{image_id:012d}.jpg"


class Circo(BenchmarkProtocol):
    name = "circo"
    splits = ("val", "test")
    recall_ks = (5, 10, 25, 50)
    submission_depth = SUBMISSION_DEPTH
    paper = PaperResults("test", {"mAP@5": (23.1, 29.6), "mAP@10": (23.8, 30.8), "mAP@25": (25.8, 33.4),
                                  "mAP@50": (26.7, 34.4)})

    def read(self, root: Path, split: str) -> Benchmark:
        """CIRCO queries of `split`; the pool is every image of COCO's unlabeled-2017 list (None without it)."""
        records = read_json(root / "annotations" / f"{split}.json")
        images: dict[str, ImageRef] = {}
        queries = []
        for record in records:
            reference = str(record["reference_img_id"])
            images[reference] = ImageRef(_image_path(root, record["reference_img_id"]))
            queries.append(Query(
                id=str(record["id"]),
                reference=reference,
                text=query_text(record),
                ground_truth=frozenset(str(i) for i in record.get("gt_img_ids", ())),
                target=str(record["target_img_id"]) if "target_img_id" in record else None,
                aspects=tuple(record.get("semantic_aspects", ())),
            ))
        gallery_file = root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
        missing = {}
        pool = None
        if gallery_file.is_file():
            entries = read_json(gallery_file)["images"]
            image_dir = root / "COCO2017_unlabeled" / "unlabeled2017"
            pool = [str(entry["id"]) for entry in entries]
            images.update({str(entry["id"]): ImageRef(image_dir / entry["file_name"]) for entry in entries})
        else:
            missing["gallery"] = gallery_file
        return Benchmark(self.name, split, root, [Task("circo", queries, pool)], images, missing)

    def metrics(self, benchmark: Benchmark, rankings: Rankings | None, subset_rankings: Rankings | None,
                cirr_targets: CirrTargets) -> dict[str, float]:
        """mAP@k over all ground truths, Recall@k of the single target, mAP@10 per semantic aspect."""
        if rankings is None:
            return super().metrics(benchmark, rankings, subset_rankings, cirr_targets)  # names what is missing
        queries = benchmark.tasks[0].queries
        ranked = [rankings[query.id] for query in queries]
        metrics = keyed("mAP", mean_average_precision(ranked, [q.ground_truth for q in queries], MAP_KS))
        metrics |= keyed("R", recall_at_k(ranked, [{q.target} for q in queries], self.recall_ks))
        for aspect in sorted({aspect for query in queries for aspect in query.aspects}):
            tagged = [(ranking, q.ground_truth) for ranking, q in zip(ranked, queries, strict=True)
                      if aspect in q.aspects]
            metrics[f"semantic_mAP@{ASPECT_K}/{aspect}"] = percent_mean(
                average_precision_at_k(ranking, truth, ASPECT_K) for ranking, truth in tagged)
        return metrics

    def write_predictions(self, benchmark: Benchmark, rankings: Rankings, subset_rankings: Rankings | None,
                          out_dir: str | PathLike) -> list[Path]:
        """`circo_<split>_submission.json`: the top 50 of every query, ids as ints."""
        data = {q.id: [int(image_id) for image_id in rankings[q.id][:SUBMISSION_DEPTH]] for q in benchmark.queries}
        return [write_json(Path(out_dir) / f"circo_{benchmark.split}_submission.json", data)]


PROTOCOL = Circo()
