"""Writers at the same time on one table or one output: real processes, started together, on a fresh LanceDB
table (one row per id, rejects once each, whatever the interleaving) and on one `jobs.retrieve --out` (the
second run is refused, naming the lock; a dead run leaves no lock behind)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from served_pool import shared_pool

from jobs import retrieve
from jobs.writer_lock import LOCK_FILE
from magiclens_core.images.identity import content_id
from magiclens_core.search.store import ImageTable

ROOT = Path(__file__).resolve().parents[1]
TINY_CHECKPOINT = ROOT / "tests" / "fixtures" / "official_tiny" / "params_tiny.pkl"

# one writer: once told to go, create the table (racing the others), insert its ids in commits, record rejects,
# index
WRITER = """
import json, os, sys, time
import numpy as np, pyarrow as pa
from magiclens_core.search.index_policy import index_table
from magiclens_core.search.store import ImageTable, image_schema
db, first, count, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
table = ImageTable.create(db, "pool", image_schema(8))
rejects = ImageTable.rejects_of(db, "pool")
added = recorded = 0
for lo in range(first, first + count, 20):
    ids = [f"i{n}" for n in range(lo, min(lo + 20, first + count))]
    added += table.add({"id": ids, "vector": np.ones((len(ids), 8), np.float32), "model_id": ["m"] * len(ids)})
    recorded += rejects.add_new(pa.table({"uri": [f"/bad/{int(i[1:]) % 50}.jpg" for i in ids],
                                          "reason": ["corrupt"] * len(ids)}))
index_table(table, added=added)
print(json.dumps({"added": added, "recorded": recorded}))
"""


def test_writers_racing_on_a_fresh_table_insert_each_id_and_reject_once(tmp_path):
    db, writers, go = str(tmp_path / "db"), 4, tmp_path / "go"
    processes = [subprocess.Popen([sys.executable, "-c", WRITER, db, str(100 * w), "300", str(go)],
                                  cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for w in range(writers)]
    assert [process.stdout.readline().strip() for process in processes] == ["ready"] * writers
    go.touch()  # all at once
    results = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0] * writers, [err[-2000:] for _, err in results]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    expected = {f"i{n}" for n in range(100 * (writers - 1) + 300)}  # overlapping ranges: 600 distinct ids
    ids = lancedb.connect(db).open_table("pool").to_arrow().column("id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == expected
    assert sum(summary["added"] for summary in summaries) == len(expected)
    rejects = lancedb.connect(db).open_table("pool_rejects").to_arrow()
    assert sorted(rejects["uri"].to_pylist()) == sorted(f"/bad/{n}.jpg" for n in range(50))  # ids mod 50
    assert sum(summary["recorded"] for summary in summaries) == 50
    stored = ImageTable.open(db, "pool").search_params()  # every writer stored exact search, one after another
    assert stored.index_type is None and stored.recall_at_10 == 1.0 and stored.indexed_rows > 0


def write_folder(folder: Path, count: int) -> tuple[set[str], list[str]]:
    """`count` distinct noise JPEGs and three files that are not images; their ids, and the bad files' paths."""
    folder.mkdir(parents=True)
    ids = set()
    for n in range(count):
        pixels = np.random.default_rng(n).integers(0, 256, size=(20 + n % 9, 24 + n % 7, 3), dtype=np.uint8)
        path = folder / f"img{n:03d}.jpg"
        Image.fromarray(pixels).save(path, format="JPEG")
        ids.add(content_id(path.read_bytes()))
    bad = {"empty.jpg": b"", "notes.jpg": b"not an image\n" * 8, "half.jpg": (folder / "img000.jpg").read_bytes()[:60]}
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    return ids, sorted(str(folder / name) for name in bad)


