"""A real Ray cluster on this machine, run as a team runs one: the head of `cluster/local_head.sh` on free
loopback ports, worker nodes joined to it as `ray start --address` joins one, jobs submitted through the Jobs
SDK and the application deployed with the `serve` CLI. What is started here is stopped by its process group (the
script's `stop`, `WorkerNode.stop`), never by a plain `ray stop`, which would stop every Ray of the user."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx
from ray.job_submission import JobStatus, JobSubmissionClient
from served_pool import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local_head.sh"
BIN = Path(sys.executable).parent  # the project's `ray` and `serve` programs
START_TIMEOUT_S = 300  # for Ray's dashboard, then for the job server (a loaded 2-core machine needs over 60 s)
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # nodes keep 127.0.0.1 as their address (see local_head.sh)
# what the jobs upload: the repository without the tests (their data and outputs are given as absolute paths)
WORKING_DIR = {"working_dir": str(ROOT), "excludes": ["tests/"]}
LOG_TAIL = 6000  # characters of a job's log in a failure message
WORKER_OBJECT_STORE = 256 * 1024**2  # bytes of a worker node's object store


def _temp_dir() -> Path:
    """A short folder for Ray's temp dir (its socket paths under it must stay within 107 characters)."""
    return Path(tempfile.mkdtemp(prefix="mlc-", dir="/tmp"))


def _free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def group_pids(pgid: int) -> list[int]:
    """The live processes of process group `pgid` and every process descending from them."""
    table = subprocess.run(["ps", "-eo", "pid=,ppid=,pgid=,stat="], capture_output=True, text=True,
                           check=True).stdout
    parent, mine = {}, set()
    for line in table.splitlines():
        pid, ppid, group, stat = line.split()[:4]
        if not stat.startswith("Z"):
            parent[int(pid)] = int(ppid)
            if int(group) == pgid:
                mine.add(int(pid))
    grew = True
    while grew:
        grown = {pid for pid, ppid in parent.items() if ppid in mine} - mine
        mine |= grown
        grew = bool(grown)
    return sorted(mine)


