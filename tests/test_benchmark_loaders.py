"""Benchmark loaders on excerpts of the real annotation files: counts, query texts, the odd records."""

import json

import pytest
from benchmark_folders import FIXTURES, benchmark_folder, placeholder
from PIL import Image

from magiclens_core.evaluation.benchmarks import BenchmarkDataError, ImageRef, crop_instance, load_benchmark, open_image
from magiclens_core.images.identity import content_id
from magiclens_core.synthetic import SyntheticWorld


def by_id(benchmark):
    return {query.id: query for query in benchmark.queries}


def test_circo_val_queries_text_and_ground_truth(tmp_path):
    root = benchmark_folder("circo", tmp_path, images=False)
    val = load_benchmark("circo", root, "val")
    records = json.loads((root / "annotations" / "val.json").read_text())
    assert len(val.queries) == 21 and val.missing == {}
    first = by_id(val)["0"]
    # the record the CIRCO README shows, with MagicLens's template
    assert first.text == ("find a girl with a traditional Chinese umbrella "
                          "but shows two people and has a more colorful background")
    assert first.reference == "271520" and first.target == "355099"
    assert first.ground_truth == {"355099", "528417", "534704"}
    assert first.aspects == ("cardinality", "statement_with_conjunction", "comparative_statement",
                             "spatial_relations_background")
    most = by_id(val)["95"]
    assert len(most.ground_truth) == 14 and most.target in most.ground_truth
    for record in records:
        query = by_id(val)[str(record["id"])]
        assert query.text.startswith(f"find {record['shared_concept']} but ")
        assert query.text.endswith(record["relative_caption"])
    assert val.images["271520"].path == root / "COCO2017_unlabeled" / "unlabeled2017" / "000000271520.jpg"
    # the pool is COCO's list: every referenced image and the distractors, each once
    pool = val.tasks[0].pool
    assert len(pool) == len(set(pool)) and {q.reference for q in val.queries} <= set(pool)
    assert set().union(*(q.ground_truth for q in val.queries)) <= set(pool)


def test_circo_test_split_has_no_ground_truth_and_the_gallery_list_is_optional(tmp_path):
    root = benchmark_folder("circo", tmp_path, images=False)
    test = load_benchmark("circo", root, "test")
    assert len(test.queries) == 20
    assert all(not q.ground_truth and q.target is None and q.aspects == () for q in test.queries)
    gallery = root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
    gallery.unlink()
    without = load_benchmark("circo", root, "val")
    assert without.tasks[0].pool is None and without.missing == {"gallery": gallery}
    assert len(without.queries) == 21


def test_circo_val_without_semantic_aspects_loads(tmp_path):
    """The val.json before 2024-05-07 had no `semantic_aspects` key."""
    root = benchmark_folder("circo", tmp_path, images=False)
    path = root / "annotations" / "val.json"
    records = json.loads(path.read_text())
    path.write_text(json.dumps([{k: v for k, v in r.items() if k != "semantic_aspects"} for r in records]))
    assert all(q.aspects == () for q in load_benchmark("circo", root, "val").queries)


def test_cirr_val_subsets_exclusion_and_odd_soft_targets(tmp_path):
    root = benchmark_folder("cirr", tmp_path, images=False)
    val = load_benchmark("cirr", root, "val")
    records = json.loads((root / "captions" / "cap.rc2.val.json").read_text())
    assert len(val.queries) == 27 and len(val.tasks[0].pool) == 123
    for record in records:
        query = by_id(val)[str(record["pairid"])]
        assert query.text == record["caption"]
        assert query.exclude == query.reference == record["reference"]
        assert len(query.candidates) == 5 and query.reference not in query.candidates
        assert query.target in query.candidates and query.ground_truth == {record["target_hard"]}
        assert query.soft_targets == record["target_soft"]
    odd = {str(r["pairid"]): r for r in records}
    hard_missing = [q for q in val.queries if q.target not in q.soft_targets]
    assert len(hard_missing) == 2 and all(q.reference in q.soft_targets for q in hard_missing)
    assert sorted(q.soft_targets.get(q.target) for q in val.queries if q.soft_targets.get(q.target, 1.0) != 1.0) \
        == [-1.0, 0.2, 0.5]
    assert any(set(odd[q.id]["target_soft"]) - set(odd[q.id]["img_set"]["members"]) for q in val.queries)
    assert val.images["dev-244-0-img0"].path == root / "dev" / "dev-244-0-img0.png"
    (root / "img_raw").mkdir()
    assert load_benchmark("cirr", root, "val").images["dev-244-0-img0"].path == \
        root / "img_raw" / "dev" / "dev-244-0-img0.png"


