"""The project run as a team runs it on a real cluster, all on this machine: a head started with
`cluster/local_head.sh`, the indexing and training jobs submitted through the Jobs SDK with the repository as
their working dir, the search application deployed with `serve deploy` and queried over HTTP; then worker
nodes joined to the head, and one of them killed in the middle of an indexing run and of a training run.
One cluster serves the whole module; it is stopped at the end, whatever happened."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import lancedb
import pytest
import ray.train
import yaml
from cluster_head import LOG_TAIL, ROOT, START_TIMEOUT_S, LocalHead, WorkerNode, wait_healthy
from ray.job_submission import JobStatus
from served_pool import TINY_MODEL, Pool, file_ids, free_port, wait_for, write_images

from magiclens_core.factory import describe_model
from magiclens_core.synthetic import SyntheticWorld
from serve_app.client import MagicLensClient

pytestmark = [pytest.mark.cluster, pytest.mark.ray]

HEAD_CPUS = 4  # logical CPUs: both jobs side by side (2 each), then the application (0.75), on 2 cores
JOB_TIMEOUT_S = 600
GOOD = 24  # good images of the pool (two bad files lie beside them)
TRAIN_STEPS, TRAIN_BATCH = 4, 16


@pytest.fixture(scope="module")
def head():
    """The module's one head (4 logical CPUs, free loopback ports, its own temp dir), stopped at the end."""
    head = LocalHead(cpus=HEAD_CPUS)
    try:
        head.start()
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Pool:
    """A generated pool of GOOD images and two bad files, and where its table goes (nothing indexed yet)."""
    root = tmp_path_factory.mktemp("cluster_pool")
    files = file_ids(write_images(root / "images", GOOD))
    (root / "images" / "empty.jpg").write_bytes(b"")
    (root / "images" / "notes.png").write_bytes(b"a text file, not an image\n")
    return Pool(db=str(root / "db"), table="pool", files=files)


def index_command(pool: Pool, *extra: str) -> list[str]:
    folder = {str(path.parent) for path in pool.files.values()}.pop()
    return ["python", "-m", "jobs.index", "--images", folder, "--model", str(TINY_MODEL), "--db", pool.db,
            "--table", pool.table, *extra]


@pytest.fixture(scope="module")
def training(tmp_path_factory) -> dict[str, Path]:
    """Synthetic triplets and the storage folder of the training run."""
    root = tmp_path_factory.mktemp("cluster_train")
    return {"triplets": SyntheticWorld(seed=0).write_triplets(root / "train.parquet", 256), "storage": root / "runs"}


def train_command(training: dict[str, Path], name: str, steps: int, every: int, *extra: str) -> list[str]:
    return ["python", "-m", "jobs.train", "--triplets", str(training["triplets"]), "--init", "tiny", "--name", name,
            "--storage", str(training["storage"]), "--workers", "1", "--batch-size", str(TRAIN_BATCH),
            "--steps", str(steps), "--checkpoint-every", str(every), "--warmup-steps", "1", "--log-every", "1",
            *extra]


@pytest.fixture(scope="module")
def jobs(head, pool, training) -> dict[str, str]:
    """The indexing and the training job, submitted at once (they run side by side); their ids."""
    return {"index": head.submit(*index_command(pool, "--batch-size", "16")),
            "train": head.submit(*train_command(training, "cluster", TRAIN_STEPS, 2))}


@pytest.fixture(scope="module")
def indexed(head, jobs, pool) -> Pool:
    head.wait_job(jobs["index"], JOB_TIMEOUT_S)
    return pool


def table_ids(pool: Pool, name: str | None = None) -> list[str]:
    return lancedb.connect(pool.db).open_table(name or pool.table).to_arrow().column("id").to_pylist()


def test_the_indexing_job_submitted_to_the_cluster_indexes_every_good_image_once(indexed):
    ids = table_ids(indexed)
    assert len(ids) == len(set(ids)) == GOOD
    assert set(ids) == set(indexed.files)
    assert len(table_ids(indexed, f"{indexed.table}_rejects")) == 2


def serve_config(pool: Pool, port: int) -> dict:
    """`serve_app/config.yaml` pointed at the pool's table, on 127.0.0.1:`port`, one replica of each deployment."""
    config = yaml.safe_load((ROOT / "serve_app" / "config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    folder = {str(path.parent) for path in pool.files.values()}.pop()
    app["args"].update(model=str(pool.model), db=pool.db, table=pool.table, allowed_uri_prefixes=[folder])
    for deployment in app["deployments"]:
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
    return config


def test_the_application_deployed_to_the_cluster_answers_queries_over_http(head, indexed, tmp_path):
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(serve_config(indexed, port), sort_keys=False))
    head.cli("serve", "deploy", str(config), "--address", head.url)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, JOB_TIMEOUT_S, why=lambda: head.cli("serve", "status", "--address", head.url))
        image_id, path = sorted(indexed.files.items())[0]
        with MagicLensClient(url) as client:
            hits = client.search(path, "", k=5)
            changed = client.search(image_id=image_id, instruction="the same scene in red", k=5)
        assert [hit["id"] for hit in hits][:1] == [image_id] and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert len(hits) == len(changed) == 5
        assert {hit["id"] for hit in hits + changed} <= set(indexed.files)
        assert Path(hits[0]["uri"]) == path
    finally:
        head.cli("serve", "shutdown", "--address", head.url, "--yes")


