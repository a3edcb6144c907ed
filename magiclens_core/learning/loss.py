"""The MagicLens contrastive loss: each query against all targets and all query negatives of the batch.

For query `i` (image + instruction) the positive is target `i` (its target image with `""`); the negatives
are every other target and every query image encoded with the empty instruction (query negatives, so the
model learns not to return the query image itself). Logits are `scale · cosine`; the loss is the mean
cross-entropy over the local queries.

With several processes (`torch.distributed` initialised), targets and query negatives are all-gathered,
so each query sees the whole global batch. `gather_with_grad=True` back-propagates through the gather
(exactly the single-process loss over the global batch once gradients are averaged across processes,
as DDP does); `False` gathers without gradient, so other processes' embeddings act as constants.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn
import torch.nn.functional as F
from torch import nn


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, differentiable: torch's functional collective where it has one (the older
    `torch.distributed.nn.all_gather` is deprecated), else that."""
    try:
        from torch.distributed._functional_collectives import all_gather_single_autograd
    except ImportError:  # torch before the functional autograd collectives
        return torch.cat(torch.distributed.nn.all_gather(local))
    return all_gather_single_autograd(local.contiguous(), gather_dim=0, group=dist.group.WORLD)


def all_gather(local: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """Every process's `local` rows concatenated in rank order (as open_clip's `gather_features`).

    Without gradient, the local slice is the input itself, so the local rows stay differentiable.
    """
    rank, world = _world()
    if world == 1:
        return local
    if with_grad:  # the backward pass sums each rank's gradient of its slice, as open_clip's gathering does
        return _gather_with_grad(local)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.detach())
    parts[rank] = local
    return torch.cat(parts)


class ContrastiveLoss(nn.Module):
    """Query → (targets ∪ query negatives) softmax cross-entropy, optionally over the global batch."""

    def __init__(self, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.gather_with_grad = gather_with_grad

    def logits(self, queries: torch.Tensor, targets: torch.Tensor, query_negatives: torch.Tensor | None,
               scale: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the local queries against every process's candidates, and each query's positive.

        Each process contributes the block `[targets; query negatives]`, so query `i` of rank `r` has
        its positive at column `r · block + i`.
        """
        rank, _ = _world()
        local = targets if query_negatives is None else torch.cat([targets, query_negatives])
        candidates = all_gather(local, self.gather_with_grad)
        logits = scale * queries.float() @ candidates.float().T
        labels = torch.arange(queries.shape[0], device=queries.device) + rank * local.shape[0]
        return logits, labels

    def forward(self, queries: torch.Tensor, targets: torch.Tensor, query_negatives: torch.Tensor | None,
                scale: torch.Tensor | float) -> torch.Tensor:
        """Mean cross-entropy of the local queries; every process must pass the same batch size."""
        logits, labels = self.logits(queries, targets, query_negatives, scale)
        return F.cross_entropy(logits, labels)
