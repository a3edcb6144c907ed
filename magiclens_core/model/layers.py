"""The MagicLens head: capped-logit attention, the 2-token fusion encoder and the attention pooler.

Numerics follow the official release: pre-LN layers with LayerNorm eps 1e-6 (the official `1 + scale`
parameterisation is folded into the weight when loading), attention logits capped with `50·tanh(x/50)`,
ReLU feed-forward, and a pooler whose query is scaled per dimension by `softplus` of a learned vector.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_CAP = 50.0
HEAD_LN_EPS = 1e-6
R_SOFTPLUS_0 = 1.442695041  # 1 / softplus(0)


class PerDimScale(nn.Module):
    """Scales the query by `1.442695041/sqrt(head_dim) · softplus(w)` per dimension."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))  # the official initialisation

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        scale = R_SOFTPLUS_0 / math.sqrt(self.weight.shape[0]) * F.softplus(self.weight)
        return query * scale.to(query.dtype)


class CappedAttention(nn.Module):
    """Multi-head dot-product attention with capped logits and no mask.

    `width` is the total projected width (heads × head_dim); it may differ from `dim`.
    """

    def __init__(self, dim: int, num_heads: int, width: int, per_dim_scale: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.query = nn.Linear(dim, width)
        self.key = nn.Linear(dim, width)
        self.value = nn.Linear(dim, width)
        self.post = nn.Linear(width, dim)
        self.per_dim_scale = PerDimScale(self.head_dim) if per_dim_scale else None

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
        q = self._split_heads(self.query(query))
        k = self._split_heads(self.key(key_value))
        v = self._split_heads(self.value(key_value))
        if self.per_dim_scale is not None:
            q = self.per_dim_scale(q)
        else:
            q = q * self.head_dim**-0.5
        logits = torch.einsum("btnh,bsnh->bnts", q, k)
        logits = LOGIT_CAP * torch.tanh(logits / LOGIT_CAP)
        probs = logits.softmax(dim=-1)
        encoded = torch.einsum("bnts,bsnh->btnh", probs, v)
        return self.post(encoded.flatten(2))


class FusionLayer(nn.Module):
    """`a = Attn(LN(x)) + x; out = W2·relu(W1·LN(a) + b1) + b2 + a`."""

    def __init__(self, dim: int, num_heads: int, ff_dim: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=HEAD_LN_EPS)
        self.attn = CappedAttention(dim, num_heads, dim)
        self.ff_norm = nn.LayerNorm(dim, eps=HEAD_LN_EPS)
        self.ff_in = nn.Linear(dim, ff_dim)
        self.ff_out = nn.Linear(ff_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.attn_norm(x)
        x = x + self.attn(normed, normed)
        return x + self.ff_out(F.relu(self.ff_in(self.ff_norm(x))))


class AttentionPooler(nn.Module):
    """Learned query tokens attending over the fusion output, then LayerNorm."""

    def __init__(self, dim: int, num_heads: int, width: int, num_query_tokens: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.empty(num_query_tokens, dim))
        nn.init.normal_(self.query, std=dim**-0.5)
        self.attn = CappedAttention(dim, num_heads, width, per_dim_scale=True)
        self.norm = nn.LayerNorm(dim, eps=HEAD_LN_EPS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        query = self.query.unsqueeze(0).expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        return self.norm(self.attn(query, tokens))


class FusionHead(nn.Module):
    """Fuses one image and one text embedding into one (unnormalised) embedding."""

    def __init__(self, dim: int, num_layers: int, num_heads: int, ff_dim: int,
                 pooler_width: int, num_query_tokens: int = 1) -> None:
        super().__init__()
        self.layers = nn.ModuleList(FusionLayer(dim, num_heads, ff_dim) for _ in range(num_layers))
        self.pooler = AttentionPooler(dim, num_heads, pooler_width, num_query_tokens)

    def forward(self, image_embed: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
        x = torch.stack([image_embed, text_embed], dim=1)  # [B, 2, D], image first
        for layer in self.layers:
            x = layer(x)
        return self.pooler(x)[:, 0]
