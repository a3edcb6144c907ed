"""FashionIQ (XiaoxiaoGuo/fashion-iq), validation split, one task per category.

Layout: `ROOT/captions/cap.{category}.val.json`, `ROOT/image_splits/split.{category}.val.json`,
`ROOT/images/<ASIN>.png` (or `.jpg`, as in the original start kit). The pool of a category is its split
file; the reference image stays in it. The query text is the captions joined with `" and "`, as MagicLens
does; empty captions are left out (else the text would start or end with a bare "and").

Metrics: R@10/R@50 per category and their average (the default protocol's per-task recall).
"""

from __future__ import annotations

from pathlib import Path

from magiclens_core.evaluation.benchmarks.base import (
    Benchmark,
    BenchmarkProtocol,
    ImageRef,
    PaperResults,
    Query,
    Task,
    read_json,
)

CATEGORIES = ("dress", "shirt", "toptee")


def query_text(captions: list[str]) -> str:
    return " and ".join(caption for caption in captions if caption.strip())


def _image_path(image_dir: Path, asin: str) -> Path:
    png = image_dir / f"{asin}.png"
    if png.exists():
        return png
    jpg = image_dir / f"{asin}.jpg"
    return jpg if jpg.exists() else png


class FashionIq(BenchmarkProtocol):
    name = "fashioniq"
    recall_ks = (10, 50)
    paper = PaperResults("val", {"dress/R@10": (21.5, 25.5), "shirt/R@10": (27.3, 32.7),
                                 "toptee/R@10": (30.2, 34.0), "average/R@10": (26.3, 30.7)})

    def read(self, root: Path, split: str) -> Benchmark:
        """The three categories' validation queries, each over its own category's pool."""
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
        return Benchmark(self.name, split, root, tasks, images)


PROTOCOL = FashionIq()
