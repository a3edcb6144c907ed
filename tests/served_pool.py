"""Helpers for the tests that serve the search application: a generated image pool indexed with the official
tiny checkpoint, and ONE Serve instance per test session (on the session's Ray, a free local port, the proxy
middleware of the shipped config) on which each application config is deployed under its own name and route
prefix. The session fixtures in conftest.py deploy the shared applications; `start_app` deploys another."""

from __future__ import annotations

import itertools
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from magiclens_core.synthetic import SyntheticWorld, all_scenes

TINY_MODEL = Path(__file__).parent / "fixtures" / "official_tiny" / "params_tiny.pkl"
APP_NAME = "magiclens"
KEYED_APP = "magiclens-keyed"
API_KEY = "test-key-123"
MIN_REPLICAS, MAX_REPLICAS = 2, 3  # of the search application's deployment
SEARCH_ARGS = {"max_batch_size": 8, "batch_wait_timeout_s": 0.05, "refresh_interval_s": 0.5, "max_k": 50,
               "max_image_bytes": 300_000, "max_pixels": 2_000_000}
SEARCH_DEPLOYMENT = {"max_ongoing_requests": 16, "health_check_period_s": 1, "health_check_timeout_s": 5,
                  "autoscaling_config": {"min_replicas": MIN_REPLICAS, "max_replicas": MAX_REPLICAS,
                                         "target_ongoing_requests": 2, "upscale_delay_s": 1,
                                         "downscale_delay_s": 4, "look_back_period_s": 2}}
# the session proxy's `request_timeout_s`: below the 10 s the hardening tests allow any request, so a request
# Serve's router leaves waiting (after the replica it first chose died) ends as the JSON 503 within it
PROXY_TIMEOUT_S = 8.0
KEYED_ARGS = {"api_key": API_KEY, "max_k": 30, "memory_index": "faiss"}  # its searches go through the in-memory graph
ONE_REPLICA = {"num_replicas": 1, "autoscaling_config": None}


@dataclass
class Pool:
    """An indexed pool: the image files by id, and where the table is."""

    db: str
    table: str
    files: dict[str, Path]  # id → image file
    model: str = str(TINY_MODEL)


def write_images(folder: Path, count: int, start: int = 0) -> list[Path]:
    """`count` distinct synthetic scenes as PNG files (scenes `start` .. `start + count - 1`, spread over the
    world so neighbours differ in several attributes)."""
    world = SyntheticWorld(seed=0, image_size=64)
    scenes = all_scenes()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(start, start + count):
        scene = scenes[(index * 97) % len(scenes)]
        path = folder / f"{scene.key}.png"
        path.write_bytes(world.image_bytes(scene, np.random.default_rng(index)))
        paths.append(path)
    return paths


def index_folder(folder: Path, db: str, table: str) -> dict:
    """Run the real indexing job (in-process, on the session's Ray) over a folder of images."""
    from jobs import index

    return index.main(["--images", str(folder), "--model", str(TINY_MODEL), "--db", db, "--table", table,
                       "--batch-size", "16"])


def file_ids(paths: list[Path]) -> dict[str, Path]:
    """The ids the indexing job gives these files (content hashes)."""
    from magiclens_core.images.identity import content_id

    return {content_id(path.read_bytes()): path for path in paths}


_shared: dict[str, Pool] = {}


def shared_pool(tmp_path_factory, count: int = 24) -> Pool:
    """One generated pool indexed by the real job, built once per test session and shared by the modules that
    serve it. Tests may append rows to its table (it only grows); the original files keep their ids."""
    if "pool" not in _shared:
        root = tmp_path_factory.mktemp("served_pool")
        paths = write_images(root / "images", count)
        db, table = str(root / "db"), "pool"
        summary = index_folder(root / "images", db, table)
        assert summary["rows_added"] == count, summary
        _shared["pool"] = Pool(db=db, table=table, files=file_ids(paths))
    return _shared["pool"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


_serve: dict[str, str] = {}  # "url": the running Serve instance's address
_started: list[str] = []  # applications deployed by start_app, deleted by stop_app
_names = itertools.count(1)


def serve_url() -> str:
    """The session's Serve instance (started on first use), as its base URL."""
    from ray import serve

    from serve_app.proxy_errors import PROXY_CALLBACK

    if "url" not in _serve:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": PROXY_TIMEOUT_S},
                    controller_options={"runtime_env": {"env_vars": PROXY_CALLBACK}})
        _serve["url"] = f"http://127.0.0.1:{port}"
    return _serve["url"]


def stop_serve() -> None:
    """Shut the session's Serve instance down (every application on it)."""
    from ray import serve

    if _serve.pop("url", None) is not None:
        serve.shutdown()
    _started.clear()


def deploy(pool: Pool, name: str, route_prefix: str, args: dict[str, Any] | None = None,
           options: dict[str, Any] | None = None, timeout_s: float = 300) -> str:
    """Deploy the search application over `pool` as `name` at `route_prefix` on the session's Serve (its
    stored images readable); returns the application's URL once `/healthz` answers."""
    from ray import serve

    from serve_app.app import application
    from serve_app.config import AppConfig

    base = serve_url()
    folders = sorted({str(path.parent) for path in pool.files.values()})  # the stored images may be read
    config = AppConfig(model=pool.model, db=pool.db, table=pool.table,
                       **{"allowed_uri_prefixes": folders, **(args or {})})
    small = {"ray_actor_options": {"num_cpus": 0.25}}
    serve.run(application(config, {**small, **(options or {})}), name=name, route_prefix=route_prefix)
    url = base + route_prefix.rstrip("/")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=10).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"application {name!r} did not answer on {url} within {timeout_s} s")


def start_app(pool: Pool, args: dict[str, Any] | None = None, options: dict[str, Any] | None = None,
              timeout_s: float = 300) -> str:
    """Deploy one more application (its own name and route prefix) on the session's Serve; returns its URL."""
    name = f"{APP_NAME}-{next(_names)}"
    url = deploy(pool, name, f"/{name}", args, options, timeout_s=timeout_s)
    _started.append(name)
    return url


def stop_app() -> None:
    """Delete the applications `start_app` deployed; Serve itself stops too when no other application is on it."""
    from ray import serve

    for name in _started:
        serve.delete(name)
    _started.clear()
    if "url" in _serve and not serve.status().applications:
        stop_serve()


def replica_actor_names(app: str, deployment: str) -> list[str]:
    """The named Ray actors of a deployment's replicas (namespace `serve`), sorted."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                  if actor["name"].startswith(prefix))


def wait_for(condition, timeout_s: float, every_s: float = 0.5) -> bool:
    """Whether `condition()` became true within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every_s)
    return False
