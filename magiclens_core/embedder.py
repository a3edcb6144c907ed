"""The one embedding path of the system: decoded images (+ instructions) in, numpy embeddings out.

Indexing, serving, training validation and evaluation all embed through `Embedder`, so a query
embedded by the server and the same query embedded by a batch job give the same vector.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from os import PathLike

import numpy as np
import torch
from PIL import Image

from magiclens_core.factory import load_model
from magiclens_core.images.pixels import to_pixels
from magiclens_core.images.preprocess import PreprocessMode, prepare_pixels
from magiclens_core.model.magiclens import MagicLens, l2_normalize
from magiclens_core.model.precision import Precision, autocast, resolve_precision

ImageInput = Image.Image | np.ndarray | torch.Tensor


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Embedder:
    """Batched MagicLens embeddings on one device.

    `precision="auto"` is float32 on CPU and bf16 autocast on CUDA. Outputs are always float32,
    L2-normalised, as numpy arrays [N, D]. `preprocess` is `model` (centre crop + resize, the
    default) or `official_eval` (the official evaluation loader, to reproduce the paper's numbers).
    """

    def __init__(self, model: MagicLens, device: str | torch.device | None = None,
                 precision: Precision = "auto", batch_size: int = 32,
                 preprocess: PreprocessMode = "model") -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.device = _resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = batch_size
        self.preprocess = preprocess
        prepare_pixels(torch.zeros(3, 2, 2), 2, preprocess)  # reject an unknown mode now, not mid-job
        self.model = model.to(self.device).eval()
        self._empty_text: torch.Tensor | None = None

    @classmethod
    def load(cls, path: str | PathLike, **options) -> Embedder:
        """An Embedder over a model folder or an official `.pkl` (options as in the constructor)."""
        return cls(load_model(path), **options)

    @property
    def dim(self) -> int:
        return self.model.embed_dim

    @property
    def model_id(self) -> str | None:
        return self.model.model_id

    def autocast(self) -> AbstractContextManager:
        """The context the model runs under: autocast to bf16/fp16, or nothing for fp32."""
        return autocast(self.precision, self.device)

    def pixels(self, images: Sequence[ImageInput] | torch.Tensor) -> torch.Tensor:
        """Images → one [B,3,S,S] float tensor in [0,1], each image cropped and resized on its own."""
        size = self.model.image_size
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            return prepare_pixels(images.float(), size, self.preprocess)
        return torch.stack([prepare_pixels(to_pixels(image), size, self.preprocess) for image in images])

    def _batches(self, count: int) -> Iterator[slice]:
        for start in range(0, count, self.batch_size):
            yield slice(start, min(start + self.batch_size, count))

    def _empty_text_embed(self) -> torch.Tensor:
        """The CLIP embedding of `""`, shared by every target (computed once)."""
        if self._empty_text is None:
            self._empty_text = self.model.encode_text(self.model.tokenize([""]).to(self.device))
        return self._empty_text

    @torch.inference_mode()
    def embed_queries(self, images: Sequence[ImageInput] | torch.Tensor, instructions: Sequence[str],
                      truncate: bool = False) -> np.ndarray:
        """MagicLens query embeddings of (image, instruction) pairs, float32 [N, D]."""
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
        token_ids = self.model.tokenize(list(instructions), truncate=truncate)  # fails before any work
        out = []
        for part in self._batches(len(images)):
            pixels = self.pixels(images[part]).to(self.device)
            with self.autocast():
                image_embed = self.model.encode_image(pixels)
                text_embed = self.model.encode_text(token_ids[part])
                out.append(self.model.fuse(image_embed, text_embed))
        return self._to_numpy(out)

    def _target_batches(self, images: Sequence[ImageInput] | torch.Tensor
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch: the CLIP image embeddings and the fused target embeddings (on the device)."""
        for part in self._batches(len(images)):
            pixels = self.pixels(images[part]).to(self.device)
            with self.autocast():
                image_embed = self.model.encode_image(pixels)
                text_embed = self._empty_text_embed().expand(image_embed.shape[0], -1)
                fused = self.model.fuse(image_embed, text_embed)
            yield image_embed, fused

    @torch.inference_mode()
    def embed_targets(self, images: Sequence[ImageInput] | torch.Tensor) -> np.ndarray:
        """MagicLens target embeddings (image with the empty instruction), float32 [N, D]."""
        return self._to_numpy([fused.cpu() for _, fused in self._target_batches(images)])

    @torch.inference_mode()
    def embed_targets_and_clip(self, images: Sequence[ImageInput] | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Target embeddings and the CLIP image embeddings (L2-normalised) of the same images, from one pass
        of the image tower: float32 [N, D] each."""
        targets, clips = [], []
        for image_embed, fused in self._target_batches(images):
            targets.append(fused.cpu())
            clips.append(l2_normalize(image_embed).cpu())
        return self._to_numpy(targets), self._to_numpy(clips)

    @torch.inference_mode()
    def embed_clip_images(self, images: Sequence[ImageInput] | torch.Tensor) -> np.ndarray:
        """The CLIP backbone's image embeddings, L2-normalised, float32 [N, D]."""
        out = []
        for part in self._batches(len(images)):
            with self.autocast():
                out.append(l2_normalize(self.model.encode_image(self.pixels(images[part]).to(self.device))).cpu())
        return self._to_numpy(out)

    @torch.inference_mode()
    def embed_clip_texts(self, texts: Sequence[str], truncate: bool = False) -> np.ndarray:
        """The CLIP backbone's text embeddings, L2-normalised, float32 [N, D]."""
        token_ids = self.model.tokenize(list(texts), truncate=truncate)
        out = []
        for part in self._batches(len(texts)):
            with self.autocast():
                out.append(l2_normalize(self.model.encode_text(token_ids[part].to(self.device))).cpu())
        return self._to_numpy(out)

    def _to_numpy(self, parts: list[torch.Tensor]) -> np.ndarray:
        if not parts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return torch.cat(parts).float().cpu().numpy()  # one copy back per call, not one per batch
