"""GeneCIS (facebookresearch/genecis): four tasks, each query ranks its own 15 candidates.

Layout: `ROOT/{focus_attribute,change_attribute,focus_object,change_object}.json` (the repository's
`genecis/` folder), COCO 2017 val images in `ROOT/val2017/` (object tasks) and Visual Genome 1.2 images in
`ROOT/VG_100K_all/` (attribute tasks, cropped around the instance box). The candidates are the target
followed by the gallery; an image listed twice (one record has its target among the distractors) is
ranked once, which scores exactly as the official tie does. The query text is the condition as is.
A task whose file is absent is listed in `missing`, not scored.

Metrics: R@1/2/3 per task within each query's candidates, and their average (the default protocol's).
"""

from __future__ import annotations

from pathlib import Path

from magiclens_core.evaluation.benchmarks.base import (
    Benchmark,
    BenchmarkDataError,
    BenchmarkProtocol,
    ImageRef,
    PaperResults,
    Query,
    Task,
    read_json,
)

TASKS = ("focus_attribute", "change_attribute", "focus_object", "change_object")


def _object_image(root: Path, item: dict) -> tuple[str, ImageRef]:
    image_id = item["val_image_id"]
    return str(image_id), ImageRef(root / "val2017" / f"{image_id:012d}.jpg")


def _attribute_image(root: Path, item: dict) -> tuple[str, ImageRef]:
    box = tuple(item["instance_bbox"])
    image_id = f"{item['image_id']}:{','.join(str(v) for v in box)}"
    return image_id, ImageRef(root / "VG_100K_all" / f"{item['image_id']}.jpg", box)


class Genecis(BenchmarkProtocol):
    name = "genecis"
    recall_ks = (1, 2, 3)
    paper = PaperResults("val", {"average/R@1": (15.0, 16.3)})

    def read(self, root: Path, split: str) -> Benchmark:
        """The GeneCIS tasks whose annotation files are present; absent ones are listed in `missing`."""
        images: dict[str, ImageRef] = {}
        tasks = []
        missing = {}
        for name in TASKS:
            path = root / f"{name}.json"
            if not path.is_file():
                missing[name] = path
                continue
            describe = _attribute_image if name.endswith("attribute") else _object_image
            queries = []
            for index, record in enumerate(read_json(path)):
                reference, ref = describe(root, record["reference"])
                target, target_ref = describe(root, record["target"])
                images.update({reference: ref, target: target_ref})
                candidates = [target]
                for item in record["gallery"]:
                    image_id, item_ref = describe(root, item)
                    images[image_id] = item_ref
                    if image_id not in candidates:
                        candidates.append(image_id)
                queries.append(Query(id=f"{name}-{index}", reference=reference, text=record["condition"],
                                     ground_truth=frozenset([target]), target=target, candidates=tuple(candidates)))
            pool = list(dict.fromkeys(image_id for query in queries for image_id in query.candidates))
            tasks.append(Task(name, queries, pool, candidates_only=True))
        if not tasks:
            raise BenchmarkDataError(f"no GeneCIS annotation file found in {root} (expected {', '.join(TASKS)}.json)")
        return Benchmark(self.name, split, root, tasks, images, missing)


PROTOCOL = Genecis()
