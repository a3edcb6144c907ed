"""CIRCO (miccunifi/CIRCO): `annotations/{val,test}.json`, images from COCO 2017 unlabeled.

Layout: `ROOT/annotations/{split}.json`, `ROOT/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json`
(the gallery list) and `ROOT/COCO2017_unlabeled/unlabeled2017/*.jpg`. Query text, as MagicLens builds it:
`find {shared_concept} but {relative_caption}`.
"""

from __future__ import annotations

from pathlib import Path

from magiclens_core.evaluation.benchmarks.base import Benchmark, ImageRef, Query, Task, check_split, read_json

SPLITS = ("val", "test")


def query_text(record: dict) -> str:
    return f"find {record['shared_concept']} but {record['relative_caption']}"


def _image_path(root: Path, image_id: int) -> Path:
    return root / "COCO2017_unlabeled" / "unlabeled2017" / f"{image_id:012d}.jpg"


def load(root: Path, split: str = "val") -> Benchmark:
    """CIRCO queries of `split`; the pool is every image of COCO's unlabeled-2017 list (None without it)."""
    check_split("circo", split, SPLITS)
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
    return Benchmark("circo", split, root, [Task("circo", queries, pool)], images, missing)
