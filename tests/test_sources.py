"""Image sources: a folder is listed without following links out of it or round a loop, every entry passed
over is counted with its reason, and a Lance dataset is one whatever its folder is called."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from served_pool import TINY_MODEL, write_images

from jobs.index import main as index_main
from jobs.stages.sources import is_lance_dataset, list_files, source_dataset
from jobs.stages.triplets import read_triplets
from magiclens_core.images.identity import content_id


def linked_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A folder of two images with links of every kind in it, and the image its one link out points at."""
    root = tmp_path / "pool"
    first, second = write_images(root / "sub", 2)
    first.rename(root / first.name)
    secret = write_images(tmp_path / "outside", 1, start=200)[0]
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(second.read_bytes())
    (root / "out.png").symlink_to(secret)
    (root / "passwd.png").symlink_to("/etc/passwd")
    (root / "broken.png").symlink_to(root / "gone.png")
    (root / "loop").symlink_to(".")
    (root / "sub" / "up").symlink_to("..")
    (root / "alias").symlink_to(root / "sub")
    (root / "inner.png").symlink_to(root / first.name)  # a link that stays inside: listed
    os.mkfifo(root / "pipe.png")
    return root, secret


def test_a_folder_listing_follows_no_link_out_and_ends(tmp_path):
    root, _ = linked_folder(tmp_path)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(listing=list_files(str(root))), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the listing did not end"
    found, skipped = result["listing"]
    names = [os.path.relpath(path, root) for path in found]
    assert len(names) == 3 and "inner.png" in names and len([n for n in names if n.startswith("sub/")]) == 1
    assert skipped == {"not_an_image_name": 1, "hidden_file": 1, "link_outside_root": 2, "broken_link": 1,
                       "link_loop": 2, "link_to_listed_folder": 1, "not_a_regular_file": 1}
    assert list_files(str(root / "*.png"))[0] == found


def test_the_index_job_counts_what_a_folder_listing_passes_over(ray_cluster, tmp_path):
    root, secret = linked_folder(tmp_path)
    summary = index_main(["--images", str(root), "--model", str(TINY_MODEL), "--db", str(tmp_path / "db"),
                          "--table", "pool"])
    assert summary["rows_added"] == 2 and summary["duplicates"] == 1 and summary["rejected"] == 0
    assert summary["skipped"]["link_outside_root"] == 2 and summary["skipped"]["link_loop"] == 2
    assert summary["skipped_files"] == sum(summary["skipped"].values()) == 9
    rows = lance.dataset(summary["table_uri"]).to_table(columns=["id", "uri"]).to_pylist()
    assert content_id(secret.read_bytes()) not in {row["id"] for row in rows}
    assert all(Path(row["uri"]).resolve().is_relative_to(root.resolve()) for row in rows)


def test_lance_datasets_are_recognised_by_content_not_only_by_name(ray_cluster, tmp_path):
    images = write_images(tmp_path / "images", 2)
    triplets = pa.table({"query_image": [images[0].read_bytes()], "instruction": ["the other one"],
                         "target_image": [images[1].read_bytes()], "uri": [str(images[0])]})
    plain = tmp_path / "triplets_without_suffix"
    lance.write_dataset(triplets, plain)
    pq.write_table(triplets, tmp_path / "triplets.parquet")
    (tmp_path / "parquet_folder").mkdir()
    pq.write_table(triplets, tmp_path / "parquet_folder" / "part-0.parquet")

    assert is_lance_dataset(str(plain)) and is_lance_dataset(f"{plain}/")
    assert is_lance_dataset(str(tmp_path / "named.lance"))  # by its name, before it exists
    for other in ("triplets.parquet", "parquet_folder", "images", "missing"):
        assert not is_lance_dataset(str(tmp_path / other)), other
    assert source_dataset(str(plain)).dataset.take_all()[0]["uri"] == str(images[0])
    assert read_triplets(str(plain)).take_all()[0]["instruction"] == "the other one"
    with pytest.raises(FileNotFoundError):
        source_dataset(str(tmp_path / "missing"))
