"""Benchmark folders for tests: the annotation excerpts of `fixtures/benchmarks/` copied to a temporary
folder, plus placeholder images for every image they reference (and, for CIRCO, the COCO gallery list)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from PIL import Image

from magiclens_core.evaluation.benchmarks import load_benchmark

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
SPLITS = {"circo": ("val", "test"), "cirr": ("val", "test")}
CIRCO_DISTRACTORS = 40


def placeholder(path: Path, key: str, size: tuple[int, int] = (40, 30)) -> None:
    """A small image whose colours derive from `key`, so different ids get different embeddings."""
    digest = hashlib.sha256(key.encode()).digest()
    image = Image.new("RGB", size, tuple(digest[:3]))
    image.paste(tuple(digest[3:6]), (size[0] // 4, size[1] // 4, size[0] // 2 + digest[6] % (size[0] // 2),
                                     size[1] // 2 + digest[7] % (size[1] // 2)))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_coco_gallery(root: Path) -> None:
    """COCO's `image_info_unlabeled2017.json` for the CIRCO excerpt: every image it names, plus distractors."""
    ids: set[int] = set(range(1, CIRCO_DISTRACTORS + 1))
    for split in SPLITS["circo"]:
        for record in json.loads((root / "annotations" / f"{split}.json").read_text()):
            ids.add(record["reference_img_id"])
            ids.update(record.get("gt_img_ids", ()))
    info = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in sorted(ids)]}
    folder = root / "COCO2017_unlabeled" / "annotations"
    folder.mkdir(parents=True)
    (folder / "image_info_unlabeled2017.json").write_text(json.dumps(info))


def benchmark_folder(name: str, parent: Path, images: bool = True) -> Path:
    """`parent/name`: the excerpt of benchmark `name`, with placeholder images unless `images=False`."""
    root = parent / name
    shutil.copytree(FIXTURES / name, root)
    if name == "circo":
        write_coco_gallery(root)
    if images:
        for split in SPLITS.get(name, ("val",)):
            for image_id, ref in load_benchmark(name, root, split).images.items():
                if not ref.path.exists():
                    placeholder(ref.path, image_id)
    return root
