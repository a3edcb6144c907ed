"""Decoded images → model pixels (torch): `to_pixels` for one image, and fixed-size pixel batches for
pipelines that decode apart from where they embed.

`model_pixels` decodes one image on the CPU (through `load_image`) and returns it already cropped and
resized to the model's input size as compact uint8, so decode workers ship 150 KB per image instead of
a full-resolution bitmap. `decode_on_device` decodes a batch of JPEGs with nvJPEG (torchvision's
`decode_jpeg` on CUDA) and falls back to `model_pixels` for anything else. Both give pixels that
`Embedder` accepts directly as a [B,3,S,S] float batch via `as_float_batch`.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from magiclens_core.images.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, crop_instance, load_image, to_rgb
from magiclens_core.images.preprocess import PreprocessMode, prepare_pixels

JPEG_MAGIC = b"\xff\xd8\xff"


def to_pixels(image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """An RGB image as a float32 tensor [3,H,W] in [0,1].

    Accepts a PIL image, a uint8 HWC array, or a float CHW tensor already in [0,1].
    """
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a [3,H,W] tensor, got shape {tuple(image.shape)}")
        if not image.is_floating_point():
            raise ValueError(f"expected a float tensor in [0,1], got {image.dtype}")
        return image.float()
    if isinstance(image, Image.Image):
        image = np.asarray(to_rgb(image) if image.mode != "RGB" else image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 array, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    # np.asarray(PIL image) is read-only; torch.from_numpy warns on those, so copy when needed
    pixels = np.require(image, requirements=["C_CONTIGUOUS", "WRITEABLE"])
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[...,3,S,S] floats in [0,1] → [...,S,S,3] uint8 (rounded)."""
    return pixels.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).movedim(-3, -1)


def model_pixels(data: bytes, size: int, mode: PreprocessMode = "model", max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_size: int = 1, box: Sequence[float] | None = None) -> tuple[np.ndarray, int, int]:
    """Decode one image and prepare it for the model: (uint8 [S,S,3], width, height), the size being the
    decoded image's. `box` ([x, y, w, h]) crops an instance first (`crop_instance`).

    Raises `ImageDecodeError` with a reason exactly as `load_image` does.
    """
    image = load_image(data, max_pixels=max_pixels, min_size=min_size)
    width, height = image.size
    if box is not None:
        image = crop_instance(image, tuple(box))
    pixels = prepare_pixels(to_pixels(image), size, mode)
    return to_uint8(pixels).numpy(), width, height


def as_float_batch(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [B,S,S,3] pixels → float [B,3,S,S] in [0,1], the batch form `Embedder` takes."""
    if isinstance(pixels, np.ndarray) and not pixels.flags.writeable:
        pixels = pixels.copy()  # torch refuses to share read-only memory (Arrow buffers are)
    tensor = torch.as_tensor(pixels)
    return tensor.movedim(-1, -3).float().div_(255.0)


def check_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 1) -> tuple[int, int]:
    """(width, height) from the header alone, with the same limits as `load_image`; no pixel is decoded."""
    if not data:
        raise ImageDecodeError("empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                orientation = image.getexif().get(0x0112, 1)
    except Exception as err:  # PIL's many header errors: let `load_image` name the reason
        load_image(data, max_pixels=max_pixels, min_size=min_size)
        raise ImageDecodeError("corrupt", str(err) or type(err).__name__) from err
    if width * height > max_pixels:
        raise ImageDecodeError("too_many_pixels", f"{width}x{height} exceeds the limit of {max_pixels} pixels")
    if min(width, height) < min_size:
        raise ImageDecodeError("too_small", f"{width}x{height} is under the minimum side of {min_size}")
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def decode_on_device(datas: Sequence[bytes], size: int, device: torch.device | str,
                     mode: PreprocessMode = "model", max_pixels: int = DEFAULT_MAX_PIXELS,
                     min_size: int = 1) -> tuple[torch.Tensor, list[tuple[int, int] | ImageDecodeError]]:
    """Decode and prepare a batch on `device`: JPEGs with nvJPEG, the rest (and any JPEG nvJPEG refuses)
    through `model_pixels`.

    Returns float pixels [N,3,S,S] on `device` for the images that decoded (in input order) and, per
    input, its (width, height) or the `ImageDecodeError` that rejected it.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    outcome: list[tuple[int, int] | ImageDecodeError] = []
    jpegs: list[int] = []
    for index, data in enumerate(datas):
        try:
            outcome.append(check_header(data, max_pixels, min_size))
            if data[:3] == JPEG_MAGIC:
                jpegs.append(index)
        except ImageDecodeError as err:
            outcome.append(err)
    decoded: dict[int, torch.Tensor] = {}
    if jpegs:
        tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in jpegs]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
            except RuntimeError:  # nvJPEG refuses the whole batch on one bad file: decode one by one
                images = []
                for tensor in tensors:
                    try:
                        images.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device,
                                                  apply_exif_orientation=True))
                    except RuntimeError:
                        images.append(None)
        for index, image in zip(jpegs, images, strict=True):
            if image is not None:
                decoded[index] = prepare_pixels(image.float().div_(255.0), size, mode)
    out = []
    for index, result in enumerate(outcome):
        if isinstance(result, ImageDecodeError):
            continue
        if index not in decoded:
            try:
                pixels, width, height = model_pixels(datas[index], size, mode, max_pixels, min_size)
            except ImageDecodeError as err:
                outcome[index] = err
                continue
            outcome[index] = (width, height)
            decoded[index] = as_float_batch(pixels).to(device)
        out.append(decoded[index])
    if not out:
        return torch.zeros(0, 3, size, size, device=device), outcome
    return torch.stack(out), outcome
