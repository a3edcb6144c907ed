"""What every job does: typed configuration from a file and flags, connecting to Ray, the JSON summary."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import fcntl
import json
import os
import socket
import sys
import time
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


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the running cluster (`RAY_ADDRESS`, or inside `ray job submit`), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False)


def print_summary(summary: dict[str, Any]) -> None:
    """Print the job's result as one JSON line, always the last line of its output."""
    sys.stdout.flush()
    print(json.dumps(summary, default=str), flush=True)


def hold_writer_lock(path: str, job: str) -> int:
    """An open descriptor holding an exclusive `flock` on the file at `path` (created if need be), which then
    names this run of `job`; exits with an error naming the lock and its holder when another run holds it.
    The kernel releases the lock when the descriptor is closed or the process dies: no stale lock survives."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(descriptor, 512).decode(errors="replace").strip() or "another run"
        os.close(descriptor)
        raise SystemExit(f"error: {os.path.dirname(path)} is being written by {holder}, which holds the lock "
                         f"{path}; wait for that run to end or write elsewhere") from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{job} pid {os.getpid()} on {socket.gethostname()} since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    return descriptor


def run_job(config_type: type[ConfigT], run: Callable[[ConfigT], dict[str, Any]], argv: list[str] | None,
            description: str | None, prog: str,
            num_cpus: Callable[[ConfigT], int] | None = None,
            needs_ray: Callable[[ConfigT], bool] | None = None) -> dict[str, Any]:
    """A job's `main`: its config from `argv` (see `parse_config`), Ray connected, `run(config)`, the summary
    printed as the last line and returned. `num_cpus(config)` sizes a local Ray when one is started (default:
    the machine's cores); `needs_ray(config)` false leaves Ray alone for that run (default: always connect)."""
    config = parse_config(config_type, argv, description=description, prog=prog)
    if needs_ray is None or needs_ray(config):
        init_ray(num_cpus=num_cpus(config) if num_cpus else None)
    summary = run(config)
    print_summary(summary)
    return summary
