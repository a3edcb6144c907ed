"""MagicLens core library: model, official-weight loading, preprocessing and the one embedding path.

Ray-free: jobs and the server build on it.
"""

from magiclens_core.backbone import create_model
from magiclens_core.checkpoint import load_model, save_model
from magiclens_core.config import NAMED_CONFIGS, ClipConfig, HeadConfig, MagicLensConfig
from magiclens_core.embedder import Embedder
from magiclens_core.errors import BackboneWeightsUnavailable, CheckpointError
from magiclens_core.images import ImageDecodeError, load_image
from magiclens_core.model import MagicLens
from magiclens_core.official import load_official_checkpoint

__all__ = [
    "NAMED_CONFIGS",
    "BackboneWeightsUnavailable",
    "CheckpointError",
    "ClipConfig",
    "Embedder",
    "HeadConfig",
    "ImageDecodeError",
    "MagicLens",
    "MagicLensConfig",
    "create_model",
    "load_image",
    "load_model",
    "load_official_checkpoint",
    "save_model",
]
