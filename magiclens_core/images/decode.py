"""Robust image decoding: bytes or a path in, an RGB PIL image or one typed error out."""

from __future__ import annotations

import io
import warnings
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # larger images are rejected before decoding (decompression bombs)

ImageSource = bytes | str | PathLike


class ImageDecodeError(ValueError):
    """An image that cannot be used, with a short machine-friendly `reason`."""

    def __init__(self, reason: str, detail: str = "", source: str = "") -> None:
        self.reason = reason
        self.detail = detail
        self.source = source
        where = f" ({source})" if source else ""
        super().__init__(f"{reason}{where}: {detail}" if detail else f"{reason}{where}")


def _read_bytes(source: ImageSource) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), ""
    path = Path(source)
    try:
        return path.read_bytes(), str(path)
    except OSError as err:
        raise ImageDecodeError("unreadable", err.strerror or str(err), str(path)) from err


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB; transparency composited on white, 16/32-bit scaled down."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F":
            peak = 1.0 if array.max() <= 1.0 else 255.0
        gray = np.clip(np.round(array / peak * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_size: int = 1) -> Image.Image:
    """Decode bytes or a file into an upright 8-bit RGB image.

    Honours EXIF orientation, takes the first frame of animations, composites alpha on white,
    scales 16-bit images to 8 bits. Raises `ImageDecodeError` (never a PIL exception) when the
    data is empty, not an image, truncated, over `max_pixels` or under `min_size` on a side.
    """
    data, name = _read_bytes(source)
    if not data:
        raise ImageDecodeError("empty", "zero bytes", name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    "too_many_pixels", f"{width}x{height} exceeds the limit of {max_pixels} pixels", name)
            if min(width, height) < min_size:
                raise ImageDecodeError(
                    "too_small", f"{width}x{height} is under the minimum side of {min_size}", name)
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as err:
        raise ImageDecodeError("not_an_image", "unrecognised image format", name) from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError("too_many_pixels", str(err), name) from err
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as err:
        raise ImageDecodeError("corrupt", str(err) or type(err).__name__, name) from err


def crop_instance(image: Image.Image, box: tuple[float, float, float, float], dilate: float = 0.7) -> Image.Image:
    """GeneCIS's instance crop: the box grown by `dilate` of its size up and left (clipped to the image),
    `1 + dilate` times its size wide and high, then padded to a centred square with black."""
    x, y, w, h = box
    left, top = max(0.0, x - dilate * w), max(0.0, y - dilate * h)
    right, bottom = min(image.width, left + (1 + dilate) * w), min(image.height, top + (1 + dilate) * h)
    crop = image.crop((left, top, right, bottom))
    side = max(crop.size)
    square = Image.new("RGB", (side, side), (0, 0, 0))
    square.paste(crop, ((side - crop.width) // 2, (side - crop.height) // 2))
    return square
