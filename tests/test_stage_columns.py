"""The embedding stages keep their working columns apart from the source's: metadata named like them
(`instruction`, `box`, `status`, `reason`, `detail`) is carried into the table untouched and changes nothing
about how the images embed; a source column in the stages' reserved namespace is refused."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from served_pool import TINY_MODEL, write_images

from jobs.index import main as index_main
from jobs.stages.embed import STAGE_PREFIX, EmbedOptions, embed_images, read_images
from magiclens_core import Embedder, load_image
from magiclens_core.search.store import ImageTable


def test_metadata_named_like_stage_columns_is_carried_and_images_embed_as_targets(ray_cluster, tmp_path):
    images = [path.read_bytes() for path in write_images(tmp_path / "images", 6)]
    metadata = {
        "instruction": [f"make it number {n}" for n in range(6)],
        "box": [[0.0, 0.0, 8.0, 8.0 + n] for n in range(6)],
        "status": ["rejected", "present", "new", "rejected", None, "archived"],
        "reason": [f"reason {n}" for n in range(6)],
        "detail": [f"detail {n}" for n in range(6)],
        "page": list(range(6)),
    }
    ids = [f"image-{n}" for n in range(6)]  # the source's own `id` column, used as the ids
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "id": ids, **metadata}), tmp_path / "pool.parquet")
    db = tmp_path / "db"
    summary = index_main(["--images", str(tmp_path / "pool.parquet"), "--model", str(TINY_MODEL),
                          "--db", str(db), "--table", "pool", "--id-column", "id"])
    assert summary["rows_added"] == 6 and summary["rejected"] == 0

    rows = {row["page"]: row for row in ImageTable.open(str(db), "pool").head(10).to_pylist()}
    expected = Embedder.load(TINY_MODEL).embed_targets([load_image(data) for data in images])
    for page in range(len(images)):
        row = rows[page]
        assert row["id"] == ids[page]
        assert np.dot(np.asarray(row["vector"], dtype=np.float32), expected[page]) > 0.999
        assert {name: row[name] for name in metadata} == {name: values[page] for name, values in metadata.items()}
    assert not [name for name in ImageTable.open(str(db), "pool").schema.names if name.startswith(STAGE_PREFIX)]


def test_source_columns_that_would_collide_are_refused(ray_cluster, tmp_path):
    image = write_images(tmp_path / "images", 1)[0].read_bytes()
    reserved = tmp_path / "reserved.parquet"
    pq.write_table(pa.table({"image": [image], f"{STAGE_PREFIX}status": ["new"]}), reserved)
    base = ["--model", str(TINY_MODEL), "--db", str(tmp_path / "db"), "--table", "pool"]
    with pytest.raises(ValueError, match="reserve"):
        index_main(["--images", str(reserved), *base])
    own = tmp_path / "own.parquet"
    pq.write_table(pa.table({"image": [image], "width": [3]}), own)
    with pytest.raises(SystemExit, match="width"):
        index_main(["--images", str(own), *base])
    with_ids = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"image": [image], "id": ["mine"]}), with_ids)
    with pytest.raises(SystemExit, match="--id-column id"):
        index_main(["--images", str(with_ids), *base])


def test_the_role_is_explicit(ray_cluster):
    rows = read_images(ray.data.from_items([{"image": b"x", "instruction": "y", "box": [0.0, 0.0, 1.0, 1.0]}]))
    options = EmbedOptions(model=str(TINY_MODEL))
    with pytest.raises(ValueError, match="instruction_column"):
        embed_images(rows, options, 32, role="query")
    with pytest.raises(ValueError, match="instruction_column"):
        embed_images(rows, options, 32, role="target", instruction_column="instruction")
    with pytest.raises(ValueError, match="box"):
        embed_images(rows, EmbedOptions(model=str(TINY_MODEL), gpu_decode=True), 32, role="target",
                     box_column="box")