def test_cirr_test_reads_the_test1_files(tmp_path):
    root = benchmark_folder("cirr", tmp_path, images=False)
    test = load_benchmark("cirr", root, "test")
    assert len(test.queries) == 20 and len(test.tasks[0].pool) == 68
    first = by_id(test)["12063"]
    assert first.text == "remove all but one dog and add a woman hugging it"
    assert first.target is None and first.ground_truth == frozenset() and first.soft_targets is None
    assert first.candidates == ("test1-1001-2-img0", "test1-83-1-img1", "test1-359-0-img1", "test1-906-0-img1",
                                "test1-83-0-img1")


def test_fashioniq_categories_texts_and_empty_captions(tmp_path):
    root = benchmark_folder("fashioniq", tmp_path, images=False)
    fiq = load_benchmark("fashioniq", root, "val")
    assert [(t.name, len(t.queries), len(t.pool)) for t in fiq.tasks] == \
        [("dress", 15, 45), ("shirt", 16, 47), ("toptee", 18, 51)]
    empty = []
    for task in fiq.tasks:
        records = json.loads((root / "captions" / f"cap.{task.name}.val.json").read_text())
        for query, record in zip(task.queries, records, strict=True):
            assert query.reference == record["candidate"] and query.ground_truth == {record["target"]}
            assert query.target in task.pool and query.reference in task.pool
            if all(record["captions"]):
                assert query.text == f"{record['captions'][0]} and {record['captions'][1]}"
            else:
                empty.append(query.id)
                assert query.text == record["captions"][1]
    assert empty == ["shirt-15", "toptee-16", "toptee-17"]  # shirt #1928, toptee #676 and #1076
    leading = [q for q in fiq.queries if q.text.startswith(" ") or "  " in q.text]
    assert leading, "captions with a leading space are kept verbatim"
    ids = [q.id for q in fiq.queries]
    assert len(ids) == len(set(ids)) and ids[0] == "dress-0"


def test_fashioniq_finds_jpg_images_of_the_start_kit(tmp_path):
    root = benchmark_folder("fashioniq", tmp_path, images=False)
    asin = load_benchmark("fashioniq", root).tasks[0].pool[0]
    assert load_benchmark("fashioniq", root).images[asin].path.name == f"{asin}.png"
    placeholder(root / "images" / f"{asin}.jpg", asin)
    assert load_benchmark("fashioniq", root).images[asin].path.name == f"{asin}.jpg"


def test_dtin_domains_hit_labels_and_queries_without_targets(tmp_path):
    root = benchmark_folder("dtin", tmp_path, images=False)
    dtin = load_benchmark("dtin", root)
    targets = [line.split() for line in (root / "imgnet_targets.txt").read_text().splitlines()]
    assert [t.name for t in dtin.tasks] == ["cartoon", "origami", "toy", "sculpture"]
    assert all(len(t.queries) == 8 and t.pool == [p for p, _ in targets] for t in dtin.tasks)
    for domain_id, task in enumerate(dtin.tasks):
        for query in task.queries:
            class_id = int(query.id.split("-class-")[1].split("-to-")[0])
            assert query.text == f"find this object in {task.name}"
            assert query.id == f"{query.reference.rsplit('/', 1)[1]}-class-{class_id}-to-{task.name}"
            assert query.ground_truth == {p for p, label in targets if int(label) == domain_id * 1000 + class_id}
    # class 5 has origami targets only: its 3 queries can never hit in the other domains
    assert {t.name: sum(not q.ground_truth for q in t.queries) for t in dtin.tasks} == \
        {"cartoon": 3, "origami": 0, "toy": 3, "sculpture": 3}
    ref = dtin.images["imgnet/real/n02268443/ILSVRC2012_val_00036578.JPEG"]
    assert ref.path == root / "real" / "n02268443" / "ILSVRC2012_val_00036578.JPEG"
    assert all(q.reference in dtin.tasks[0].pool for q in dtin.queries)  # real images stay as distractors


def test_genecis_object_tasks_candidates_and_missing_attribute_tasks(tmp_path):
    root = benchmark_folder("genecis", tmp_path, images=False)
    genecis = load_benchmark("genecis", root)
    assert [t.name for t in genecis.tasks] == ["focus_object", "change_object"]
    assert genecis.missing == {name: root / f"{name}.json" for name in ("focus_attribute", "change_attribute")}
    records = json.loads((root / "change_object.json").read_text())
    for task in genecis.tasks:
        assert task.candidates_only
        for query in task.queries:
            assert query.candidates[0] == query.target and query.reference not in query.candidates
    change = genecis.tasks[1].queries
    assert [len(q.candidates) for q in change] == [15] * 12 + [14]  # record 19 lists its target twice
    assert change[-1].candidates == tuple(dict.fromkeys(
        [str(records[-1]["target"]["val_image_id"]), *(str(g["val_image_id"]) for g in records[-1]["gallery"])]))
    assert change[0].text == records[0]["condition"]
    image_id = change[0].reference
    assert genecis.images[image_id].path == root / "val2017" / f"{int(image_id):012d}.jpg"