def test_two_index_jobs_at_once_on_a_fresh_table(ray_cluster, tmp_path):
    good, bad = write_folder(tmp_path / "images", 60)
    db = tmp_path / "db"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "jobs.index", "--images", str(tmp_path / "images"), "--model",
               str(TINY_CHECKPOINT), "--db", str(db), "--table", "pool", "--commit-rows", "2", "--batch-size", "4",
               "--cpus-per-worker", "0.5"]
    jobs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [job.communicate(timeout=600) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], [err[-3000:] for _, err in results]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]

    ids = lancedb.connect(str(db)).open_table("pool").to_arrow().column("id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == good
    assert sum(summary["rows_added"] for summary in summaries) == len(good)
    for summary in summaries:  # each job met every image: added, already there, or committed by the other
        assert summary["rows_added"] + summary["duplicates"] + summary["rows_already_present"] == len(good)
        assert summary["rejected"] == len(bad) and summary["table_rows"] == len(good)
    rejects = lancedb.connect(str(db)).open_table("pool_rejects").to_arrow()
    assert sorted(rejects["uri"].to_pylist()) == bad
    assert sum(summary["rejects_recorded"] for summary in summaries) == len(bad)


HOLDER = """
import sys, time
from jobs.retrieve import Output
with Output(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_an_output_held_by_a_live_run_is_refused_and_a_dead_run_holds_nothing(tmp_path):
    out = tmp_path / "results.parquet"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        lock = out / LOCK_FILE
        with pytest.raises(SystemExit, match=f"pid {holder.pid} on .* holds the lock {lock}"):
            retrieve.Output(str(out)).__enter__()
        with retrieve.Output(str(tmp_path / "other")):  # another --out is free
            pass
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
    with retrieve.Output(str(out)) as output:  # the killed run's lock went with it
        with pytest.raises(SystemExit, match="holds the lock"):  # and a lock holds within one process too
            retrieve.Output(str(out)).__enter__()
        assert output.done_ids().size == 0


def test_a_second_retrieve_on_one_out_is_refused_and_nothing_is_answered_twice(ray_cluster, tmp_path_factory,
                                                                              tmp_path):
    pool = shared_pool(tmp_path_factory)
    queries = tmp_path / "queries.parquet"
    uris = [str(path) for path in pool.files.values()]
    pq.write_table(pa.table({"query_id": [f"q{n}" for n in range(len(uris))], "uri": uris,
                             "instruction": ["in blue" if n % 2 else "" for n in range(len(uris))]}), queries)
    out = tmp_path / "results.parquet"
    folders = sorted({str(Path(uri).parent) for uri in uris})  # the query images are the pool's
    flags = ["--queries", str(queries), "--model", pool.model, "--db", pool.db, "--table", pool.table,
             "--out", str(out), "--k", "3", "--batch-size", "2", "--commit-rows", "2", "--allow-uri-prefix", *folders]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-m", "jobs.retrieve", *flags], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out / LOCK_FILE
    deadline = time.monotonic() + 120
    while first.poll() is None and time.monotonic() < deadline and \
            not (lock.exists() and f"pid {first.pid} " in lock.read_text()):
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before a second could start"
    with pytest.raises(SystemExit, match=f"pid {first.pid} on .* holds the lock {lock}"):
        retrieve.main(flags)
    printed, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert json.loads(printed.strip().splitlines()[-1])["queries_searched"] == len(uris)
    again = retrieve.main(flags)  # after it: nothing left to answer
    assert (again["queries_searched"], again["already_done"]) == (0, len(uris))
    answered = pq.read_table(out).column("query_id").to_pylist()
    assert sorted(answered) == sorted(f"q{n}" for n in range(len(uris)))


def test_a_second_mining_run_on_one_out_is_refused_before_it_touches_the_folder(tmp_path):
    """The mining job holds `--out`'s writer lock from its start: a second run is refused at once, before its
    clean-up of uncommitted parts could remove the first run's parts."""
    from jobs import mine

    out = tmp_path / "mined"
    (out / "triplets").mkdir(parents=True)
    in_flight = out / "triplets" / "part-inflight-00000.parquet"  # a part the holder has not committed yet
    in_flight.write_bytes(b"PAR1")
    holder = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(holder, b"jobs.mine pid 1 on elsewhere")
        config = mine.MineConfig(pages=[str(tmp_path / "pages")], model="unused", out=str(out))
        with pytest.raises(SystemExit, match="jobs.mine pid 1 on elsewhere, which holds the lock"):
            mine.run(config)
        assert in_flight.exists()
    finally:
        os.close(holder)
