"""The one front door to models: build a new one (`create_model`), load a saved one (`load_model`), the
model a training run starts from (`initial_model`), and what a saved model is without loading it
(`describe_model`).

A saved model is a model folder of this project (`model.safetensors` + `config.json`) or an official
`.pkl`; both carry a `model_id` that tables embedded with the model record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import torch

from magiclens_core.errors import CheckpointError
from magiclens_core.model.config import NAMED_CONFIGS, MagicLensConfig, resolve_config
from magiclens_core.model.magiclens import MagicLens
from magiclens_core.weights.backbone import backbone_file, load_backbone
from magiclens_core.weights.folder import CONFIG_FILE, folder_config, load_folder, read_config_json
from magiclens_core.weights.official import load_official_checkpoint, official_model_id, read_official_config

ModelFormat = Literal["folder", "official"]


@dataclass(frozen=True)
class ModelInfo:
    """What a saved model is: its id, architecture and file format (read without building the network)."""

    model_id: str
    config: MagicLensConfig
    format: ModelFormat

    @property
    def dim(self) -> int:
        """Size of the MagicLens embeddings."""
        return self.config.head.embed_dim

    @property
    def clip_dim(self) -> int:
        """Size of the CLIP backbone's own embeddings."""
        return self.config.clip.embed_dim

    @property
    def image_size(self) -> int:
        """Side of the square pixels the image tower takes."""
        return self.config.clip.image_size


def create_model(config: MagicLensConfig | str | dict[str, Any] = "base",
                 backbone: str | PathLike | None = None) -> MagicLens:
    """A new MagicLens of a named size (`base`, `large`, `tiny`), a config or its dict: fusion head random,
    CLIP towers random or from `backbone` (an open_clip pretrained tag such as `openai`, or a local
    open_clip checkpoint file). The backbone is found before the network is built."""
    config = resolve_config(config)
    path = None if backbone is None else backbone_file(config, backbone)
    model = MagicLens(config)
    return model if path is None else load_backbone(model, path)


def _format_of(path: Path) -> ModelFormat:
    if path.is_dir():
        return "folder"
    if path.suffix == ".pkl":
        return "official"
    if not path.exists():
        raise CheckpointError(f"model not found: {path}")
    raise CheckpointError(f"{path}: expected a model folder (with {CONFIG_FILE}) or an official .pkl")


def load_model(path: str | PathLike) -> MagicLens:
    """A `MagicLens` in eval mode, float32, from a model folder or an official `.pkl` file; a missing,
    corrupt or mismatched file is a `CheckpointError`."""
    path = Path(path)
    if _format_of(path) == "folder":
        return load_folder(path)
    return load_official_checkpoint(path)


def describe_model(path: str | PathLike) -> ModelInfo:
    """The id, architecture and format of a model folder or an official `.pkl`, without building the network:
    from `config.json`, or from the `.pkl`'s array shapes (checked as `load_model` checks them) and its sha256.
    Raises `CheckpointError` as `load_model` does for what it reads."""
    path = Path(path)
    if _format_of(path) == "folder":
        document = read_config_json(path)
        return ModelInfo(document["model_id"], folder_config(path, document), "folder")
    config = read_official_config(path)
    return ModelInfo(official_model_id(path), config, "official")


def initial_model(init: str, backbone: str | PathLike | None = None, seed: int = 0) -> MagicLens:
    """The model a training run starts from, its random weights drawn from `seed`.

    `init` is a named size (`base`, `large`, `tiny`: towers random, or from `backbone` as in
    `create_model`), a JSON file of a `MagicLensConfig` or a model folder's `config.json` (random weights),
    an official `.pkl`, or a model folder (to fine-tune).
    """
    torch.manual_seed(seed)
    if init in NAMED_CONFIGS:
        return create_model(init, backbone)
    if backbone is not None:
        raise ValueError(f"a backbone only applies to a named size ({', '.join(NAMED_CONFIGS)}), not to {init!r}")
    path = Path(init)
    if path.suffix == ".json" and path.is_file():
        document = json.loads(path.read_text())
        return MagicLens(MagicLensConfig.from_dict(document.get("config", document)))
    if not path.exists():
        raise ValueError(f"init {init!r} is neither a named size ({', '.join(NAMED_CONFIGS)}), "
                         "a config .json, an official .pkl nor a model folder")
    return load_model(path)