def test_genecis_attribute_task_crops_instances(tmp_path):
    """The attribute files were not available; this record follows the layout the GeneCIS code reads."""
    root = benchmark_folder("genecis", tmp_path, images=False)
    item = lambda image_id, box: {"image_id": image_id, "instance_bbox": box}  # noqa: E731
    record = {"condition": "red", "reference": item(1, [10, 20, 30, 40]), "target": item(2, [0, 0, 50, 10]),
              "gallery": [item(3, [5.5, 5, 20, 20]), item(2, [1, 1, 2, 2])]}
    (root / "focus_attribute.json").write_text(json.dumps([record]))
    genecis = load_benchmark("genecis", root)
    query = genecis.tasks[0].queries[0]
    assert genecis.tasks[0].name == "focus_attribute" and "focus_attribute" not in genecis.missing
    assert query.candidates == ("2:0,0,50,10", "3:5.5,5,20,20", "2:1,1,2,2")
    assert genecis.images["1:10,20,30,40"] == ImageRef(root / "VG_100K_all" / "1.jpg", (10, 20, 30, 40))
    placeholder(root / "VG_100K_all" / "1.jpg", "1", size=(100, 80))
    crop = open_image(genecis.images["1:10,20,30,40"])
    # left = 10 - 0.7*30 -> 0, top = 20 - 0.7*40 -> 0, right = 0 + 1.7*30 = 51, bottom = min(80, 68) = 68
    assert crop.size == (68, 68)


def test_crop_pads_to_a_centred_black_square():
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    crop = crop_instance(image, (100, 40, 40, 10))  # left 72, top 33, right 140, bottom 50: 68 x 17
    assert crop.size == (68, 68)
    assert crop.getpixel((34, 0)) == (0, 0, 0) and crop.getpixel((34, 34)) == (255, 255, 255)


@pytest.mark.parametrize("name,split,message", [
    ("nope", "val", "unknown benchmark"),
    ("circo", "train", "no split 'train'"),
    ("fashioniq", "test", "no split 'test'"),
])
def test_bad_names_and_splits_are_clear_errors(name, split, message):
    with pytest.raises(BenchmarkDataError, match=message):
        load_benchmark(name, FIXTURES / "circo", split)


def test_missing_folder_or_annotation_file_names_the_path(tmp_path):
    with pytest.raises(BenchmarkDataError, match="benchmark folder not found"):
        load_benchmark("cirr", tmp_path / "absent")
    root = benchmark_folder("cirr", tmp_path, images=False)
    (root / "image_splits" / "split.rc2.val.json").unlink()
    with pytest.raises(BenchmarkDataError, match="split.rc2.val.json"):
        load_benchmark("cirr", root, "val")
    empty = tmp_path / "genecis_empty"
    empty.mkdir()
    with pytest.raises(BenchmarkDataError, match="no GeneCIS annotation file"):
        load_benchmark("genecis", empty)


def test_synthetic_reads_a_retrieval_set_folder(tmp_path):
    world = SyntheticWorld(seed=5)
    retrieval_set = world.benchmark(6, pool_size=20)
    root = world.write_benchmark(tmp_path / "bench", 6, pool_size=20)
    bench = load_benchmark("synthetic", root)
    (task,) = bench.tasks
    assert task.pool == retrieval_set.pool_ids and [q.id for q in bench.queries] == retrieval_set.query_ids
    for query, text, answer, image in zip(bench.queries, retrieval_set.instructions, retrieval_set.answers,
                                          retrieval_set.query_images, strict=True):
        assert query.text == text and query.ground_truth == {retrieval_set.pool_ids[answer]}
        assert bench.images[query.reference].read_bytes() == image
    assert [bench.images[i].read_bytes() for i in task.pool] == retrieval_set.pool_images


def test_synthetic_reads_held_out_triplets_whose_distinct_targets_are_the_pool(tmp_path):
    world = SyntheticWorld(seed=6)
    path = world.write_triplets(tmp_path / "held_out.parquet", 12)
    rows = world.triplets(12)
    bench = load_benchmark("synthetic", path)
    (task,) = bench.tasks
    assert len(bench.queries) == 12 and task.pool == list(dict.fromkeys(content_id(r["target_image"]) for r in rows))
    for query, row in zip(bench.queries, rows, strict=True):
        assert query.text == row["instruction"] and query.target == content_id(row["target_image"])
        assert bench.images[query.target].read_bytes() == row["target_image"]


def test_synthetic_refuses_what_is_not_a_retrieval_set(tmp_path):
    with pytest.raises(BenchmarkDataError, match="benchmark folder not found"):
        load_benchmark("synthetic", tmp_path / "absent")
    with pytest.raises(BenchmarkDataError, match="not a retrieval set: give a folder with queries.parquet and pool"):
        load_benchmark("synthetic", tmp_path)
    with pytest.raises(BenchmarkDataError, match="has no split 'test'"):
        load_benchmark("synthetic", tmp_path, "test")
