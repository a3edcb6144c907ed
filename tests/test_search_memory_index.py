"""The in-memory HNSW graph beside an image table (magiclens_core.search.memory_index, `ImageTable(memory_index=)`):
exact results on small tables, kept in step with appends, merges, compaction and deletes, filters honoured."""

from __future__ import annotations

import lance
import numpy as np
import pyarrow as pa
import pytest

from magiclens_core.search.filters import column_kinds, parse_filter
from magiclens_core.search.memory_index import MemoryIndex
from magiclens_core.search.store import ImageTable, TableVersion, image_schema
from tests.test_store import clustered

pytest.importorskip("faiss")

COLOURS = ["red", "green", "blue", "grey", None]


def colour_table(tmp_path, rows: int, dim: int = 16, first: int = 0, table: ImageTable | None = None) -> ImageTable:
    """A table of clustered vectors with a `colour` metadata column (one row in five NULL), rows `first`.."""
    schema = image_schema(dim, metadata=pa.schema([pa.field("colour", pa.string())]))
    table = table or ImageTable.create(str(tmp_path / "db"), "pool", schema)
    numbers = range(first, first + rows)
    table.add({"id": [f"i{n}" for n in numbers], "vector": clustered(rows, dim, seed=first),
               "colour": [COLOURS[n % len(COLOURS)] for n in numbers]})
    return table


def assert_matches_exact(memory: ImageTable, queries: np.ndarray, k: int = 10, filter=None) -> None:
    """The memory index returns what exact LanceDB search returns: same ids, same distances."""
    for query in queries:
        found = memory.search(query, k, filter, select=["id"])
        exact = memory.search(query, k, filter, select=["id"], exact=True)
        assert found.column_names == ["id", "_distance"]
        assert found.column("id").to_pylist() == exact.column("id").to_pylist()
        np.testing.assert_allclose(found.column("_distance").to_numpy(), exact.column("_distance").to_numpy(),
                                   atol=1e-5)


def test_results_equal_exact_search_and_rows_come_from_the_table(tmp_path):
    colour_table(tmp_path, 800)
    memory = ImageTable.open(str(tmp_path / "db"), "pool", memory_index="faiss")
    queries = clustered(20, 16, seed=99)
    assert_matches_exact(memory, queries)
    full = memory.search(queries[0], 3)
    assert full.column_names == [*memory.schema.names, "_distance"]
    by_id = {row["id"]: row["colour"] for row in memory.head(800, 0, ["id", "colour"]).to_pylist()}
    assert [by_id[i] for i in full.column("id").to_pylist()] == full.column("colour").to_pylist()


def test_appends_by_other_writers_are_found_after_refresh_without_a_rebuild(tmp_path):
    writer = colour_table(tmp_path, 600)
    memory = ImageTable.open(str(tmp_path / "db"), "pool", memory_index="faiss")
    graph = memory.memory_index
    assert graph is not None and graph.rows == 600
    assert ImageTable.open(str(tmp_path / "db"), "pool").memory_index is None
    colour_table(tmp_path, 50, first=600, table=writer)
    new = writer.get(["i620"], ["vector"]).column("vector").to_numpy(zero_copy_only=False)[0]
    assert "i620" not in memory.search(new, 5).column("id").to_pylist()  # not seen before the refresh
    memory.refresh()
    assert graph.rows == 650 and graph.version == memory.version
    assert memory.search(new, 5, select=["id"]).column("id").to_pylist()[0] == "i620"
    assert_matches_exact(memory, clustered(10, 16, seed=7))


def test_own_merges_compaction_and_deletes_keep_the_graph_in_step(tmp_path):
    memory = colour_table(tmp_path, 300)
    memory = ImageTable.open(str(tmp_path / "db"), "pool", memory_index="faiss")
    vectors = clustered(40, 16, seed=5)
    assert memory.add({"id": ["i3", *(f"m{n}" for n in range(39))], "vector": vectors}) == 39  # i3 is kept
    assert memory.search(vectors[5], 1, select=["id"]).column("id").to_pylist() == ["m4"]
    for part in range(3):  # small appends, then compacted: positions of the rows held stay the same
        colour_table(tmp_path, 20, first=1000 + 20 * part, table=memory)
    memory.update_index()
    assert memory.memory_index is not None and memory.memory_index.rows == memory.count() == 399
    assert_matches_exact(memory, clustered(10, 16, seed=8))

    deleted = memory.get(["i7"], ["vector"]).column("vector").to_numpy(zero_copy_only=False)[0]
    lance.dataset(memory.uri).delete("id IN ('i7', 'm4')")  # another writer deletes rows
    memory.refresh()
    assert memory.memory_index.rows == 397
    for query in (deleted, vectors[5]):
        found = memory.search(query, 20, select=["id"]).column("id").to_pylist()
        assert "i7" not in found and "m4" not in found
    assert_matches_exact(memory, np.stack([deleted, vectors[5], *clustered(8, 16, seed=9)]))


@pytest.mark.parametrize("text", ["colour = 'red'", "colour != 'red'", "colour IS NULL",
                                  "colour IN ('green', 'blue') AND id != 'i2'", "colour = 'purple'"])
def test_filters_are_honoured(tmp_path, text):
    colour_table(tmp_path, 700)
    memory = ImageTable.open(str(tmp_path / "db"), "pool", memory_index="faiss")
    tree = parse_filter(text, column_kinds(memory.schema))
    queries = clustered(10, 16, seed=11)
    assert_matches_exact(memory, queries, filter=tree)
    assert_matches_exact(memory, queries[:3], filter=text)


