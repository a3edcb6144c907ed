"""Ray-free training pieces: which parameters train, the contrastive forward and one optimiser step
(autocast, gradient accumulation, clipping, warm-up + cosine schedule). The initial model comes from
`magiclens_core.factory.initial_model`.

`Learner.train_step` is the one training step: the Ray Train loop and plain-PyTorch benchmarks call it.
A batch is a dict of `query_pixels` and `target_pixels` (uint8 [B,S,S,3] as `images.pixels.model_pixels`
makes them, or float [B,3,H,W] in [0,1]) and `query_ids` ([B,L] token ids of the instructions).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from magiclens_core.images.pixels import as_float_batch
from magiclens_core.learning.loss import ContrastiveLoss
from magiclens_core.model.magiclens import MagicLens
from magiclens_core.model.precision import Precision, autocast, resolve_precision

TrainParts = Literal["all", "head", "last_blocks"]
Batch = Mapping[str, torch.Tensor]


def set_trainable(model: MagicLens, parts: TrainParts = "all", last_blocks: int = 0) -> int:
    """Choose what trains: `all`, the fusion `head` only, or the head plus the `last_blocks` last blocks
    of each tower (with the towers' final norms and projections). Returns the trainable parameter count.
    The CLIP `logit_scale` is never used by MagicLens and never trains."""
    if parts not in ("all", "head", "last_blocks"):
        raise ValueError(f"unknown trainable parts {parts!r}; expected all, head or last_blocks")
    clip = model.clip
    model.requires_grad_(parts == "all")
    model.head.requires_grad_(True)
    clip.logit_scale.requires_grad_(False)
    if parts == "last_blocks":
        if last_blocks < 1:
            raise ValueError("last_blocks must be at least 1 when training the last blocks")
        for tower in (clip.visual.transformer, clip.transformer):
            for block in tower.resblocks[-last_blocks:]:
                block.requires_grad_(True)
        for module in (clip.visual.ln_post, clip.ln_final):
            module.requires_grad_(True)
        clip.visual.proj.requires_grad_(True)
        clip.text_projection.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class ContrastiveModel(nn.Module):
    """MagicLens plus the (fixed or learned) temperature: batch in, the loss's embeddings out."""

    def __init__(self, model: MagicLens, temperature: float = 0.02, learn_temperature: bool = False,
                 query_negatives: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.model = model
        self.query_negatives = query_negatives
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learn_temperature)
        self.register_buffer("empty_ids", model.tokenize([""]), persistent=False)

    @property
    def scale(self) -> torch.Tensor:
        """1 / temperature, capped at 100 as in CLIP."""
        return self.log_scale.exp().clamp(max=100.0)

    def _empty_text(self, rows: int) -> torch.Tensor:
        return self.model.encode_text(self.empty_ids).expand(rows, -1)

    def forward(self, query_pixels: torch.Tensor, query_ids: torch.Tensor, target_pixels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(queries, targets, query negatives or None, scale); both image sets go through one tower call."""
        rows = query_pixels.shape[0]
        images = self.model.encode_image(torch.cat([query_pixels, target_pixels]))
        query_image, target_image = images[:rows], images[rows:]
        queries = self.model.fuse(query_image, self.model.encode_text(query_ids))
        empty_side = torch.cat([target_image, query_image]) if self.query_negatives else target_image
        empty = self.model.fuse(empty_side, self._empty_text(empty_side.shape[0]))
        negatives = empty[rows:] if self.query_negatives else None
        return queries, empty[:rows], negatives, self.scale


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate factor: linear warm-up from 0 to 1, then cosine decay to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; 1-D ones (biases, norms, temperature) get no weight decay."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def check_training_precision(precision: Precision) -> Precision:
    """`precision` if a training step can run in it; fp16 is refused (its gradients underflow without loss
    scaling; bf16 needs none)."""
    if precision == "fp16":
        raise ValueError("training runs in fp32 or bf16 (auto picks one), not fp16: its gradients need loss scaling")
    return precision


def to_unit_pixels(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B,S,S,3] or float [B,3,H,W] pixels → float32 [B,3,H,W] in [0,1] on `device` (copied while
    still compact)."""
    pixels = pixels.to(device, non_blocking=True)
    return as_float_batch(pixels) if pixels.dtype == torch.uint8 else pixels.float()


class Learner:
    """Model, optimiser, schedule and loss; `train_step` does one optimiser step over micro-batches."""

    def __init__(self, model: MagicLens, *, device: torch.device | str = "cpu", lr: float = 1e-4,
                 weight_decay: float = 0.1, warmup_steps: int = 0, total_steps: int = 1, min_lr_ratio: float = 0.0,
                 temperature: float = 0.02, learn_temperature: bool = False, query_negatives: bool = True,
                 gather_with_grad: bool = True, grad_clip: float = 1.0, precision: Precision = "auto",
                 grad_checkpointing: bool = False, train_parts: TrainParts = "all", last_blocks: int = 0) -> None:
        self.device = torch.device(device)
        self.trainable = set_trainable(model, train_parts, last_blocks)
        model.clip.set_grad_checkpointing(grad_checkpointing)
        self.core = ContrastiveModel(model, temperature, learn_temperature, query_negatives).to(self.device)
        self.core.train()
        self.net: nn.Module = self.core
        self.loss = ContrastiveLoss(gather_with_grad)
        self.precision = resolve_precision(check_training_precision(precision), self.device)
        self.grad_clip = grad_clip
        self.optimizer = build_optimizer(self.core, lr, weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_lr_ratio))
        self.step = 0

    @property
    def model(self) -> MagicLens:
        return self.core.model

    def wrap(self, wrapper: Callable[[nn.Module], nn.Module]) -> None:
        """Wrap the module the forward runs through (e.g. in DDP); parameters stay the core's."""
        self.net = wrapper(self.core)

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        if not last and isinstance(self.net, DistributedDataParallel):
            return self.net.no_sync()
        return contextlib.nullcontext()

    def train_step(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        """One optimiser step, gradients accumulated over `micro_batches`; returns their mean loss."""
        total = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            with self._no_sync(index == len(micro_batches) - 1):
                with autocast(self.precision, self.device):
                    queries, targets, negatives, scale = self.net(
                        to_unit_pixels(batch["query_pixels"], self.device),
                        batch["query_ids"].to(self.device, non_blocking=True),
                        to_unit_pixels(batch["target_pixels"], self.device))
                loss = self.loss(queries, targets, negatives, scale) / len(micro_batches)
                loss.backward()
            total += loss.detach()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.core.parameters() if p.requires_grad], self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return total

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def temperature(self) -> float:
        return float(1.0 / self.core.scale.detach())

    def state_dict(self) -> dict[str, Any]:
        """Everything but the MagicLens weights (saved as a model folder): optimiser, schedule, step, temperature."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "step": self.step, "log_scale": self.core.log_scale.detach().cpu()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` saved (the model weights are loaded separately)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        with torch.no_grad():
            self.core.log_scale.copy_(state["log_scale"])
