"""The LanceDB image table (magiclens_core.search.store) and its index policy (magiclens_core.search.index_policy):
schema, appends, exact and tuned ANN search, rejects."""

from __future__ import annotations

import json

import lance
import lancedb
import numpy as np
import pyarrow as pa
import pytest

from magiclens_core.search.index_policy import build_index, index_table, tune
from magiclens_core.search.store import SEARCH_KEY, ImageTable, IndexKind, SearchParams, image_schema


def unit(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def clustered(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 50 fixed centres, so an IVF index has structure to find."""
    rng = np.random.default_rng(seed)
    centres = unit(50, dim, seed=12345)
    vectors = centres[rng.integers(0, 50, rows)] + 0.35 * unit(rows, dim, seed + 1000)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def make_table(tmp_path, vectors: np.ndarray, **schema) -> ImageTable:
    table = ImageTable.create(str(tmp_path / "db"), "pool", image_schema(vectors.shape[1], **schema))
    table.add({"id": [f"i{n}" for n in range(len(vectors))], "uri": [f"/img/{n}.jpg" for n in range(len(vectors))],
               "vector": vectors, "model_id": ["m1"] * len(vectors)})
    return table


def test_add_search_and_ids(tmp_path):
    vectors = unit(200, 16)
    table = make_table(tmp_path, vectors)
    assert table.count() == 200 and table.dim == 16
    result = table.search(vectors[7], k=3)
    assert result.column("id").to_pylist()[0] == "i7"
    assert result.column("_distance").to_pylist()[0] == pytest.approx(0.0, abs=1e-5)
    filtered = table.search(vectors[7], k=3, filter="id != 'i7'")
    assert "i7" not in filtered.column("id").to_pylist() and filtered.num_rows == 3
    ids = table.ids()
    assert list(ids) == sorted(f"i{n}".encode() for n in range(200))
    neighbours = table.exact_neighbors(vectors[:5], k=4)
    for row, expected in enumerate(neighbours):
        assert list(expected) == table.search(vectors[row], k=4, exact=True).column("id").to_pylist()


def test_each_add_is_one_version_and_readers_see_commits(tmp_path):
    table = make_table(tmp_path, unit(10, 8))
    reader = ImageTable.open(str(tmp_path / "db"), "pool")
    version = table.version
    table.add({"id": ["x1", "x2"], "vector": unit(2, 8, seed=5)})
    assert table.version == version + 1
    reader.refresh()
    assert reader.count() == 12


def test_a_handle_reads_one_version_until_a_write_or_refresh_moves_it(tmp_path):
    vectors = unit(50, 8)
    writer = make_table(tmp_path, vectors)
    reader = ImageTable.open(str(tmp_path / "db"), "pool")
    version = reader.version
    writer.store_search_params("vector", SearchParams(indexed_rows=50, recall_at_10=1.0))
    writer.add({"id": ["new"], "vector": vectors[:1] * -1})
    assert writer.search_params().indexed_rows == 50 and writer.count() == 51
    assert reader.search_params() == SearchParams() and reader.count() == 50 and reader.version == version
    assert "new" not in reader.search(-vectors[0], 3).column("id").to_pylist()
    reader.refresh()
    assert reader.version == writer.version and reader.search_params().indexed_rows == 50
    found = reader.search(-vectors[0], 3, select=["uri"])
    assert found.column_names == ["uri", "_distance"] and found.column("uri").to_pylist()[0] is None


def test_float16_vectors_metadata_and_plain_readers(tmp_path):
    metadata = pa.schema([pa.field("caption", pa.string()), pa.field("tags", pa.list_(pa.string()))])
    schema = image_schema(8, "float16", clip_dim=8, metadata=metadata)
    table = ImageTable.create(str(tmp_path / "db"), "pool", schema)
    vectors = unit(3, 8)
    table.add(pa.table({"id": ["a", "b", "c"], "vector": pa.FixedSizeListArray.from_arrays(
        pa.array(vectors.reshape(-1)), 8), "caption": ["x", None, "z"], "tags": [["t"], [], None]}))
    plain = lancedb.connect(str(tmp_path / "db")).open_table("pool").to_arrow()
    assert plain.schema.field("vector").type == pa.list_(pa.float16(), 8)
    assert plain.column("caption").to_pylist() == ["x", None, "z"]
    assert plain.column("clip_vector").null_count == 3
    direct = lance.dataset(table.uri).to_table()
    np.testing.assert_allclose(np.stack(direct.column("vector").to_numpy(zero_copy_only=False)), vectors,
                               atol=1e-3)
    with pytest.raises(ValueError, match="clashes"):
        image_schema(8, metadata=pa.schema([pa.field("uri", pa.string())]))


def test_reopening_with_another_vector_type_is_refused(tmp_path):
    make_table(tmp_path, unit(3, 8))
    with pytest.raises(ValueError, match="vector of type"):
        ImageTable.create(str(tmp_path / "db"), "pool", image_schema(16))
    with pytest.raises(FileNotFoundError, match="no table 'other'"):
        ImageTable.open(str(tmp_path / "db"), "other")


def test_add_inserts_each_id_once(tmp_path):
    table = make_table(tmp_path, unit(5, 8))
    version = table.version
    again = {"id": ["i1", "new", "new", "i4", "other"], "vector": unit(5, 8, seed=1)}
    assert table.add(again) == 2  # i1 and i4 are in the table, `new` is given twice
    assert table.version == version + 1 and table.count() == 7
    assert sorted(table.ids().tolist()) == sorted(f"i{n}".encode() for n in range(5)) + [b"new", b"other"]
    first_new = table.get(["new"], ["vector"]).column("vector").to_pylist()[0]
    np.testing.assert_allclose(first_new, again["vector"][1], atol=1e-6)
    assert table.add(again) == 0 and table.version == version + 2  # a commit that inserts nothing


def test_a_table_made_without_a_primary_key_gets_one_on_its_first_add(tmp_path):
    plain = pa.schema([field.remove_metadata() for field in image_schema(8)])
    lancedb.connect(str(tmp_path / "db")).create_table("pool", schema=plain)
    table = ImageTable.open(str(tmp_path / "db"), "pool")
    assert table.add({"id": ["a", "b"], "vector": unit(2, 8)}) == 2
    key = lance.dataset(table.uri).schema.field("id").metadata
    assert key == {b"lance-schema:unenforced-primary-key": b"true"}
    assert ImageTable.open(str(tmp_path / "db"), "pool").add({"id": ["b", "c"], "vector": unit(2, 8)}) == 1


def test_check_model(tmp_path):
    table = make_table(tmp_path, unit(3, 8))
    table.check_model("m1")
    with pytest.raises(ValueError, match="holds embeddings of model 'm1'"):
        table.check_model("m2")


def test_rejects_are_recorded_once(tmp_path):
    rejects = ImageTable.rejects_of(str(tmp_path / "db"), "pool")
    rows = pa.table({"uri": ["/a.jpg", "/b.jpg", "/a.jpg", "/a.jpg"], "id": [None, "h", None, None],
                     "reason": ["corrupt", "empty", "corrupt", "too_small"], "detail": ["x", "y", "x", "z"]})
    assert rejects.add_new(rows) == 3
    assert rejects.add_new(rows) == 0
    assert rejects.add_new(pa.table({"uri": ["it's.jpg"], "reason": ["empty"]})) == 1
    many = pa.table({"uri": [f"/m{n}.jpg" for n in range(40)], "reason": ["corrupt"] * 40})
    assert rejects.add_new(many) == 40 and rejects.add_new(many) == 0
    table = lancedb.connect(str(tmp_path / "db")).open_table("pool_rejects").to_arrow()
    assert sorted(zip(table["uri"].to_pylist(), table["reason"].to_pylist(), strict=True))[:4] == [
        ("/a.jpg", "corrupt"), ("/a.jpg", "too_small"), ("/b.jpg", "empty"), ("/m0.jpg", "corrupt")]
    assert table.num_rows == 44


def test_rejects_of_images_given_as_bytes_are_recorded_once_per_id(tmp_path):
    rejects = ImageTable.rejects_of(str(tmp_path / "db"), "pool")
    rows = pa.table({"uri": [None, None, None, "/c.jpg"], "id": ["h1", "h2", "h1", None],
                     "reason": ["corrupt", "corrupt", "corrupt", "unreadable"], "detail": ["x", "y", "x", "z"]})
    assert rejects.add_new(rows) == 3 and rejects.add_new(rows) == 0
    table = lancedb.connect(str(tmp_path / "db")).open_table("pool_rejects").to_arrow()
    assert sorted(table["key"].to_pylist()) == ["/c.jpg", "id:h1", "id:h2"]


def test_a_rejects_table_made_before_the_key_column_still_records_once(tmp_path):
    old = pa.schema([pa.field(name, pa.string()) for name in ("id", "uri", "reason", "detail")])
    lancedb.connect(str(tmp_path / "db")).create_table("pool_rejects", schema=old)
    rejects = ImageTable.rejects_of(str(tmp_path / "db"), "pool")
    rows = pa.table({"uri": ["/a.jpg", "/a.jpg", "/b.jpg"], "reason": ["corrupt", "corrupt", "empty"]})
    assert rejects.add_new(rows) == 2 and rejects.add_new(rows) == 0


@pytest.mark.parametrize(("kind", "build"), [(IndexKind.IVF_PQ, {"num_partitions": 16, "num_sub_vectors": 8}),
                                             (IndexKind.IVF_HNSW_SQ, {"num_partitions": 2})])
def test_index_tuning_reaches_the_target_and_is_stored(tmp_path, kind, build):
    vectors = clustered(6000, 32)
    table = make_table(tmp_path, vectors)
    used = build_index(table, kind, **build)
    assert used["rows"] == 6000 and used["num_partitions"] == build["num_partitions"]
    params = tune(table, target_recall=0.9, queries=40, build=used)
    print(f"{kind}: measured recall@10 {params.recall_at_10} with nprobes={params.nprobes} "
          f"refine={params.refine_factor} ef={params.ef}, p50 {params.p50_ms} ms")
    assert params.recall_at_10 >= 0.9
    assert params.index_type == kind.value and params.nprobes >= 1
    # stored with the table, where a plain lancedb reader finds it
    field = lancedb.connect(str(tmp_path / "db")).open_table("pool").schema.field("vector")
    stored = json.loads(field.metadata[SEARCH_KEY.encode()])
    assert stored["recall_at_10"] == params.recall_at_10 and stored["nprobes"] == params.nprobes
    reopened = ImageTable.open(str(tmp_path / "db"), "pool")
    assert reopened.search_params() == params
    # search with the stored parameters finds what exact search finds, mostly
    queries = clustered(30, 32, seed=9)
    truth = reopened.exact_neighbors(queries, 10)
    found = [set(reopened.search(q, 10).column("id").to_pylist()) for q in queries]
    recall = np.mean([len(f & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.8


def test_tuned_search_reaches_the_target_on_vectors_the_table_does_not_hold(tmp_path):
    # sparse noisy clusters, where a row's own graph node links its neighbours: tuned on the rows
    # themselves, ef 16 "reached" 0.96 and new vectors got 0.83
    rng = np.random.default_rng(0)
    centres = unit(200, 64, seed=12345)

    def noisy(rows: int, seed: int) -> np.ndarray:
        vectors = centres[rng.integers(0, 200, rows)] + 1.5 * unit(rows, 64, seed)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    table = make_table(tmp_path, noisy(10_000, 1))
    params = tune(table, target_recall=0.9, queries=50,
                  build=build_index(table, IndexKind.IVF_HNSW_SQ, num_partitions=1))
    queries = noisy(200, 2)
    truth = table.exact_neighbors(queries, 10)
    found = [set(table.search(q, 10).column("id").to_pylist()) for q in queries]
    recall = np.mean([len(f & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert params.recall_at_10 >= 0.9 and recall >= 0.88, (params, recall)


def test_index_policy(tmp_path):
    table = make_table(tmp_path, clustered(3000, 16))
    exact = index_table(table, "auto", added=3000, min_rows=5000, queries=10)
    assert exact["type"] is None and exact["recall_at_10"] == 1.0
    table.add({"id": [f"j{n}" for n in range(3000)], "vector": clustered(3000, 16, seed=3)})
    built = index_table(table, "auto", added=3000, min_rows=5000, target_recall=0.9, queries=20, partitions=4)
    assert built["type"] is not None and built["indexed_rows"] == 6000 and built["recall_at_10"] >= 0.9
    assert built["build"]["num_partitions"] == 4
    table.add({"id": [f"k{n}" for n in range(500)], "vector": clustered(500, 16, seed=4)})
    folded = index_table(table, "auto", added=500, min_rows=5000, target_recall=0.9, queries=20, partitions=4)
    assert folded["indexed_rows"] == 6500 and folded["build"] == built["build"]  # not retrained
    assert index_table(table, "auto", added=0, min_rows=5000) == folded  # nothing changed, nothing redone
    assert table.search_params().indexed_rows == 6500
