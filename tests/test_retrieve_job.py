"""jobs.retrieve run in-process on the session's Ray: the server's answers for the same queries, rejects with
their reason, and a rerun that only does what is missing."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from served_pool import shared_pool, start_app, stop_app

from jobs import retrieve
from magiclens_core.search.filters import FilterError
from serve_app.client import MagicLensClient

K = 5


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    pool = shared_pool(tmp_path_factory)
    url = start_app(pool, {}, {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}})
    yield pool, url
    stop_app()


def write_queries(path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([
        pa.field("query_id", pa.string()), pa.field("uri", pa.string()), pa.field("instruction", pa.string())])),
        path)
    return str(path)


def run_job(pool, queries: str, out, *extra: str) -> dict:
    folders = sorted({str(path.parent) for path in pool.files.values()})  # the query images live beside the pool
    return retrieve.main(["--queries", queries, "--model", pool.model, "--db", pool.db, "--table", pool.table,
                          "--out", str(out), "--k", str(K), "--batch-size", "8", "--allow-uri-prefix", *folders,
                          *extra])


def test_the_job_answers_as_the_server_does_and_resumes(served, tmp_path):
    pool, url = served
    items = list(pool.files.items())
    instructions = ["", "in blue", "two of them", "on the left", ""]
    good = [{"query_id": f"q{n}", "uri": str(items[n][1]), "instruction": instructions[n % 5]} for n in range(10)]
    bad = [{"query_id": "missing", "uri": str(tmp_path / "gone.png"), "instruction": ""},
           {"query_id": "wordy", "uri": str(items[0][1]), "instruction": "very " * 80},
           {"query_id": "outside", "uri": "file:///etc/hostname", "instruction": ""}]
    out = tmp_path / "results.parquet"

    first = run_job(pool, write_queries(tmp_path / "q1.parquet", good[:6] + bad), out)
    assert (first["queries_searched"], first["already_done"], first["rejected"]) == (6, 0, 3)
    rejects = pq.read_table(out / "_rejects.parquet").to_pylist()
    assert {(row["query_id"], row["reason"]) for row in rejects} == {
        ("missing", "unreadable"), ("wordy", "instruction_too_long"), ("outside", "uri_not_allowed")}

    second = run_job(pool, write_queries(tmp_path / "q2.parquet", good + bad), out)  # a rerun after a stop
    assert (second["queries_searched"], second["already_done"], second["rejected"]) == (4, 6, 3)
    results = pq.read_table(out).to_pylist()
    assert sorted(row["query_id"] for row in results) == sorted(query["query_id"] for query in good)
    by_id = {row["query_id"]: row for row in results}
    for n, query in enumerate(good):
        row = by_id[query["query_id"]]
        assert len(row["ids"]) == len(row["scores"]) == K and row["uri"] == query["uri"]
        assert row["scores"] == sorted(row["scores"], reverse=True)
        if query["instruction"] == "":
            assert row["ids"][0] == items[n][0]

    with MagicLensClient(url) as client:
        server = client.search_batch([(query["uri"], query["instruction"]) for query in good], k=K, progress=False)
    for query, hits in zip(good, server, strict=True):
        row = by_id[query["query_id"]]
        assert [hit["id"] for hit in hits] == row["ids"]
        assert [hit["score"] for hit in hits] == pytest.approx(row["scores"], abs=1e-4)


def test_queries_without_ids_get_stable_hashed_ids_and_a_filter_applies(served, tmp_path):
    pool, _ = served
    items = list(pool.files.items())[:4]
    rows = [{"uri": str(path), "instruction": text} for (_, path), text in zip(items, ["", "red", "", "blue"],
                                                                                strict=True)]
    queries = str(tmp_path / "queries.parquet")
    pq.write_table(pa.Table.from_pylist(rows), queries)
    out = tmp_path / "out"
    assert run_job(pool, queries, out, "--filter", f"id != '{items[0][0]}'")["queries_searched"] == 4
    table = pq.read_table(out)
    assert table.num_rows == 4 and len(set(table.column("query_id").to_pylist())) == 4
    first = next(row for row in table.to_pylist() if row["uri"] == str(items[0][1]))
    assert items[0][0] not in first["ids"]  # the filter applied
    assert first["query_id"] == retrieve.query_id(str(items[0][1]), "")  # the same on every run
    with pytest.raises(FilterError, match="unknown filter column"):
        run_job(pool, queries, out, "--filter", "colour = 'red'")