def test_the_graph_walk_under_a_filter_finds_what_exact_search_finds(tmp_path):
    """With no exact fallback, a filter keeping one row in five is searched on the graph."""
    table = colour_table(tmp_path, 2000)
    version = TableVersion(lance.dataset(table.uri))
    graph = MemoryIndex("vector", exact_rows=0)
    assert graph.follow(version) == "built" and graph.follow(version) == "same"
    keep = version.keeps("colour = 'red'")
    matrix = np.stack(table.head(2000, 0, ["vector"]).column("vector").to_numpy(zero_copy_only=False))
    hits = 0
    for query in clustered(20, 16, seed=12):
        positions = graph.search(query[None], 10, "colour = 'red'").positions
        assert keep[positions].all()
        scores = np.where(keep, matrix @ query, -np.inf)
        hits += len(set(positions) & set(np.argsort(-scores)[:10]))
    assert hits / 200 >= 0.95


def test_an_empty_table_is_searchable_and_fills_in(tmp_path):
    ImageTable.create(str(tmp_path / "db"), "pool", image_schema(16, metadata=pa.schema([pa.field(
        "colour", pa.string())])))
    memory = ImageTable.open(str(tmp_path / "db"), "pool", memory_index="faiss")
    assert memory.search(np.ones(16, dtype=np.float32), 5).num_rows == 0
    colour_table(tmp_path, 100, table=ImageTable.open(str(tmp_path / "db"), "pool"))
    memory.refresh()
    assert_matches_exact(memory, clustered(5, 16, seed=13))


def test_an_unknown_memory_index_is_refused(tmp_path):
    colour_table(tmp_path, 10)
    with pytest.raises(ValueError, match="no memory index 'annoy'"):
        ImageTable.open(str(tmp_path / "db"), "pool", memory_index="annoy")


@pytest.mark.parametrize("grown", [False, True], ids=["built", "grown_by_appends"])
def test_the_tuned_breadth_reaches_the_target_on_vectors_the_table_does_not_hold(tmp_path, grown):
    """ef is tuned on the newest rows before they join the graph, so it holds for new queries; a graph of
    few rows is scanned, and tuned again once appends have doubled it."""
    rows, dim = 20_000, 32
    table = colour_table(tmp_path, 400 if grown else rows, dim)
    graph = MemoryIndex("vector", target_recall=0.9)
    graph.follow(TableVersion(lance.dataset(table.uri)))
    if grown:
        assert graph.ef is None and graph.recall_at_k == 1.0  # 400 rows: a scan reads no more than a walk
        colour_table(tmp_path, rows - 400, dim, first=400, table=table)
        assert graph.follow(TableVersion(lance.dataset(table.uri))) == "appended"
    version = TableVersion(lance.dataset(table.uri))
    assert graph.version == version.version and graph.rows == rows
    assert graph.ef is not None and graph.ef * graph.m < rows and graph.recall_at_k >= 0.9  # a tuned walk
    efs = [graph.breadth(kept) for kept in (rows, rows // 5, rows // 10, rows // 50, 100)]
    walked = [ef for ef in efs if ef is not None]
    assert efs[0] == graph.ef and efs[-1] is None and efs[: len(walked)] == walked == sorted(walked), efs
    matrix = np.concatenate(list(version.unit_vectors("vector")))  # in the table's scan order, as positions are
    keep = version.keeps("colour = 'red'")  # a fifth of the rows, more than are gathered and scanned
    hits = kept_hits = 0
    for query in clustered(300, dim, seed=77):  # not rows of the table
        found = graph.search(query[None], 10).positions
        hits += len(set(found) & set(np.argsort(-(matrix @ query))[:10]))
        found = graph.search(query[None], 10, "colour = 'red'").positions
        kept_hits += len(set(found) & set(np.argsort(-np.where(keep, matrix @ query, -np.inf))[:10]))
    assert hits / 3000 >= 0.87 and kept_hits / 3000 >= 0.87  # the target, less the error of 100 tuning queries


def test_a_table_no_cheap_walk_searches_well_is_scanned_exactly(tmp_path):
    """Uniform vectors: no ef with ef x M under the rows reaches the target, so the graph is scanned,
    with and without a filter (one the exact fallback for few kept rows does not take)."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 512))  # no clusters, many dimensions: the hardest case for a graph
    table = ImageTable.create(str(tmp_path / "db"), "pool", image_schema(512, metadata=pa.schema([
        pa.field("colour", pa.string())])))
    table.add({"id": [f"i{n}" for n in range(3000)], "vector": vectors / np.linalg.norm(vectors, axis=1)[:, None],
               "colour": [COLOURS[n % len(COLOURS)] for n in range(3000)]})
    version = TableVersion(lance.dataset(table.uri))
    graph = MemoryIndex("vector", exact_rows=0)
    graph.follow(version)
    assert graph.ef is None and graph.recall_at_k == 1.0
    matrix = np.concatenate(list(version.unit_vectors("vector")))
    keep = version.keeps("colour = 'red'")
    for query in rng.standard_normal((10, 512)).astype(np.float32):
        query /= np.linalg.norm(query)
        assert list(graph.search(query[None], 10).positions) == list(np.argsort(-(matrix @ query))[:10])
        kept = graph.search(query[None], 10, "colour = 'red'").positions
        assert list(kept) == list(np.argsort(-np.where(keep, matrix @ query, -np.inf))[:10])
