"""MagicLens in PyTorch: open_clip CLIP towers (QuickGELU) + the fusion head, one shared encoder.

A query is (image, instruction); a target is (image, ""). Both go through the same weights:
CLIP image and text embeddings (unnormalised) → 2-token fusion encoder → attention pooler → L2 norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from torch import nn

from magiclens_core.images.preprocess import PreprocessMode, normalize, prepare_pixels
from magiclens_core.model.config import MagicLensConfig, resolve_config
from magiclens_core.model.layers import FusionHead
from magiclens_core.model.tokenizer import Tokenizer


def build_clip(config: MagicLensConfig) -> CLIP:
    """A randomly initialised open_clip CLIP with the configured towers and QuickGELU."""
    clip = config.clip
    vision = CLIPVisionCfg(
        layers=clip.vision_layers,
        width=clip.vision_width,
        head_width=clip.vision_width // clip.vision_heads,
        mlp_ratio=clip.vision_mlp_ratio,
        patch_size=clip.vision_patch_size,
        image_size=clip.image_size,
    )
    text = CLIPTextCfg(
        context_length=clip.context_length,
        vocab_size=clip.vocab_size,
        width=clip.text_width,
        heads=clip.text_heads,
        layers=clip.text_layers,
        mlp_ratio=clip.text_mlp_ratio,
    )
    return CLIP(embed_dim=clip.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True)


def l2_normalize(embed: torch.Tensor) -> torch.Tensor:
    """`e / sqrt(sum(e²) + 1e-12)` in float32, as the official model normalises."""
    embed = embed.float()
    return embed / torch.sqrt((embed * embed).sum(dim=-1, keepdim=True) + 1e-12)


class MagicLens(nn.Module):
    """The MagicLens dual encoder (shared weights for queries and targets)."""

    def __init__(self, config: MagicLensConfig | str | dict = "base") -> None:
        super().__init__()
        self.config = resolve_config(config)
        self.clip = build_clip(self.config)
        head = self.config.head
        self.head = FusionHead(head.embed_dim, head.num_layers, head.num_heads, head.ff_dim,
                               head.pooler_width, head.num_query_tokens)
        self.tokenizer = Tokenizer(self.config.clip.context_length)
        self.model_id: str | None = None  # set by the loaders: identifies the weights

    @property
    def image_size(self) -> int:
        return self.config.clip.image_size

    @property
    def embed_dim(self) -> int:
        return self.config.head.embed_dim

    def tokenize(self, texts: Sequence[str] | str, truncate: bool = False) -> torch.Tensor:
        """LongTensor [B, 77] of official token ids; over-long texts raise `ValueError` unless truncated."""
        return self.tokenizer(texts, truncate=truncate)

    def prepare(self, pixels: torch.Tensor, mode: PreprocessMode = "model") -> torch.Tensor:
        """[B,3,H,W] pixels in [0,1] of any size → normalised [B,3,S,S] model input."""
        return normalize(prepare_pixels(pixels, self.image_size, mode))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings [B,D], unnormalised; `pixels` in [0,1], any size."""
        param = self.clip.visual.conv1.weight
        return self.clip.visual(self.prepare(pixels.to(param.device, param.dtype)))

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """CLIP text embeddings [B,D], unnormalised, with the official mask (causal AND key id > 0).

        The sequence is cut after the longest text's end token: with a causal mask, later positions
        cannot change the result, so this is exact and spares most of the 77 positions. Ids on the
        CPU (as the tokenizer makes them) are measured there, so a GPU is never waited on.
        """
        length = int(token_ids.argmax(dim=-1).max()) + 1
        ids = token_ids[:, :length].to(self.clip.token_embedding.weight.device, non_blocking=True)
        eot_positions = ids.argmax(dim=-1)
        x = self.clip.token_embedding(ids) + self.clip.positional_embedding[:length]
        allowed = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
        allowed = allowed.unsqueeze(0) & (ids > 0).unsqueeze(1)  # [B, query, key]
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=ids.device)
        mask.masked_fill_(~allowed, torch.finfo(x.dtype).min)
        mask = mask.repeat_interleave(self.config.clip.text_heads, dim=0)  # [B·heads, L, L]
        x = self.clip.ln_final(self.clip.transformer(x, attn_mask=mask))
        pooled = x[torch.arange(x.shape[0], device=x.device), eot_positions]
        projection = self.clip.text_projection
        return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection

    def fuse(self, image_embed: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
        """The L2-normalised MagicLens embedding from CLIP image and text embeddings."""
        return l2_normalize(self.head(image_embed, text_embed))

    def embed(self, pixels: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """float32 [B,D] L2-normalised embeddings; pixels [B,3,H,W] in [0,1], token ids [B,77]."""
        if pixels.shape[0] != token_ids.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {token_ids.shape[0]} texts")
        return self.fuse(self.encode_image(pixels), self.encode_text(token_ids))

    forward = embed

    def clip_embed(self, pixels: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's own (unnormalised) image and text embeddings."""
        return self.encode_image(pixels), self.encode_text(token_ids)
