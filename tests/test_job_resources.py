"""What every job does before its work: inputs checked before Ray starts (one line, exit 2), resource requests
that can never be scheduled refused at once, and a fresh local Ray sized so the default flags never deadlock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import index
from jobs.common import Demand, InputError, check_demand

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "fixtures" / "official_tiny" / "params_tiny.pkl")


def _job(name: str, *argv: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"jobs.{name}", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "RAY_ADDRESS": "local", **(env or {})})


@pytest.mark.parametrize(("job", "argv", "named"), [
    ("index", ["--images", "no/such/folder", "--model", TINY, "--db", "db", "--table", "t"], "--images no/such/folder"),
    ("index", ["--images", "tests", "--model", "no/model", "--db", "db", "--table", "t"], "--model no/model"),
    ("retrieve", ["--queries", "tests", "--model", TINY, "--db", "no/db", "--table", "t", "--out", "o"],
     "--table t: no such table"),
    ("mine", ["--pages", "no/pages/*.warc.gz", "--model", TINY, "--out", "o"], "--pages no/pages/*.warc.gz"),
    ("train", ["--triplets", "no/triplets.parquet", "--init", "tiny", "--name", "n"], "--triplets"),
    ("evaluate", ["--benchmark", "synthetic", "--data", "tests", "--model", "no/model", "--out", "o"], "--model"),
])
def test_a_bad_input_is_one_line_before_ray_starts(job, argv, named, tmp_path):
    finished = _job(job, *argv, env={"RAY_TMPDIR": str(tmp_path)})
    assert finished.returncode == 2, finished.stderr
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and lines[0].startswith(f"jobs.{job}: error: "), lines
    assert not any(tmp_path.iterdir())  # no Ray session was started
    assert not (ROOT / "no").exists()   # and nothing was created for the missing table


def test_a_request_the_cluster_can_never_hold_fails_at_once(ray_cluster, tmp_path, capsys):
    total = ray_cluster.cluster_resources()["CPU"]
    with pytest.raises(InputError, match="lower --workers"):
        check_demand(Demand(cpus=total + 1))
    check_demand(Demand(cpus=total))
    with pytest.raises(InputError, match="GPU"):
        check_demand(Demand(cpus=1, gpus=1))
    with pytest.raises(SystemExit) as stopped:  # through a job's command line, before any data is read
        index.main(["--images", str(ROOT / "tests" / "fixtures"), "--model", TINY, "--db", str(tmp_path / "db"),
                    "--table", "t", "--workers", str(int(total) + 1)])
    assert stopped.value.code == 2
    assert "--workers or --cpus-per-worker" in capsys.readouterr().err
    assert not (tmp_path / "db").exists()


def test_default_flags_finish_on_a_fresh_local_ray(indexed_pool, tmp_path):
    """`RAY_ADDRESS=local` (a new local Ray, of this machine's cores unless the run needs more logical CPUs) and
    every retrieval flag at its default: the embedding and search actors and the read task all get scheduled."""
    pool = indexed_pool
    image_id, path = next(iter(pool.files.items()))
    queries = tmp_path / "queries.parquet"
    pq.write_table(pa.table({"uri": [str(path)], "instruction": ["the same"]}), queries)
    finished = _job("retrieve", "--queries", str(queries), "--model", pool.model, "--db", pool.db,
                    "--table", pool.table, "--out", str(tmp_path / "out"), "--allow-uri-prefix", str(path.parent),
                    timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = json.loads(finished.stdout.strip().splitlines()[-1])
    assert summary["queries_searched"] == 1
    ids = pq.read_table(tmp_path / "out").column("ids")[0].as_py()
    assert len(ids) == len(pool.files) and image_id in ids  # the default k (50) is over the pool's size