def test_the_training_job_submitted_to_the_cluster_exports_its_model(head, jobs, training):
    head.wait_job(jobs["train"], JOB_TIMEOUT_S)
    summary = json.loads((training["storage"] / "cluster" / "summary.json").read_text())
    assert summary["steps"] == TRAIN_STEPS and summary["triplets_seen"] == TRAIN_STEPS * TRAIN_BATCH
    assert Path(summary["model"]).is_dir()
    assert describe_model(summary["model"]).model_id == summary["model_id"]


# ---------------------------------------------------------------- a worker node lost in the middle of a job

WORKER_CPUS = 2  # below HEAD_CPUS: what holds the head's CPUs cannot run on a worker node
FAULT_IMAGES = 96
FAULT_STEPS, FAULT_EVERY = 30, 3
# Ray Train records a reported checkpoint when its controller next polls the workers (every 2 s): sooner, so that
# a checkpoint is recorded well before the end of a run of a few seconds on an idle machine
TRAIN_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
ENDED = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


@pytest.fixture(scope="module")
def workers(head):
    """`workers(n)`: n live worker nodes joined to the head (started as needed); all stopped at the end."""
    nodes: list[WorkerNode] = []

    def live(count: int) -> list[WorkerNode]:
        alive = [node for node in nodes if node.node_id() is not None]
        new = [WorkerNode(head, WORKER_CPUS) for _ in range(count - len(alive))]  # started side by side
        nodes.extend(new)
        for node in new:
            node.wait_started(START_TIMEOUT_S)
        return alive + new

    try:
        yield live
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(scope="module")
def head_reserved(head):
    """The head's CPUs held by an idle job, so that the jobs' tasks and actors run on the worker nodes, as on a
    real cluster whose head takes none (`num-cpus 0`); the jobs' drivers still run on the head."""
    job = head.submit("sleep", "3600", entrypoint_num_cpus=HEAD_CPUS)
    try:
        assert wait_for(lambda: head.status(job) == JobStatus.RUNNING, JOB_TIMEOUT_S), \
            f"the head's {HEAD_CPUS} CPUs did not come free for job {job}: {head.status(job)}"
        yield
    finally:
        head.jobs().stop_job(job)


def node_running(head: LocalHead, job_id: str, nodes: list[WorkerNode], title: str,
                 ready: Callable[[], bool] = lambda: True) -> WorkerNode:
    """The first of `nodes` that runs a process titled `title` for the running job once `ready()`; an
    `AssertionError` when the job ends first."""
    found: list[WorkerNode] = []

    def seen() -> bool:
        if head.status(job_id) in ENDED:
            return True
        found[:] = [node for node in nodes if node.runs(title)] if ready() else []
        return bool(found)

    assert wait_for(seen, JOB_TIMEOUT_S, every_s=0.2), f"no worker node ran {title} within {JOB_TIMEOUT_S} s"
    assert found, (f"job {job_id} ended ({head.status(job_id)}) before a worker node ran {title}:\n"
                   f"{head.jobs().get_job_logs(job_id)[-LOG_TAIL:]}")
    return found[0]


def kill(head: LocalHead, node: WorkerNode) -> None:
    """SIGKILL the node's processes, then wait until the head counts the node dead."""
    node_id = node.node_id()
    node.kill()
    assert wait_for(lambda: head.node_state(node_id) == "DEAD", JOB_TIMEOUT_S), f"node {node_id} still alive"


def test_a_worker_node_killed_mid_run_leaves_exactly_one_row_per_image(head, workers, head_reserved, tmp_path):
    nodes = workers(2)
    pool = Pool(db=str(tmp_path / "db"), table="pool", files=file_ids(write_images(tmp_path / "images", FAULT_IMAGES)))
    job = head.submit(*index_command(pool, "--batch-size", "8", "--commit-rows", "8"))
    victim = node_running(head, job, nodes, "MapWorker")  # the embedding actor's process
    kill(head, victim)
    head.wait_job(job, JOB_TIMEOUT_S)
    ids = table_ids(pool)
    assert len(ids) == len(set(ids)) == FAULT_IMAGES and set(ids) == set(pool.files)


def recorded_step(run: Path) -> int | None:
    """The step of the checkpoint a restarted run resumes from, as Ray Train has recorded it; None before."""
    if not any(run.glob("checkpoint_*")):
        return None
    try:
        result = ray.train.Result.from_path(run)
    except (RuntimeError, ValueError):  # nothing recorded yet, or the record being written
        return None
    return result.metrics["step"] if result.checkpoint else None


@pytest.mark.filterwarnings("ignore:The `parse_obj` method is deprecated")  # Ray Train's, in Result.from_path
def test_a_worker_node_killed_mid_run_training_resumes_from_its_checkpoint(head, workers, head_reserved, training):
    nodes = workers(2)
    name = "faulted"
    job = head.submit(*train_command(training, name, FAULT_STEPS, FAULT_EVERY, "--max-failures", "2"),
                      env_vars=TRAIN_POLL)
    run = training["storage"] / name
    # a checkpoint is written some time before Ray Train records it as the one to resume from
    victim = node_running(head, job, nodes, "RayTrainWorker", ready=lambda: recorded_step(run) is not None)
    recorded = recorded_step(run)
    kill(head, victim)
    head.wait_job(job, JOB_TIMEOUT_S)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == FAULT_STEPS and Path(summary["model"]).is_dir()
    assert recorded <= summary["resumed_from_step"] < FAULT_STEPS, (recorded, summary["resumed_from_step"])
    assert summary["resumed_from_step"] % FAULT_EVERY == 0
