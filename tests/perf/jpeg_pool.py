"""Synthetic JPEG bytes for the indexing benchmarks: photo-like (smooth colour fields plus grain), not noise."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def jpeg_pool(count: int, width: int = 500, height: int = 375, distinct: int = 64, seed: int = 0) -> list[bytes]:
    """`count` JPEGs (quality 90) of width x height drawn from `distinct` base pictures; a mark in one corner
    makes every file's bytes (and content hash) differ."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    bases = []
    for _ in range(distinct):
        fx, fy, phase = rng.uniform(0.002, 0.03, 2).tolist() + [rng.uniform(0, 6.3)]
        field = np.stack([np.sin(x * fx + phase + c) * np.cos(y * fy - c) for c in (0.0, 2.1, 4.2)], axis=-1)
        grain = rng.normal(0, 12, size=(height, width, 3))
        bases.append(np.clip(127 + 100 * field + grain, 0, 255).astype(np.uint8))
    pool = []
    for index in range(count):
        image = bases[index % distinct].copy()
        image[:8, :8] = (index % 256, index // 256 % 256, index // 65536 % 256)  # a mark that makes each file unique
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        pool.append(buffer.getvalue())
    return pool
