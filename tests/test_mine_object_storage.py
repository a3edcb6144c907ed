"""Output in object storage: the mining job writing to a real S3 API (moto's server on 127.0.0.1) commits
each batch by whole uploads, resumes, removes uncommitted parts, and holds the folder with a lease that keeps
a second writer out; the lease itself, raced and lost."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from mine_models import tiny_sentence_model

from jobs import mine
from jobs.common import parse_config
from jobs.writer_lock import LEASE_FILE, LeaseLost, WriterLease, WriterLock
from magiclens_core.synthetic import SyntheticWorld

MODEL = str(Path(__file__).parent / "fixtures" / "official_tiny" / "params_tiny.pkl")
PAGES = 12


@pytest.fixture(scope="module")
def bucket():
    """A bucket on a local S3 server; pyarrow reaches it through the AWS_* variables, as it would AWS."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                            "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                            "AWS_EC2_METADATA_DISABLED": "true"}.items():
            patch.setenv(name, value)
        boto3.client("s3").create_bucket(Bucket="mining")
        yield "mining"
    server.stop()


def _s3() -> pafs.FileSystem:
    return pafs.FileSystem.from_uri("s3://mining")[0]


def _names(folder: str) -> set[str]:
    selector = pafs.FileSelector(folder, allow_not_found=True)
    return {info.base_name for info in _s3().get_file_info(selector) if info.type == pafs.FileType.File}


def _put_lease(folder: str, holder: str, expires: float) -> None:
    with _s3().open_output_stream(f"{folder}/{LEASE_FILE}") as stream:
        stream.write(json.dumps({"holder": holder, "token": "other", "expires": expires}).encode())


def _stray_part(folder: str, name: str) -> None:
    """A triplets part whose batch never committed (its run died before the pages part)."""
    pq.write_table(pa.table({"instruction": ["lost"]}), f"{folder}/triplets/{name}", filesystem=_s3())


def test_mining_to_object_storage_commits_resumes_and_keeps_a_second_writer_out(bucket, ray_cluster, tmp_path):
    site = SyntheticWorld(seed=5).write_web_pages(tmp_path / "site", PAGES)
    out = f"s3://{bucket}/runs/mined"
    args = ["--pages", str(site), "--model", MODEL, "--out", out, "--min-side", "32", "--image-low", "-1",
            "--image-high", "0.9999", "--text-low", "-1", "--text-high", "0.9999",
            "--text-model", str(tiny_sentence_model(tmp_path / "st")),
            "--pages-per-batch", "4", "--commit-pages", "4", "--cpus-per-worker", "0.5"]
    config = parse_config(mine.MineConfig, args)

    first = mine.run(config)
    assert first["pages_read"] == PAGES and first["triplets_written"] > 0
    assert first["triplets"] == f"{out}/triplets"
    written = pq.read_table(f"{out}/triplets")  # read back through the S3 API, as jobs.train reads it
    assert written.num_rows == first["triplets_written"]
    assert written.column("query_image").type == pa.binary() and written.column("instruction").null_count == 0
    assert sum(pq.read_table(f"{out}/pages").column("triplets").to_pylist()) == written.num_rows
    assert LEASE_FILE not in _names(f"{bucket}/runs/mined")  # released at the end
    assert not any(name.startswith(".tmp-") for name in _names(f"{bucket}/runs/mined/triplets"))

    folder = f"{bucket}/runs/mined"
    _stray_part(folder, "part-deadrun-000000.parquet")
    _put_lease(folder, "jobs.mine pid 1 on elsewhere", time.time() + 600)  # a live run holds the folder
    with pytest.raises(SystemExit, match="jobs.mine pid 1 on elsewhere, which holds the lease"):
        mine.run(config)
    assert "part-deadrun-000000.parquet" in _names(f"{folder}/triplets")  # untouched while another holds it

    _put_lease(folder, "jobs.mine pid 1 on elsewhere", time.time() - 1)  # that run died: its lease expired
    rerun = mine.run(config)
    assert rerun["pages_already_done"] == PAGES and rerun["triplets_written"] == 0
    assert rerun["uncommitted_parts_removed"] == 1 and "part-deadrun-000000.parquet" not in _names(f"{folder}/triplets")
    assert pq.read_table(f"{out}/triplets").num_rows == written.num_rows  # nothing twice, nothing lost


def test_an_out_that_pyarrow_cannot_open_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mine.main(["--pages", str(tmp_path), "--model", MODEL, "--out", "nosuchscheme://bucket/mined"])
    assert exit_info.value.code == 2 and "--out nosuchscheme://bucket/mined" in capsys.readouterr().err


def test_two_leases_racing_for_one_folder_leave_one_holder(bucket):
    folder = f"{bucket}/race"
    leases = [WriterLease(_s3(), folder, f"jobs.mine run {index}", ttl_s=30, settle_s=0.5) for index in range(2)]
    outcomes: list[str] = []

    def take(lease: WriterLease) -> None:
        try:
            lease.acquire()
            outcomes.append("held")
        except SystemExit as refusal:
            outcomes.append(str(refusal))

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("held") == 1 and any("which holds the lease" in outcome for outcome in outcomes), outcomes
    for lease in leases:
        lease.release()
    assert LEASE_FILE not in _names(folder)


def test_a_holder_whose_lease_was_taken_over_stops_before_its_next_commit(bucket):
    folder = f"{bucket}/taken"
    with WriterLock(f"s3://{folder}", "jobs.mine", ttl_s=0.6, settle_s=0.05) as lock:
        lock.check()  # held
        _put_lease(folder, "jobs.mine pid 2 on elsewhere", time.time() + 600)  # it stalled; another took over
        time.sleep(0.5)  # one renewal period (a third of the lease's life), and then some
        with pytest.raises(LeaseLost, match="another run took over"):
            lock.check()
    assert "pid 2" in _s3().open_input_stream(f"{folder}/{LEASE_FILE}").read().decode()  # not the loser's to delete
