"""Decoding for pipelines (magiclens_core.images.pixels): CPU model pixels and the batched nvJPEG path, which
falls back to PIL and runs with torchvision's CPU decoder where there is no GPU."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from image_files import encode, png_claiming_size
from PIL import Image

from magiclens_core.images.decode import ImageDecodeError, load_image
from magiclens_core.images.pixels import as_float_batch, check_header, decode_on_device, model_pixels, to_pixels
from magiclens_core.images.preprocess import prepare_pixels


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    array = np.stack([(x * 3 + y) % 256, (y * 2) % 256, (x + seed * 40) % 256], axis=-1)
    return Image.fromarray((array + rng.integers(0, 8, array.shape)).clip(0, 255).astype(np.uint8))


def test_model_pixels_match_the_float_path():
    data = encode(photo(90, 60), "PNG")
    pixels, width, height = model_pixels(data, 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8 and (width, height) == (90, 60)
    reference = prepare_pixels(to_pixels(load_image(data)), 32)
    assert torch.allclose(as_float_batch(pixels[None])[0], reference, atol=0.5 / 255 + 1e-6)
    with pytest.raises(ImageDecodeError) as caught:
        model_pixels(b"", 32)
    assert caught.value.reason == "empty"


def test_check_header_reads_sizes_and_limits_without_decoding():
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = io.BytesIO()
    photo(40, 20).save(rotated, format="JPEG", exif=exif)
    assert check_header(rotated.getvalue()) == (20, 40)
    for data, reason, limits in [(png_claiming_size(100_000, 100_000), "too_many_pixels", {}),
                                 (encode(photo(5, 5), "PNG"), "too_small", {"min_size": 8}),
                                 (b"text, not an image", "not_an_image", {}), (b"", "empty", {})]:
        with pytest.raises(ImageDecodeError) as caught:
            check_header(data, **limits)
        assert caught.value.reason == reason


def test_decode_on_device_keeps_order_and_rejects_with_reasons():
    jpeg = encode(photo(64, 48, seed=1), "JPEG", quality=95)
    cmyk = encode(Image.new("CMYK", (24, 16), (0, 255, 255, 0)), "JPEG")
    png = encode(photo(30, 50, seed=2), "PNG")
    datas = [jpeg, b"garbage", png, jpeg[: len(jpeg) // 3], cmyk, png_claiming_size(100_000, 100_000)]
    pixels, outcome = decode_on_device(datas, 32, "cpu")
    assert outcome[0] == (64, 48) and outcome[2] == (30, 50) and outcome[4] == (24, 16)
    reasons = {index: result.reason for index, result in enumerate(outcome) if isinstance(result, ImageDecodeError)}
    assert reasons == {1: "not_an_image", 3: "corrupt", 5: "too_many_pixels"}
    assert pixels.shape == (3, 3, 32, 32)
    for row, data in zip(pixels, [jpeg, png, cmyk], strict=True):
        reference = prepare_pixels(to_pixels(load_image(data)), 32)
        assert (row - reference).abs().mean() < 0.02  # decoders differ in chroma upsampling and rounding
    empty, outcome = decode_on_device([b""], 32, "cpu")
    assert empty.shape == (0, 3, 32, 32) and outcome[0].reason == "empty"
