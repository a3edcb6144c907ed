"""FashionIQ (XiaoxiaoGuo/fashion-iq), validation split, one task per category.

Layout: `ROOT/captions/cap.{category}.val.json`, `ROOT/image_splits/split.{category}.val.json`,
`ROOT/images/<ASIN>.png` (or `.jpg`, as in the original start kit). The pool of a category is its split
file; the reference image stays in it. The query text is the captions joined with `" and "`, as MagicLens
does; empty captions are left out (else the text would start or end with a bare "and").
"""

from __future__ import annotations

from pathlib import Path

from magiclens_core.evaluation.benchmarks.base import Benchmark, ImageRef, Query, Task, check_split, read_json

CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("val",)


def query_text(captions: list[str]) -> str:
    return " and ".join(caption for caption in captions if caption.strip())


def _image_path(image_dir: Path, asin: str) -> Path:
    png = image_dir / f"{asin}.png"
    if png.exists():
        return png
    jpg = image_dir / f"{asin}.jpg"
    return jpg if jpg.exists() else png


def load(root: Path, split: str = "val") -> Benchmark:
    """The three categories' validation queries, each over its own category's pool."""
    check_split("fashioniq", split, SPLITS)
    image_dir = root / "images"
    tasks = []
    images: dict[str, ImageRef] = {}
    for category in CATEGORIES:
        records = read_json(root / "captions" / f"cap.{category}.{split}.json")
        pool = read_json(root / "image_splits" / f"split.{category}.{split}.json")
        queries = [
            Query(id=f"{category}-{index}", reference=record["candidate"], text=query_text(record["captions"]),
                  ground_truth=frozenset([record["target"]]), target=record["target"])
            for index, record in enumerate(records)
        ]
        for asin in [*pool, *(query.reference for query in queries)]:
            if asin not in images:
                images[asin] = ImageRef(_image_path(image_dir, asin))
        tasks.append(Task(category, queries, list(pool)))
    return Benchmark("fashioniq", split, root, tasks, images)
