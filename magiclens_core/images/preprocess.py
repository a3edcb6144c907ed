"""Pixel preprocessing on tensors: the model's crop/resize/normalise and the official evaluation loader's mode.

Inputs are float tensors [B,3,H,W] (or [3,H,W]) with values in [0,1].
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PreprocessMode = Literal["model", "official_eval"]
PREPROCESS_MODES: tuple[str, ...] = ("model", "official_eval")


def center_square_crop(pixels: torch.Tensor) -> torch.Tensor:
    """The largest centred square, offsets floored as in the official code."""
    height, width = pixels.shape[-2:]
    side = min(height, width)
    top = (height - side) // 2
    left = (width - side) // 2
    return pixels[..., top:top + side, left:left + side]


def resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize to size×size (a no-op when already that size)."""
    if pixels.shape[-2:] == (size, size):
        return pixels
    batched = pixels if pixels.dim() == 4 else pixels.unsqueeze(0)
    out = F.interpolate(batched.float(), size=(size, size), mode="bilinear",
                        antialias=True, align_corners=False)
    return out.to(pixels.dtype) if pixels.dim() == 4 else out[0].to(pixels.dtype)


def crop_and_resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """The model's own geometry: largest centred square, then resize to size×size."""
    return resize(center_square_crop(pixels), size)


def official_eval_pixels(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """The official evaluation loader: divide by the image's own max, squash to size×size (no crop).

    Use it to reproduce the paper's benchmark numbers; `model` mode is the default everywhere else.
    """
    batched = pixels if pixels.dim() == 4 else pixels.unsqueeze(0)
    peak = batched.float().amax(dim=(1, 2, 3), keepdim=True)
    out = resize(batched.float() / (peak + 1e-12), size)
    return out if pixels.dim() == 4 else out[0]


def prepare_pixels(pixels: torch.Tensor, size: int, mode: PreprocessMode = "model") -> torch.Tensor:
    """Geometry of one image or batch for the chosen mode, before normalisation."""
    if mode == "model":
        return crop_and_resize(pixels, size)
    if mode == "official_eval":
        return official_eval_pixels(pixels, size)
    raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {PREPROCESS_MODES}")


@lru_cache(maxsize=16)
def _clip_statistics(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as [3,1,1] tensors, made once per device (a copy to a GPU would synchronise)."""
    mean = torch.tensor(CLIP_MEAN, dtype=dtype).view(3, 1, 1).to(device)
    std = torch.tensor(CLIP_STD, dtype=dtype).view(3, 1, 1).to(device)
    return mean, std


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """CLIP mean/std normalisation of [0,1] pixels."""
    mean, std = _clip_statistics(pixels.device, pixels.dtype)
    return (pixels - mean) / std
