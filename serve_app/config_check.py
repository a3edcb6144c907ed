"""Check a Serve config file for this application strictly: Serve's own schema, no unknown key at any level
(Serve ignores those silently), the application's `args`, batching that can fill; and, unless `--schema-only`,
that the model and the table it names exist and that its replicas fit the cluster (`RAY_ADDRESS`'s, else
this machine's cores, which a local `serve run` gets).

    python -m serve_app.config_check serve_app/config.yaml [--schema-only]
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from ray.serve.schema import ServeDeploySchema

from serve_app.app import SearchServer
from serve_app.config import AppConfig

IMPORT_PATH = "serve_app.app:build_app"
DEPLOYMENTS = {deployment.name: deployment for deployment in (SearchServer,)}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic model classes an annotation names (inside Optional, Union, List, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) is not None or isinstance(annotation, types.UnionType):
        return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]
    return []


def strict_problems(model: type[BaseModel], data: Any, path: str = "") -> list[str]:
    """Keys in `data` (nested dicts and lists) that `model` and its sub-models do not declare, and values that
    a sub-model refuses where `model` would also take a plain dict (as Serve's `autoscaling_config` does)."""
    if not isinstance(data, dict):
        return []
    try:
        model.model_validate(data)
    except ValidationError as err:
        return _validation_problems(err, f"{path}." if path else "")
    fields = {}
    for name, field in model.model_fields.items():
        fields[name] = field
        if field.alias:
            fields[field.alias] = field
    found = []
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            found.append(f"{where}: unknown key")
            continue
        for sub in _models_in(fields[key].annotation)[:1]:
            items = enumerate(value) if isinstance(value, list) else [(None, value)]
            for index, item in items:
                found += strict_problems(sub, item, where if index is None else f"{where}[{index}]")
    return found


def _validation_problems(err: ValidationError, prefix: str) -> list[str]:
    return [f"{prefix}{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in err.errors()]


def _application_problems(index: int, application: dict[str, Any]) -> list[str]:
    where = f"applications[{index}]"
    if application.get("import_path") != IMPORT_PATH:
        return []
    problems = []
    try:
        config = AppConfig.model_validate(application.get("args") or {})
    except ValidationError as err:
        return _validation_problems(err, f"{where}.args.")
    for position, deployment in enumerate(application.get("deployments") or []):
        name = deployment.get("name")
        if name not in DEPLOYMENTS:
            problems.append(f"{where}.deployments[{position}].name: no deployment {name!r} in this application; "
                            f"expected one of {sorted(DEPLOYMENTS)}")
            continue
        if name == SearchServer.name:
            ongoing = deployment.get("max_ongoing_requests", SearchServer.max_ongoing_requests)
            if ongoing < config.max_batch_size:
                problems.append(f"{where}.deployments[{position}].max_ongoing_requests: {ongoing} is under "
                                f"args.max_batch_size ({config.max_batch_size}), so batches can never fill")
    return problems


def check_config(data: dict[str, Any]) -> list[str]:
    """Every problem found in a parsed Serve config (empty when it is sound)."""
    if not isinstance(data, dict):
        return ["the config must be a mapping"]
    problems = strict_problems(ServeDeploySchema, data)
    for index, application in enumerate(data.get("applications") or []):
        problems += _application_problems(index, application)
    return problems


def check_file(path: str | Path) -> list[str]:
    """`check_config` of a YAML file."""
    return check_config(yaml.safe_load(Path(path).read_text()))


def minimum_cpus(data: dict[str, Any]) -> float:
    """CPUs the config's replicas reserve at their fewest (`num_replicas`, else autoscaling's minimum)."""
    total = 0.0
    for application in data.get("applications") or []:
        for deployment in application.get("deployments") or []:
            scaling = deployment.get("autoscaling_config") or {}
            replicas = deployment.get("num_replicas", scaling.get("min_replicas", 1))
            cpus = (deployment.get("ray_actor_options") or {}).get("num_cpus", 1)
            total += (0 if replicas == "auto" else replicas) * cpus
    return total


def cluster_cpus() -> float:
    """The most CPUs the cluster at `RAY_ADDRESS` can have (its autoscaler's upper bound when it has one, so
    a cluster that scales from zero workers is not refused), else this machine's cores (what a local
    `serve run` starts with)."""
    if not os.environ.get("RAY_ADDRESS"):
        return float(os.cpu_count() or 1)
    import ray

    from jobs.common import cluster_capacity

    ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR")
    try:
        return cluster_capacity()["CPU"]
    finally:
        ray.shutdown()


def deployment_problems(data: dict[str, Any], cpus: float) -> list[str]:
    """What stops the config's applications from starting: a missing model or table, replicas over `cpus`."""
    problems = []
    for index, application in enumerate(data.get("applications") or []):
        if application.get("import_path") == IMPORT_PATH:
            config = AppConfig.model_validate(application.get("args") or {})
            problems += [f"applications[{index}].args.{problem}" for problem in config.missing_sources()]
    needed = minimum_cpus(data)
    if needed > cpus:
        problems.append(f"the replicas reserve {needed:g} CPUs at their fewest and the cluster can have at most "
                        f"{cpus:g}: lower ray_actor_options.num_cpus or the replica counts")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.config_check", description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", metavar="CONFIG.yaml")
    parser.add_argument("--schema-only", action="store_true",
                        help="check the file alone: not the model, the table or the cluster (for templates)")
    args = parser.parse_args(argv)
    cpus = None if args.schema_only else cluster_cpus()
    failed = False
    for path in args.configs:
        problems = check_file(path)
        if not problems and cpus is not None:
            problems = deployment_problems(yaml.safe_load(Path(path).read_text()), cpus)
        failed |= bool(problems)
        print(f"{path}: ok" if not problems else f"{path}:\n  " + "\n  ".join(problems))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
