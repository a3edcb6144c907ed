"""The training data pipeline (Ray Data): read triplets, decode, augment and tokenize in CPU tasks.

Rows out: `query_pixels` and `target_pixels` (uint8 [S,S,3] at the model's resolution, the compact form
of `magiclens_core.images.pixels`) and `query_ids` (int64 token ids). Without augmentation the pixels
are `model_pixels` of the image: `Embedder.pixels` (centred square crop, antialiased resize) rounded to
8 bits, so images already at the model's size pass through unchanged. A triplet whose image cannot be
used is dropped with a logged reason.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from jobs.stages.sources import is_lance_dataset
from magiclens_core.images.decode import ImageDecodeError
from magiclens_core.images.pixels import model_pixels, to_pixels, to_uint8
from magiclens_core.images.preprocess import resize
from magiclens_core.images.sources import image_bytes_or_path, load_image_source
from magiclens_core.model.tokenizer import Tokenizer

TRIPLET_COLUMNS = ["query_image", "instruction", "target_image"]
PIXEL_COLUMNS = ("query_pixels", "target_pixels")

logger = logging.getLogger(__name__)


def read_triplets(source: str):
    """A lazy Ray Dataset of the triplet columns of a Parquet or Lance source (file, folder or URI)."""
    import ray.data

    if is_lance_dataset(source):
        return ray.data.read_lance(source, columns=TRIPLET_COLUMNS)
    return ray.data.read_parquet(source, shuffle="files").select_columns(TRIPLET_COLUMNS)


def random_square_crop(pixels: torch.Tensor, min_fraction: float, rng: np.random.Generator) -> torch.Tensor:
    """A square of `min_fraction`..1 of the shorter side at a random place (no flips, no colour changes:
    instructions speak of position and colour)."""
    height, width = pixels.shape[-2:]
    side = max(1, round(min(height, width) * rng.uniform(min_fraction, 1.0)))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    return pixels[..., top:top + side, left:left + side]


def image_to_model_pixels(value, image_size: int, crop_min: float, rng: np.random.Generator) -> np.ndarray:
    """One image cell → uint8 [S,S,3]: `model_pixels` (the Embedder's geometry), or with `crop_min` < 1 a
    random square crop resized to the model's size."""
    if crop_min >= 1.0:
        return model_pixels(image_bytes_or_path(value), image_size)[0]
    cropped = random_square_crop(to_pixels(load_image_source(value)), crop_min, rng)
    return to_uint8(resize(cropped, image_size)).numpy()


def decode_triplets(batch: dict[str, np.ndarray], image_size: int, context_length: int = 77,
                    crop_min: float = 1.0) -> dict[str, np.ndarray]:
    """A Ray Data `map_batches` function: triplet cells → model-ready pixels and token ids."""
    rng = np.random.default_rng()
    rows: dict[str, list] = {"query_pixels": [], "target_pixels": [], "instruction": []}
    for query, instruction, target in zip(batch["query_image"], batch["instruction"], batch["target_image"],
                                          strict=True):
        if not isinstance(instruction, str):
            logger.warning("training triplet dropped: its instruction is %s", type(instruction).__name__)
            continue
        try:
            query_pixels = image_to_model_pixels(query, image_size, crop_min, rng)
            target_pixels = image_to_model_pixels(target, image_size, crop_min, rng)
        except ImageDecodeError as err:
            logger.warning("training triplet dropped: %s", err)
            continue
        rows["query_pixels"].append(query_pixels)
        rows["target_pixels"].append(target_pixels)
        rows["instruction"].append(instruction)
    shape = (0, image_size, image_size, 3)
    ids = Tokenizer(context_length)(rows["instruction"], truncate=True) if rows["instruction"] else \
        torch.zeros(0, context_length, dtype=torch.long)
    return {
        "query_pixels": np.stack(rows["query_pixels"]) if rows["query_pixels"] else np.zeros(shape, np.uint8),
        "target_pixels": np.stack(rows["target_pixels"]) if rows["target_pixels"] else np.zeros(shape, np.uint8),
        "query_ids": ids.numpy(),
    }


def decoded_row_bytes(image_size: int, context_length: int = 77) -> int:
    """Bytes of one decoded row: two uint8 images at the model's size and the int64 token ids."""
    return 2 * image_size * image_size * 3 + 8 * context_length


def training_dataset(source: str, image_size: int, context_length: int = 77, crop_min: float = 1.0):
    """Read (files in a new random order each epoch) → decode, augment and tokenize in CPU tasks, streamed;
    workers shuffle further with their local shuffle buffers."""
    return read_triplets(source).map_batches(
        decode_triplets, fn_kwargs={"image_size": image_size, "context_length": context_length,
                                    "crop_min": crop_min},
        batch_format="numpy", batch_size=64)
