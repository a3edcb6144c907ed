"""CIRR (Cuberick-Orion/CIRR, branch `cirr_dataset`), release rc2.

Layout: `ROOT/captions/cap.rc2.{val,test1}.json`, `ROOT/image_splits/split.rc2.{val,test1}.json` and the
NLVR2 image folders (`dev/`, `test1/`) under `ROOT/img_raw/` (CIRR's layout) or directly under `ROOT`.
The gallery is every image of the split file; each query's reference is excluded from its ranking, and its
subset is the other five members of its `img_set`. The query text is the caption as is.
"""

from __future__ import annotations

from pathlib import Path

from magiclens_core.evaluation.benchmarks.base import Benchmark, ImageRef, Query, Task, check_split, read_json

SPLITS = ("val", "test")
FILE_SPLIT = {"val": "val", "test": "test1"}


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


def load(root: Path, split: str = "val") -> Benchmark:
    """CIRR queries of `split` (`test` reads the `test1` files) over the split's gallery."""
    check_split("cirr", split, SPLITS)
    name = FILE_SPLIT[split]
    records = read_json(root / "captions" / f"cap.rc2.{name}.json")
    gallery = read_json(root / "image_splits" / f"split.rc2.{name}.json")
    base = image_dir(root)
    images = {image_id: ImageRef(base / relative) for image_id, relative in gallery.items()}
    queries = [_query(record) for record in records]
    return Benchmark("cirr", split, root, [Task("cirr", queries, list(gallery))], images)
