"""Crop/resize geometry checked against an independent reference: numpy slicing + PIL's resize.

PIL's BILINEAR resize of float ('F') images uses a triangle filter widened by the scale factor,
the same antialiasing the official JAX resize applies; it shares no code with ours.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from magiclens_core.images.preprocess import CLIP_MEAN, CLIP_STD, official_eval_pixels, prepare_pixels

SIZE = 224


def _pil_resize(array_hwc: np.ndarray, size: int) -> np.ndarray:
    channels = [np.asarray(Image.fromarray(array_hwc[..., c].astype(np.float32), mode="F")
                           .resize((size, size), Image.BILINEAR)) for c in range(3)]
    return np.stack(channels, axis=0)


def _reference_crop(array_hwc: np.ndarray) -> np.ndarray:
    height, width = array_hwc.shape[:2]
    if height > width:
        top = (height - width) // 2
        return array_hwc[top:top + width]
    left = (width - height) // 2
    return array_hwc[:, left:left + height]


@pytest.mark.parametrize("height,width", [(300, 451), (451, 300), (224, 301), (517, 224), (160, 120), (224, 224)])
def test_model_crop_and_resize_matches_reference(height, width):
    rng = np.random.default_rng(height * 1000 + width)
    image = rng.random((height, width, 3), dtype=np.float32)
    expected = _pil_resize(_reference_crop(image), SIZE)
    got = prepare_pixels(torch.from_numpy(image).permute(2, 0, 1), SIZE, "model").numpy()
    assert got.shape == (3, SIZE, SIZE)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)


def test_crop_keeps_only_the_centre_square():
    """Landscape image: margins red, centre square green; nothing red survives the crop."""
    image = np.zeros((200, 500, 3), dtype=np.float32)
    image[..., 0] = 1.0
    image[:, 150:350] = (0.0, 1.0, 0.0)
    got = prepare_pixels(torch.from_numpy(image).permute(2, 0, 1), SIZE, "model")
    assert torch.allclose(got[0], torch.zeros(SIZE, SIZE), atol=1e-6)
    assert torch.allclose(got[1], torch.ones(SIZE, SIZE), atol=1e-6)


def test_official_eval_divides_by_max_and_squashes_without_crop():
    rng = np.random.default_rng(7)
    image = (rng.random((180, 400, 3)) * 0.5).astype(np.float32)
    expected = _pil_resize(image / image.max(), SIZE)
    got = official_eval_pixels(torch.from_numpy(image).permute(2, 0, 1), SIZE).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)
    brighter = official_eval_pixels(torch.from_numpy(image * 1.8).permute(2, 0, 1), SIZE).numpy()
    np.testing.assert_allclose(brighter, got, atol=1e-6, rtol=0)  # each image scaled by its own max


def test_batched_input_equals_per_image(official_model):
    rng = np.random.default_rng(3)
    batch = torch.from_numpy(rng.random((3, 3, 240, 320), dtype=np.float32))
    together = official_model.prepare(batch)
    alone = torch.stack([official_model.prepare(batch[i:i + 1])[0] for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)


def test_normalisation_uses_clip_statistics(official_model):
    grey = torch.full((1, 3, SIZE, SIZE), 0.5)
    got = official_model.prepare(grey)[0, :, 0, 0]
    expected = (0.5 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(got, expected)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown preprocessing mode"):
        prepare_pixels(torch.zeros(3, 8, 8), SIZE, "squash")
