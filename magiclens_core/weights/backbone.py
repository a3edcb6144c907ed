"""open_clip weights for the CLIP towers of a MagicLens: a pretrained tag (downloaded) or a local file."""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import open_clip

from magiclens_core.errors import BackboneWeightsUnavailable
from magiclens_core.model.config import MagicLensConfig
from magiclens_core.model.magiclens import MagicLens

_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _pretrained_source(config: MagicLensConfig, tag: str) -> tuple[str, dict]:
    name = config.clip.open_clip_name
    if name is None:
        raise ValueError("an open_clip pretrained tag needs a released backbone size (base or large); "
                         "give a local checkpoint file for a custom size")
    for candidate in (name, name.removesuffix("-quickgelu")):
        pretrained = open_clip.get_pretrained_cfg(candidate, tag)
        if pretrained:
            return name, pretrained
    tags = sorted(set(open_clip.list_pretrained_tags_by_model(name))
                  | set(open_clip.list_pretrained_tags_by_model(name.removesuffix("-quickgelu"))))
    raise ValueError(f"open_clip has no pretrained tag {tag!r} for {name}; known tags: {tags}")


def fetch_backbone(config: MagicLensConfig, tag: str) -> Path:
    """The local file of open_clip's pretrained weights `tag`, downloading it if needed.

    Raises `BackboneWeightsUnavailable` naming the file to provide when it cannot be fetched.
    """
    name, pretrained = _pretrained_source(config, tag)
    where = pretrained.get("hf_hub") or pretrained.get("url") or "?"
    try:
        return Path(open_clip.download_pretrained(pretrained))
    except Exception as err:  # hub and URL downloads fail in many ways when offline
        raise BackboneWeightsUnavailable(
            f"could not fetch open_clip weights {name}/{tag} from {where} ({type(err).__name__}: {err}). "
            f"This machine may be offline: download open_clip_pytorch_model.bin (or .safetensors) from "
            f"{where} elsewhere and pass its local path as the backbone instead of {tag!r}."
        ) from err


def backbone_file(config: MagicLensConfig, backbone: str | PathLike) -> Path:
    """The local open_clip checkpoint `backbone` names: a file as it is, or a pretrained tag fetched."""
    path = Path(backbone)
    if path.is_file():
        return path
    if path.suffix in _WEIGHT_SUFFIXES or "/" in str(backbone):
        raise FileNotFoundError(f"backbone checkpoint not found: {path}")
    return fetch_backbone(config, str(backbone))


def load_backbone(model: MagicLens, path: str | PathLike) -> MagicLens:
    """Load a local open_clip checkpoint into `model`'s CLIP towers (strictly); returns the model."""
    open_clip.load_checkpoint(model.clip, str(path), strict=True)
    return model
