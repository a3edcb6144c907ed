"""Helpers for the tests that start the search application: a generated image pool indexed with the official
tiny checkpoint, and the application started on the session's Ray with `serve.run` on a free local port."""

from __future__ import annotations

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


def start_app(pool: Pool, args: dict[str, Any] | None = None, encoder_options: dict[str, Any] | None = None,
              timeout_s: float = 300) -> str:
    """Start Serve on a free port with the search application over `pool`; returns the base URL."""
    from ray import serve

    from serve_app.app import application
    from serve_app.config import AppConfig

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = AppConfig(model=pool.model, db=pool.db, table=pool.table, **(args or {}))
    options = {"ray_actor_options": {"num_cpus": 0.25}, **(encoder_options or {})}
    serve.run(application(config, options, {"ray_actor_options": {"num_cpus": 0.25}}), name=APP_NAME,
              route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=10).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the application did not answer on {url} within {timeout_s} s")


def stop_app() -> None:
    from ray import serve

    serve.shutdown()