def process_title(pid: int) -> str:
    """A process's command line as `ps` shows it (Ray workers set it to `ray::<actor or task>`), '' once gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class LocalHead:
    """`cluster/local_head.sh` on free ports with its own temp dir: `start`, the clients' environment, `stop`."""

    def __init__(self, cpus: int) -> None:
        self.dir = _temp_dir()
        self.port, self.dashboard_port, self.client_port = _free_ports(3)
        self.cpus = cpus
        self.client_env: dict[str, str] = {}  # what `local_head.sh start` prints to export

    @property
    def url(self) -> str:
        """The dashboard and job server (`RAY_ADDRESS` of `ray job submit`, `--address` of `serve deploy`)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _script(self, command: str, timeout_s: float) -> str:
        env = {**os.environ, "MAGICLENS_HEAD_PORT": str(self.port), "MAGICLENS_CLIENT_PORT": str(self.client_port),
               "MAGICLENS_DASHBOARD_PORT": str(self.dashboard_port), "MAGICLENS_HEAD_CPUS": str(self.cpus),
               "MAGICLENS_HEAD_DIR": str(self.dir), "MAGICLENS_START_TIMEOUT_S": str(START_TIMEOUT_S),
               "MAGICLENS_RAY": str(BIN / "ray")}
        done = subprocess.run([str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode:
            raise RuntimeError(f"local_head.sh {command} exited {done.returncode}:\n{done.stderr[-LOG_TAIL:]}")
        return done.stdout

    def start(self) -> None:
        """Start the head (the script waits for its job server) and read the environment lines it prints."""
        for line in self._script("start", timeout_s=3 * START_TIMEOUT_S).splitlines():
            words = shlex.split(line)
            if words[:1] == ["export"]:
                name, _, value = words[1].partition("=")
                self.client_env[name] = value
            elif words[:1] == ["unset"]:
                self.client_env.pop(words[1], None)

    def stop(self) -> None:
        """Stop this head's processes (and nothing else), then remove its temp dir."""
        try:
            self._script("stop", timeout_s=120)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def env(self) -> dict[str, str]:
        """The environment of a shell that ran `eval "$(cluster/local_head.sh env)"`, for the `ray` and `serve`
        programs (with the loopback setting that connecting to the GCS directly needs)."""
        base = {name: value for name, value in os.environ.items() if name not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        return {**base, **self.client_env, **LOOPBACK}

    def auth_headers(self) -> dict[str, str]:
        """The token header the job server wants when the head runs with token authentication. A process reads
        `RAY_AUTH_MODE` once (this one's own Ray may have read it already), so the SDK is given the header."""
        if self.client_env.get("RAY_AUTH_MODE") != "token":
            return {}
        token = os.environ.get("RAY_AUTH_TOKEN") or Path(
            os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token")).read_text().strip()
        return {"Authorization": f"Bearer {token}"}

    def jobs(self) -> JobSubmissionClient:
        return JobSubmissionClient(self.url, headers=self.auth_headers())

    def submit(self, *entrypoint: str, env_vars: dict[str, str] | None = None, **options) -> str:
        """Submit `entrypoint` (a command run in the uploaded repository) as `ray job submit --working-dir .`
        does, with `env_vars` in its environment and the SDK's `options` (`entrypoint_num_cpus=...`); returns
        the job's id."""
        runtime_env = {**WORKING_DIR, "env_vars": env_vars or {}}
        return self.jobs().submit_job(entrypoint=shlex.join(entrypoint), runtime_env=runtime_env, **options)

    def status(self, job_id: str) -> JobStatus:
        return self.jobs().get_job_status(job_id)

    def wait_job(self, job_id: str, timeout_s: float) -> None:
        """Wait for the job to end; an `AssertionError` with the end of its log unless it SUCCEEDED."""
        client = self.jobs()
        terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        if not wait_for(lambda: client.get_job_status(job_id) in terminal, timeout_s, every_s=1):
            client.stop_job(job_id)
            raise AssertionError(f"job {job_id} did not end within {timeout_s} s; its log ends:\n"
                                 f"{client.get_job_logs(job_id)[-LOG_TAIL:]}")
        info, logs = client.get_job_info(job_id), client.get_job_logs(job_id)
        assert info.status == JobStatus.SUCCEEDED, (
            f"job {job_id} ({info.entrypoint}) {info.status}: {info.message}; its log ends:\n{logs[-LOG_TAIL:]}")

    def node_state(self, node_id: str) -> str | None:
        """ALIVE or DEAD, as the head's state API lists the node; None while it does not list it."""
        answer = httpx.get(f"{self.url}/api/v0/nodes", params={"filter_keys": "node_id", "filter_predicates": "=",
                                                                "filter_values": node_id},
                           headers=self.auth_headers(), timeout=30)
        answer.raise_for_status()
        return next((node["state"] for node in answer.json()["data"]["result"]["result"]), None)

    def cli(self, *command: str, timeout_s: float = 300) -> str:
        """Run one of the project's Ray programs (`serve deploy ...`) against this head; its output."""
        done = subprocess.run([str(BIN / command[0]), *command[1:]], env=self.env(), cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout_s)
        assert done.returncode == 0, f"{shlex.join(command)} exited {done.returncode}:\n{done.stderr[-LOG_TAIL:]}"
        return done.stdout


def wait_healthy(url: str, timeout_s: float, why: Callable[[], str]) -> None:
    """Wait until `url`/healthz answers 200; else an `AssertionError` with `why()` (e.g. `serve status`)."""
    def healthy() -> bool:
        try:
            return httpx.get(url + "/healthz", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_for(healthy, timeout_s, every_s=1), f"{url}/healthz did not answer within {timeout_s} s:\n{why()}"


class WorkerNode:
    """A worker node joined to a head, in a process group of its own (see `start_worker_node`)."""

    def __init__(self, head: LocalHead, cpus: int) -> None:
        self.head = head
        self.dir = _temp_dir()
        self.log = self.dir / "start.log"
        command = [sys.executable, __file__, "--address", head.gcs_address, "--num-cpus", str(cpus),
                   "--temp-dir", str(self.dir)]
        with self.log.open("w") as log:
            # its own session: the processes the starter leaves share this process group
            self._starter = subprocess.Popen(command, env=head.env(), stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        self.pgid = self._starter.pid

    def wait_started(self, timeout_s: float) -> None:
        """Wait until the head lists the node alive; a failure stops the node. Ray's own wait for a raylet to
        register (30 s, fixed) can give up first on a loaded machine, so the starter's exit status is not it."""
        try:
            self._starter.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        if not wait_for(lambda: self.node_id() is not None and self.head.node_state(self.node_id()) == "ALIVE",
                        timeout_s, every_s=1):
            log = self.log.read_text()[-LOG_TAIL:]
            self.stop()
            raise RuntimeError(f"worker node not alive within {timeout_s} s (starter exit status "
                               f"{self._starter.returncode}):\n{log}")

    def pids(self) -> list[int]:
        """The node's processes: its process group and their descendants, while one of them names the node's
        temp dir (a group id is free for reuse once its processes are gone)."""
        pids = group_pids(self.pgid)
        return pids if any(str(self.dir) in process_title(pid) for pid in pids) else []

    def runs(self, title: str) -> bool:
        """Whether one of this node's processes has `title` in its command line (Ray names actor processes)."""
        return any(title in process_title(pid) for pid in self.pids())

    def node_id(self) -> str | None:
        """The node's id, from its raylet's command line; None when no raylet of the node runs."""
        for pid in self.pids():
            words = process_title(pid).split(" ")
            if words[0].endswith("/raylet"):
                return next(word.partition("=")[2] for word in words if word.startswith("--node_id="))
        return None

    def kill(self) -> None:
        """SIGKILL every process of the node at once, raylet and workers: the node fails as a machine does."""
        _signal(self.pids(), signal.SIGKILL)

    def stop(self, grace_s: float = 10) -> None:
        """SIGTERM the node's processes, SIGKILL what is left of its group after `grace_s` (while one of the
        processes seen at first still lives, so the group is still this node's), remove its temp dir."""
        known = set(self.pids())
        _signal(known, signal.SIGTERM)
        wait_for(lambda: not self._left(known), grace_s, every_s=0.2)
        _signal(self._left(known), signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _left(self, known: set[int]) -> set[int]:
        """The group's processes now, while one of the `known` ones is among them."""
        group = set(group_pids(self.pgid))
        return group if group & known else set()


def _signal(pids, signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def start_worker_node(address: str, num_cpus: int, temp_dir: str) -> None:
    """Start a worker node at 127.0.0.1 joined to the GCS at `address`, and return leaving its processes
    running: what `ray start --address` does, which refuses to add a node to a cluster whose nodes keep the
    loopback address (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, without which Ray gives a node the machine's
    outward address and its servers listen on every interface)."""
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(gcs_address=address, node_ip_address="127.0.0.1", num_cpus=num_cpus, temp_dir=temp_dir,
                       dashboard_agent_listen_port=free_port(), object_store_memory=WORKER_OBJECT_STORE,
                       min_worker_port=0, max_worker_port=0)
    Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=start_worker_node.__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="the head's GCS, host:port")
    parser.add_argument("--num-cpus", type=int, required=True)
    parser.add_argument("--temp-dir", required=True)
    options = parser.parse_args()
    start_worker_node(options.address, options.num_cpus, options.temp_dir)
