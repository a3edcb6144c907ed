"""The project's model format: a folder with `model.safetensors` and `config.json`.

Jobs and the server load models through `magiclens_core.factory.load_model`, which reads these folders
(and official `.pkl` files).
"""

from __future__ import annotations

import json
import os
import tempfile
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from magiclens_core.errors import CheckpointError
from magiclens_core.model.config import MagicLensConfig
from magiclens_core.model.magiclens import MagicLens
from magiclens_core.weights.digest import file_sha256

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_NAME = "magiclens-torch"
FORMAT_VERSION = 1
MODEL_FILE_MODE = 0o644


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename over `path`, readable by all as files
    written plainly are (a temporary file is made owner-only; other nodes' users load these folders)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, MODEL_FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_model(model: MagicLens, directory: str | PathLike, metadata: dict[str, Any] | None = None,
               model_id: str | None = None) -> Path:
    """Write `model` as a model folder; returns the folder. `metadata` lands in config.json.

    The folder's `model_id` is derived from the weights' sha256 unless `model_id` is given (a conversion
    keeps the id of the weights it converts, so tables embedded with either are interchangeable).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    weights = directory / WEIGHTS_FILE
    _atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={"format": FORMAT_NAME}))
    digest = file_sha256(weights)
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_id": model_id or f"magiclens-{model.config.name}-{digest[:12]}",
        "weights_sha256": digest,
        "config": model.config.to_dict(),
        "metadata": metadata or {},
    }
    _atomic_write(directory / CONFIG_FILE,
                  lambda tmp: Path(tmp).write_text(json.dumps(document, indent=2) + "\n"))
    return directory


def read_config_json(directory: str | PathLike) -> dict[str, Any]:
    """The parsed config.json of a model folder (format, model_id, config, metadata)."""
    path = Path(directory) / CONFIG_FILE
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{directory} is not a model folder: no {CONFIG_FILE}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt: {err}") from err
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a {FORMAT_NAME} config")
    version = document.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version!r}; "
                              f"this library reads up to {FORMAT_VERSION}")
    if not isinstance(document.get("model_id"), str) or not document["model_id"]:
        raise CheckpointError(f"{path} has no model_id")
    return document


def folder_config(directory: str | PathLike, document: dict[str, Any]) -> MagicLensConfig:
    """The architecture a model folder's config.json (as `read_config_json` returns it) describes."""
    try:
        return MagicLensConfig.from_dict(document["config"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        raise CheckpointError(f"{Path(directory) / CONFIG_FILE}: invalid model config: {err}") from err


def load_folder(directory: str | PathLike) -> MagicLens:
    """A model folder as a `MagicLens` in eval mode, float32, its weights checked against their sha256."""
    directory = Path(directory)
    info = read_config_json(directory)
    model = MagicLens(folder_config(directory, info))
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}")
    if "weights_sha256" in info and file_sha256(weights) != info["weights_sha256"]:
        raise CheckpointError(f"{weights} is corrupt or truncated, or was replaced after saving: "
                              f"its sha256 differs from the one in {CONFIG_FILE}")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{directory / WEIGHTS_FILE} is corrupt or truncated: {err}") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{directory / WEIGHTS_FILE} does not match its config: {err}") from err
    model.model_id = info["model_id"]
    return model.eval()
