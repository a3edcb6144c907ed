"""serve_app/config.yaml against Serve's own schema, strictly: a typo anywhere fails, as Serve would not."""

from __future__ import annotations

import copy
import importlib
import os
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema
from starlette.middleware import Middleware

from serve_app.config import AppConfig
from serve_app.config_check import check_config, check_file, deployment_problems, main, minimum_cpus
from serve_app.proxy_errors import PROXY_CALLBACK

CONFIG = Path(__file__).resolve().parents[1] / "serve_app" / "config.yaml"


@pytest.fixture()
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_the_shipped_config_is_sound(config):
    assert check_file(CONFIG) == []
    assert main([str(CONFIG), "--schema-only"]) == 0
    ServeDeploySchema.model_validate(config)
    app = config["applications"][0]
    assert app["import_path"] == "serve_app.app:build_app"
    AppConfig.model_validate(app["args"])
    server = next(d for d in app["deployments"] if d["name"] == "SearchServer")
    scaling = server["autoscaling_config"]
    assert scaling["min_replicas"] <= scaling["max_replicas"]
    assert {"target_ongoing_requests", "upscale_delay_s", "downscale_delay_s"} <= set(scaling)
    assert server["max_ongoing_requests"] >= app["args"]["max_batch_size"]
    assert "num_gpus" in server["ray_actor_options"]


def _edit(config: dict, path: list, value=None, rename: str | None = None) -> dict:
    edited = copy.deepcopy(config)
    node = edited
    for key in path[:-1]:
        node = node[key]
    if rename is not None:
        node[rename] = node.pop(path[-1])
    else:
        node[path[-1]] = value
    return edited


DEPLOYMENT = ["applications", 0, "deployments", 0]
TYPOS = [
    (["proxy_location"], "proxy_locaton"),
    (["http_options", "port"], "prot"),
    (["applications", 0, "route_prefix"], "route_prefx"),
    ([*DEPLOYMENT, "max_ongoing_requests"], "max_ongoing_request"),
    ([*DEPLOYMENT, "autoscaling_config", "target_ongoing_requests"], "target_ongoing_request"),
    ([*DEPLOYMENT, "autoscaling_config", "downscale_delay_s"], "downscale_delay"),
    ([*DEPLOYMENT, "ray_actor_options", "num_gpus"], "num_gpu"),
    (["applications", 0, "args", "refresh_interval_s"], "refresh_interval"),
]


@pytest.mark.parametrize("path,typo", TYPOS, ids=[typo for _, typo in TYPOS])
def test_a_misspelt_key_anywhere_is_caught(config, path, typo):
    edited = _edit(config, path, rename=typo)
    problems = check_config(edited)
    assert problems and any(typo in problem for problem in problems), problems


def test_serve_alone_lets_a_misspelt_key_through(config):
    """Why the strict check exists: Serve's own schema accepts these typos silently."""
    ServeDeploySchema.model_validate(_edit(config, [*DEPLOYMENT, "autoscaling_config", "target_ongoing_requests"],
                                           rename="target_ongoing_request"))
    ServeDeploySchema.model_validate(_edit(config, ["http_options", "port"], rename="prot"))


def test_wrong_values_and_unfillable_batches_are_caught(config, tmp_path):
    assert check_config(_edit(config, [*DEPLOYMENT, "max_ongoing_requests"], 4))[0].endswith(
        "batches can never fill")
    assert check_config(_edit(config, [*DEPLOYMENT, "autoscaling_config", "min_replicas"], "many"))
    assert check_config(_edit(config, [*DEPLOYMENT, "name"], "Encoder"))
    assert check_config(_edit(config, ["applications", 0, "args", "device"], "tpu"))
    assert check_config(_edit(config, ["applications", 0, "args", "model"], None))
    with pytest.raises(ValidationError, match="default_k"):
        AppConfig(model="m", db="d", table="t", default_k=20, max_k=10)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_edit(config, ["http_options", "port"], rename="prot")))
    assert main([str(bad)]) == 1


def test_the_shipped_config_survives_losing_any_one_replica_on_two_cpus(config):
    app = config["applications"][0]
    deployments = {d["name"]: d for d in app["deployments"]}
    server = deployments["SearchServer"]
    assert server["autoscaling_config"]["min_replicas"] >= 2
    assert server["autoscaling_config"]["max_replicas"] * server["ray_actor_options"]["num_cpus"] <= 2
    assert all(d["health_check_period_s"] <= 5 for d in deployments.values())
    env = config["controller_options"]["runtime_env"]["env_vars"]
    assert env == PROXY_CALLBACK  # the proxy answers a request a lost replica held with a JSON 503
    module, _, name = env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"].partition(":")
    assert all(isinstance(entry, Middleware) for entry in getattr(importlib.import_module(module), name)())


def test_a_config_naming_a_missing_model_or_table_or_too_many_cpus_is_refused(config, tmp_path):
    import lancedb
    import pyarrow as pa

    args = config["applications"][0]["args"]
    args.update(model=str(tmp_path / "no-model"), db=str(tmp_path / "db"), table="images")
    problems = deployment_problems(config, cpus=64)
    assert any("no model folder" in problem for problem in problems)
    assert any("no table 'images'" in problem for problem in problems)
    assert not (tmp_path / "db").exists()  # checking created nothing
    lancedb.connect(tmp_path / "db").create_table("images", pa.table({"id": ["a"]}))
    args["model"] = str(Path(__file__).parent / "fixtures" / "official_tiny" / "params_tiny.pkl")
    assert deployment_problems(config, cpus=64) == []
    needed = minimum_cpus(config)
    assert needed > 0
    assert any(f"reserve {needed:g} CPUs" in problem for problem in deployment_problems(config, cpus=needed / 2))


def test_serving_a_config_with_a_missing_table_exits_at_once_with_one_message(config, tmp_path):
    import subprocess
    import sys

    config["applications"][0]["args"].update(db=str(tmp_path / "db"), table="images")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    finished = subprocess.run([sys.executable, "-m", "serve_app.run", str(path)], capture_output=True, text=True,
                              timeout=300, cwd=CONFIG.parents[1], env={**os.environ, "RAY_TMPDIR": str(tmp_path)})
    assert finished.returncode == 1
    assert "cannot serve" in finished.stderr and "no table 'images'" in finished.stderr, finished.stderr
    assert not (tmp_path / "db").exists() and not (tmp_path / "session_latest").exists()  # no Ray was started
