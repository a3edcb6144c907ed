"""The numeric precision a model runs in: float32, or bf16/fp16 autocast (the weights stay float32).

Importing this module does not import torch, so light configs (the server's, the jobs') can name `Precision`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]


def resolve_precision(precision: Precision, device: torch.device) -> str:
    """`fp32`, `bf16` or `fp16`: `auto` is bf16 on CUDA and fp32 elsewhere; an unknown name is a `ValueError`."""
    if precision not in get_args(Precision):
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(get_args(Precision))}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a forward runs under at a resolved `precision`: autocast to bf16/fp16, nothing for fp32."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])
