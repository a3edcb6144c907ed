"""Shared test fixtures; under CI (CI=true) a skipped test counts as a failure."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL_TINY = FIXTURES / "official_tiny"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where every test must run: {report.longrepr}"


def pytest_collection_modifyitems(config, items):
    """Mark every test that uses the shared Ray instance, so `-m "not ray"` runs the quick part alone; run the
    tests that use the shared Serve instance last (in their order), so Serve runs once, beside no other job."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
    items.sort(key=lambda item: "serve_instance" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def official_tiny() -> dict:
    """The official tiny checkpoint's path, inputs (NCHW pixels, ids, texts) and reference outputs."""
    return {
        "pkl": OFFICIAL_TINY / "params_tiny.pkl",
        "pixels": torch.from_numpy(np.load(OFFICIAL_TINY / "image.npy")).permute(0, 3, 1, 2).contiguous(),
        "ids": torch.from_numpy(np.load(OFFICIAL_TINY / "ids.npy")).long(),
        "texts": json.loads((OFFICIAL_TINY / "texts.json").read_text()),
        "manifest": json.loads((OFFICIAL_TINY / "manifest.json").read_text()),
        **{name: np.load(OFFICIAL_TINY / f"{name}.npy") for name in (
            "multimodal_embed", "multimodal_embed_norm", "clip_image_embed", "clip_text_embed")},
    }


@pytest.fixture(scope="session")
def official_inputs(official_tiny) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixture's pixels [B,3,H,W] in [0,1) and token ids [B,77]."""
    return official_tiny["pixels"], official_tiny["ids"]


@pytest.fixture(scope="session")
def official_reference_embed(official_inputs, official_model) -> torch.Tensor:
    """Embeddings of the fixture inputs by the official tiny checkpoint loaded in this library."""
    with torch.no_grad():
        return official_model.embed(*official_inputs)


@pytest.fixture(scope="session")
def official_model(official_tiny):
    """The official tiny checkpoint loaded once per session (do not mutate)."""
    from magiclens_core import load_official_checkpoint

    return load_official_checkpoint(official_tiny["pkl"])


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray instance for the whole session (more logical CPUs than this machine's 2 cores,
    so actor pools cannot starve the read stage). Jobs run in-process reuse it via `jobs.common.init_ray`."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def indexed_pool(ray_cluster, tmp_path_factory):
    """The generated image pool indexed by the real job, shared by every module that serves it (it only grows)."""
    from served_pool import shared_pool

    return shared_pool(tmp_path_factory)


@pytest.fixture(scope="session")
def serve_instance(ray_cluster) -> str:
    """The session's one Serve instance (base URL); every served application is deployed on it."""
    from served_pool import serve_url, stop_serve

    yield serve_url()
    stop_serve()


@pytest.fixture(scope="session")
def search_app(serve_instance, indexed_pool):
    """(pool, URL) of the open application at `/`: `served_pool.SEARCH_ARGS`, an autoscaling encoder and two
    ingress replicas, as the shipped config."""
    from served_pool import APP_NAME, SEARCH_ARGS, SEARCH_DEPLOYMENT, deploy

    return indexed_pool, deploy(indexed_pool, APP_NAME, "/", SEARCH_ARGS, SEARCH_DEPLOYMENT)


@pytest.fixture(scope="session")
def keyed_app(serve_instance, indexed_pool):
    """(pool, URL) of the application that needs `served_pool.API_KEY`, at `/keyed`, one replica each."""
    from served_pool import KEYED_APP, KEYED_ARGS, ONE_REPLICA, deploy

    return indexed_pool, deploy(indexed_pool, KEYED_APP, "/keyed", KEYED_ARGS, ONE_REPLICA)
