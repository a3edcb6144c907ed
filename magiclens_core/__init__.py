"""MagicLens core library: model, official-weight loading, preprocessing and the one embedding path.

Ray-free: jobs and the server build on it. Models are built, loaded and described by `magiclens_core.factory`.
The names below are imported on first use, so that `from magiclens_core import load_image, ImageDecodeError`
does not import torch or open_clip.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "NAMED_CONFIGS": "magiclens_core.model.config",
    "ClipConfig": "magiclens_core.model.config",
    "HeadConfig": "magiclens_core.model.config",
    "MagicLensConfig": "magiclens_core.model.config",
    "BackboneWeightsUnavailable": "magiclens_core.errors",
    "CheckpointError": "magiclens_core.errors",
    "ImageDecodeError": "magiclens_core.images.decode",
    "load_image": "magiclens_core.images.decode",
    "MagicLens": "magiclens_core.model.magiclens",
    "Embedder": "magiclens_core.embedder",
    "ModelInfo": "magiclens_core.factory",
    "create_model": "magiclens_core.factory",
    "describe_model": "magiclens_core.factory",
    "load_model": "magiclens_core.factory",
    "save_model": "magiclens_core.weights.folder",
    "load_official_checkpoint": "magiclens_core.weights.official",
}

__all__ = [
    "BackboneWeightsUnavailable",
    "CheckpointError",
    "ClipConfig",
    "Embedder",
    "HeadConfig",
    "ImageDecodeError",
    "MagicLens",
    "MagicLensConfig",
    "ModelInfo",
    "NAMED_CONFIGS",
    "create_model",
    "describe_model",
    "load_image",
    "load_model",
    "load_official_checkpoint",
    "save_model",
]

if TYPE_CHECKING:
    from magiclens_core.embedder import Embedder
    from magiclens_core.errors import BackboneWeightsUnavailable, CheckpointError
    from magiclens_core.factory import ModelInfo, create_model, describe_model, load_model
    from magiclens_core.images.decode import ImageDecodeError, load_image
    from magiclens_core.model.config import NAMED_CONFIGS, ClipConfig, HeadConfig, MagicLensConfig
    from magiclens_core.model.magiclens import MagicLens
    from magiclens_core.weights.folder import save_model
    from magiclens_core.weights.official import load_official_checkpoint


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'magiclens_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
