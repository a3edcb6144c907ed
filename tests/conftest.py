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
def official_reference_embed(official_inputs, tiny_model) -> torch.Tensor:
    """Embeddings of the fixture inputs by the official tiny checkpoint loaded in this library."""
    with torch.no_grad():
        return tiny_model.embed(*official_inputs)


@pytest.fixture(scope="session")
def tiny_model(official_tiny):
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
