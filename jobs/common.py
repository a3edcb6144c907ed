"""What every job does: typed configuration from a file and flags, connecting to Ray, the JSON summary."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import glob
import json
import logging
import math
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")


def _field_type(field: dataclasses.Field, hints: dict[str, Any]) -> tuple[type, bool]:
    """The scalar type argparse should parse for a dataclass field, and whether it is a list."""
    hint = hints[field.name]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        origin = typing.get_origin(hint)
    if origin is list:
        return typing.get_args(hint)[0], True
    if origin is typing.Literal:
        return type(typing.get_args(hint)[0]), False
    return hint, False


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML or JSON mapping of option names (dashes or underscores) to values."""
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise SystemExit(f"error: config file {path} must hold a mapping of options")
    return {key.replace("-", "_"): value for key, value in data.items()}


def parse_config(config_type: type[ConfigT], argv: list[str] | None = None,
                 description: str | None = None, prog: str | None = None) -> ConfigT:
    """Build a job's dataclass config from `--config FILE` (YAML/JSON) overridden by flags.

    Every dataclass field becomes a `--field-name` flag; fields without a default are required
    (from the file or a flag). The field's `metadata["help"]` is its help text.
    """
    hints = typing.get_type_hints(config_type)
    fields = dataclasses.fields(config_type)
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML or JSON file of options; flags override it")
    for field in fields:
        scalar, is_list = _field_type(field, hints)
        kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS,
                                  "help": field.metadata.get("help", "")}
        if scalar is bool:
            kwargs.update(type=_parse_bool, metavar="BOOL")
        else:
            kwargs["type"] = scalar
        if is_list:
            kwargs["nargs"] = "+"
        choices = typing.get_args(hints[field.name]) if typing.get_origin(hints[field.name]) is typing.Literal else None
        if isinstance(scalar, type) and issubclass(scalar, enum.Enum):
            choices = list(scalar)
        if choices:
            kwargs["choices"] = choices
        if field.default is not dataclasses.MISSING:
            kwargs["help"] += f" (default: {field.default})"
        parser.add_argument(f"--{field.name.replace('_', '-')}", **kwargs)
    args = vars(parser.parse_args(argv))
    values = read_config_file(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    known = {field.name for field in fields}
    unknown = set(values) - known
    if unknown:
        parser.error(f"unknown options in config file: {sorted(unknown)}")
    values.update(args)
    missing = [f"--{f.name.replace('_', '-')}" for f in fields
               if f.name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        parser.error(f"missing required options: {' '.join(missing)}")
    try:
        return config_type(**values)
    except (TypeError, ValueError) as err:
        parser.error(str(err))


@dataclasses.dataclass(frozen=True)
class Demand:
    """What a job reserves at once (its actors, plus the CPU its reading tasks need), and the flags that set it."""

    cpus: float
    gpus: float = 0.0
    flags: str = "--workers/--cpus-per-worker"


class InputError(Exception):
    """A bad input (a missing file, model or table), told as one line on stderr before Ray starts."""


class JobExit(SystemExit):
    """Exit status 2 after a bad input, its one-line message already printed (and kept as the exception's text)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def require_paths(config: Any, *names: str) -> None:
    """`InputError` naming the flag when a local path (or glob) in one of the config fields `names` does not
    exist; URIs (`s3://...`) are left to the job, which opens them with the filesystem they name."""
    for name in names:
        value = getattr(config, name)
        for item in value if isinstance(value, list | tuple) else [value]:
            if item is None or "://" in str(item):
                continue
            flag = f"--{name.replace('_', '-')}"
            if glob.has_magic(str(item)):
                if not glob.glob(str(item), recursive=True):
                    raise InputError(f"{flag} {item}: matches no file")
            elif not os.path.exists(item):
                raise InputError(f"{flag} {item}: no such file or folder")


def require_model(path: str, flag: str = "--model") -> None:
    """`InputError` when `path` is not a model `describe_model` can read (a model folder or official .pkl)."""
    from magiclens_core.factory import describe_model

    if "://" not in path and not os.path.exists(path):
        raise InputError(f"{flag} {path}: no such model folder or .pkl")
    try:
        describe_model(path)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"{flag} {path}: not a MagicLens model ({err})") from None


def require_table(db: str, table: str) -> None:
    """`InputError` when the database `db` holds no table `table`; nothing is created on the way."""
    from magiclens_core.search.store import table_exists

    if not table_exists(db, table):
        raise InputError(f"--table {table}: no such table in --db {db}")


def _wants_local_ray() -> bool:
    return os.environ.get("RAY_ADDRESS", "") in ("", "local")


def init_ray(demand: Demand | None = None) -> None:
    """Connect to the running cluster (`RAY_ADDRESS`, or inside `ray job submit`), else start a local one
    (also for `RAY_ADDRESS=local`) with enough logical CPUs for `demand`; then check that the cluster can
    ever hold `demand` (`check_demand`)."""
    import ray

    from magiclens_core.search.store import silence_fork_warnings

    if not ray.is_initialized():
        silence_fork_warnings()
        # Ray warns on every start that it turned token authentication on (for a new local Ray, or with a
        # token file there): that is its default, nothing to act on; its other warnings stay
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        if _wants_local_ray():
            cpus = max(os.cpu_count() or 1, math.ceil(demand.cpus)) if demand else None
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING,
                     runtime_env={"worker_process_setup_hook": "jobs.common.quiet_dashboardless_workers"})
        else:
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, logging_level=logging.WARNING)
    if demand is not None:
        check_demand(demand)


def quiet_dashboardless_workers() -> None:
    """Worker setup of a local Ray, which runs without the dashboard: Ray Train's placement-group cleaner asks
    the dashboard's state API every second whether the run's controller lives, and warns each time it cannot
    (hundreds of lines a run). Its cleanup does not depend on it; every other logger is left as it is."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def cluster_capacity() -> dict[str, float]:
    """The most CPUs and GPUs the connected cluster can have: its autoscaler's upper bounds when it has one,
    else what its nodes have now."""
    import ray

    capacity = {key: ray.cluster_resources().get(key, 0.0) for key in ("CPU", "GPU")}
    try:
        from ray._private.state import state

        bounds = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - an older or newer Ray without the autoscaler's config: use what is there
        bounds = {}
    return {key: max(value, float(bounds.get(key, 0))) for key, value in capacity.items()}


def check_demand(demand: Demand) -> None:
    """`InputError` naming the flags to change when the cluster can never hold `demand` at once (so a job
    fails in seconds instead of waiting forever for CPUs or GPUs that will not come)."""
    import ray

    capacity = cluster_capacity()
    for key, wanted in (("CPU", demand.cpus), ("GPU", demand.gpus)):
        if wanted > capacity[key] + 1e-9:
            raise InputError(f"this run needs {wanted:g} {key}s at once and the cluster can have at most "
                             f"{capacity[key]:g}; lower {demand.flags}")
        if wanted > ray.cluster_resources().get(key, 0.0) + 1e-9:
            print(f"this run needs {wanted:g} {key}s at once: it waits for the cluster's autoscaler to add "
                  "nodes", file=sys.stderr, flush=True)


def print_summary(summary: dict[str, Any]) -> None:
    """Print the job's result as one JSON line, always the last line of its output."""
    sys.stdout.flush()
    print(json.dumps(summary, default=str), flush=True)


def run_job(config_type: type[ConfigT], run: Callable[[ConfigT], dict[str, Any]], argv: list[str] | None,
            description: str | None, prog: str,
            demand: Callable[[ConfigT], Demand] | None = None,
            needs_ray: Callable[[ConfigT], bool] | None = None,
            check_inputs: Callable[[ConfigT], None] | None = None) -> dict[str, Any]:
    """A job's `main`: its config from `argv` (see `parse_config`), its inputs checked (`check_inputs`), Ray
    connected and checked to fit `demand(config)` (a local Ray gets enough logical CPUs for it), `run(config)`,
    the summary printed as the last line and returned. `needs_ray(config)` false leaves Ray alone for that run
    (default: always connect). An `InputError` from any step ends the job with one line on stderr, exit 2."""
    config = parse_config(config_type, argv, description=description, prog=prog)
    try:
        if check_inputs is not None:
            check_inputs(config)
        if needs_ray is None or needs_ray(config):
            init_ray(demand(config) if demand else None)
        summary = run(config)
    except InputError as err:
        message = f"{prog.split()[-1]}: error: {err}"
        print(message, file=sys.stderr, flush=True)
        raise JobExit(message) from None
    print_summary(summary)
    return summary
