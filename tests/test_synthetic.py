"""The synthetic composed-retrieval world: determinism, images that show their attributes, instructions that
match their targets, a held-out benchmark with one right answer per query, retrieval sets and web pages."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from magiclens_core.evaluation.retrieval_set import from_triplets, read_retrieval_set
from magiclens_core.synthetic import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    Scene,
    SyntheticWorld,
    all_scenes,
)

WORLD = SyntheticWorld(seed=11)
WORDS = {"colour": COLOURS, "shape": None, "size": {"large": "bigger", "small": "smaller"},
         "position": {"left": "left", "middle": "middle", "right": "right"},
         "count": {1: "one", 2: "two", 3: "three"}, "background": BACKGROUNDS}


def _scene(key: str) -> Scene:
    colour, shape, size, position, count, background = key.split("-")
    return Scene(colour, shape, size, position, int(count), background)


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_same_seed_same_data_and_rows_do_not_depend_on_n():
    assert SyntheticWorld(seed=11).triplets(6) == WORLD.triplets(6)
    assert WORLD.triplets(9)[:6] == WORLD.triplets(6)
    assert SyntheticWorld(seed=12).triplets(6) != WORLD.triplets(6)
    first = WORLD.benchmark(5, pool_size=20)
    assert first == SyntheticWorld(seed=11).benchmark(5, pool_size=20)


def test_every_scene_is_drawn_as_described():
    rng = np.random.default_rng(0)
    size = WORLD.image_size
    for scene in all_scenes():
        pixels = np.asarray(WORLD.render(scene, rng)).astype(int)
        background = np.array(BACKGROUNDS[scene.background])
        assert (pixels[0, 0] == background).all() and (pixels[-1, -1] == background).all()
        solid = (np.abs(pixels - np.array(COLOURS[scene.colour])).sum(axis=2) < 30)
        assert solid.sum() > 10, scene  # the object's colour is there
        columns = np.nonzero(solid.any(axis=0))[0]
        assert POSITIONS[int(columns.mean() * 3 // size)] == scene.position, scene
        rows = solid.any(axis=1).astype(int)
        assert int((np.diff(rows) == 1).sum() + rows[0]) == scene.count, scene  # separate objects
        height = int(np.argmin(rows[np.argmax(rows):]))  # rows of the first object
        assert (height >= 10) == (scene.size == "large"), (scene, height)


def test_instructions_name_what_changes_and_targets_differ():
    for row in WORLD.triplets(300):
        query, target = _scene(row["query_scene"]), _scene(row["target_scene"])
        changed = [a for a in ATTRIBUTES if getattr(query, a) != getattr(target, a)]
        assert 1 <= len(changed) <= 2
        assert row["query_image"] != row["target_image"]
        for attribute in changed:
            value = getattr(target, attribute)
            word = value if WORDS[attribute] is None else (
                value if attribute in ("colour", "background") else WORDS[attribute][value])
            assert str(word) in row["instruction"], (row["instruction"], attribute, value)


def test_benchmark_is_held_out_with_one_right_answer_per_query():
    bench = WORLD.benchmark(60, pool_size=300)
    assert len(bench) == 60 and len(bench.pool_ids) == 300
    assert len(set(bench.pool_ids)) == 300 and len(set(bench.pool_images)) == 300
    for query_id, answer in zip(bench.query_ids, bench.answers, strict=True):
        query = _scene(query_id.split("-", 1)[1])
        target = _scene(bench.pool_ids[answer])
        change = tuple((a, getattr(target, a)) for a in ATTRIBUTES if getattr(query, a) != getattr(target, a))
        assert change and WORLD.is_held_out(query, change)
        assert sum(pool_id == target.key for pool_id in bench.pool_ids) == 1
    for row in WORLD.triplets(300):
        query, target = _scene(row["query_scene"]), _scene(row["target_scene"])
        change = tuple((a, getattr(target, a)) for a in ATTRIBUTES if getattr(query, a) != getattr(target, a))
        assert not WORLD.is_held_out(query, change)


def test_retrieval_set_round_trips_through_parquet(tmp_path):
    bench = WORLD.benchmark(10, pool_size=40)
    folder = WORLD.write_benchmark(tmp_path / "bench", 10, pool_size=40)
    assert read_retrieval_set(folder) == bench


def test_triplets_file_is_parquet_and_a_retrieval_set(tmp_path):
    path = WORLD.write_triplets(tmp_path / "train.parquet", 50, rows_per_group=16)
    rows = pq.read_table(path).to_pylist()
    assert rows == WORLD.triplets(50)
    as_set = read_retrieval_set(path)
    assert len(as_set) == 50
    assert [as_set.pool_images[a] for a in as_set.answers] == [r["target_image"] for r in rows]
    deduplicated = from_triplets([b"q1", b"q2"], ["a", "b"], [b"same", b"same"])
    assert deduplicated.answers == [0, 0] and len(deduplicated.pool_images) == 1


def test_bad_retrieval_sets_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="outside the pool"):
        type(WORLD.benchmark(2, pool_size=4))(["a"], [b"x"], ["i"], [5], [b"p"], ["p"])
    with pytest.raises(FileNotFoundError):
        read_retrieval_set(tmp_path / "missing")
    with pytest.raises(ValueError, match="over the"):
        WORLD.benchmark(5, pool_size=10_000)


def test_web_pages_group_related_images(tmp_path):
    pages = WORLD.web_pages(4)
    assert pages == SyntheticWorld(seed=11).web_pages(4)
    for page in pages:
        content = [image for image in page.images if image.scene]
        assert 3 <= len(content) <= 6
        shared = [a for a in ATTRIBUTES if len({getattr(_scene(i.scene), a) for i in content}) == 1]
        assert shared, page.title
        logos = [image for image in page.images if not image.scene]
        assert len(logos) == 1 and Image.open(io.BytesIO(logos[0].data)).size == (16, 16)
        html = page.to_html()
        assert all(f'alt="{image.alt}"' in html for image in page.images)
    mixed = WORLD.web_pages(40, galleries=0.5)
    assert mixed[:4] == SyntheticWorld(seed=11).web_pages(4, galleries=0.5)
    galleries = [page for page in mixed if "/gallery/" in page.url]
    assert 10 <= len(galleries) <= 30
    assert [page for page in mixed if page not in galleries] == [pages_ for i, pages_ in enumerate(
        WORLD.web_pages(40)) if "/gallery/" not in mixed[i].url]  # the other pages are the category pages
    for page in galleries:
        scenes = [_scene(image.scene) for image in page.images if image.scene]
        assert 3 <= len(scenes) <= 6 and len(set(scenes)) == len(scenes)
        item = min(scenes, key=lambda scene: max(sum(getattr(scene, a) != getattr(other, a) for a in ATTRIBUTES)
                                                 for other in scenes))
        assert all(1 <= sum(getattr(item, a) != getattr(other, a) for a in ATTRIBUTES) <= 2
                   for other in scenes if other != item)
    with pytest.raises(ValueError, match="share"):
        WORLD.web_pages(2, galleries=1.5)
    folder = WORLD.write_web_pages(tmp_path / "pages", 2)
    assert (folder / "page1.html").is_file()
    assert _pixels((folder / pages[0].images[0].name).read_bytes()).shape == (64, 64, 3)
