"""Tests for magiclens_core.images.decode (a corpus of awkward files built in tmp_path, nothing shipped) and
`to_pixels`, and that the light modules import no torch."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from image_files import encode, png_claiming_size
from PIL import Image

from magiclens_core.images.decode import ImageDecodeError, load_image
from magiclens_core.images.pixels import to_pixels

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


# --------------------------------------------------------------------------- helpers


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int16)


def assert_colour(region: np.ndarray, expected: tuple[int, int, int], tol: int = 0) -> None:
    diff = np.abs(region.reshape(-1, 3) - np.array(expected, dtype=np.int16))
    assert diff.max() <= tol, f"max deviation {diff.max()} from {expected} (tolerance {tol})"


def noisy_jpeg(width: int = 64, height: int = 64) -> bytes:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return encode(Image.fromarray(array), "JPEG", quality=90)


# --------------------------------------------------------------------------- failures


def test_zero_bytes_is_empty(tmp_path):
    path = write(tmp_path, "empty.jpg", b"")
    for source in (path, b""):
        with pytest.raises(ImageDecodeError) as info:
            load_image(source)
        assert info.value.reason == "empty"


def test_text_named_jpg_is_not_an_image(tmp_path):
    path = write(tmp_path, "notes.jpg", b"this is not a jpeg, just some text\n" * 10)
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    assert info.value.reason == "not_an_image"
    assert info.value.source == str(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_corrupt(tmp_path, fmt):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(array), fmt)
    assert Image.open(io.BytesIO(data)).size == (64, 64)  # the full file is fine
    path = write(tmp_path, f"truncated.{fmt.lower()}", data[: len(data) // 2])
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    assert info.value.reason == "corrupt"
    # the PIL / OS error is chained, not leaked
    assert isinstance(info.value.__cause__, (OSError, SyntaxError, ValueError, EOFError))


def test_missing_path_is_unreadable(tmp_path):
    missing = tmp_path / "nope.png"
    for source in (missing, str(missing)):
        with pytest.raises(ImageDecodeError) as info:
            load_image(source)
        assert info.value.reason == "unreadable"
        assert info.value.source == str(missing)


def test_directory_is_unreadable(tmp_path):
    with pytest.raises(ImageDecodeError) as info:
        load_image(tmp_path)
    assert info.value.reason == "unreadable"


def test_error_is_a_value_error():
    with pytest.raises(ValueError):
        load_image(b"")


# --------------------------------------------------------------------------- size limits


def test_real_large_png_over_max_pixels(tmp_path):
    data = encode(Image.new("L", (3000, 3000), 0), "PNG")
    assert len(data) < 100_000  # small on disk, 9 Mpx when decoded
    path = write(tmp_path, "big.png", data)
    with pytest.raises(ImageDecodeError) as info:
        load_image(path, max_pixels=1_000_000)
    assert info.value.reason == "too_many_pixels"
    # the same file is fine under a limit it respects
    image = load_image(path, max_pixels=9_000_000)
    assert image.size == (3000, 3000)
    assert pixels(image).max() == 0


@pytest.mark.parametrize(
    ("width", "height", "max_pixels"),
    [
        (5_000, 5_000, 1_000_000),            # the module's own limit, below PIL's
        (100_000, 100_000, 1_000_000),        # far above PIL's DecompressionBombError threshold
        (100_000, 100_000, 10**12),           # PIL's own bomb error must come out typed
        (10_000, 10_000, 10**12),             # PIL's DecompressionBombWarning range, typed too
        (1, 2**31 - 1, 1_000_000),            # absurd aspect ratio
    ],
)
def test_crafted_header_claiming_huge_size(tmp_path, width, height, max_pixels):
    data = png_claiming_size(width, height)
    assert len(data) < 100
    with Image.open(io.BytesIO(png_claiming_size(1000, 700))) as probe:  # the crafting works
        assert probe.size == (1000, 700)
    path = write(tmp_path, "bomb.png", data)
    with pytest.raises(ImageDecodeError) as info:
        load_image(path, max_pixels=max_pixels)
    assert info.value.reason == "too_many_pixels"


def test_crafted_header_default_limit(tmp_path):
    with pytest.raises(ImageDecodeError) as info:
        load_image(png_claiming_size(100_000, 100_000))
    assert info.value.reason == "too_many_pixels"


def test_crafted_header_within_limit_is_corrupt_not_allocated():
    """Claims 2000x2000 but carries one pixel of data: the decoder must fail cleanly."""
    with pytest.raises(ImageDecodeError) as info:
        load_image(png_claiming_size(2000, 2000))
    assert info.value.reason == "corrupt"


@pytest.mark.parametrize(("size", "min_size", "ok"), [((5, 5), 10, False), ((40, 5), 10, False),
                                                      ((10, 10), 10, True), ((5, 5), 5, True)])
def test_min_size(size, min_size, ok):
    data = encode(Image.new("RGB", size, BLUE), "PNG")
    if ok:
        image = load_image(data, min_size=min_size)
        assert image.size == size
        assert_colour(pixels(image), BLUE)
    else:
        with pytest.raises(ImageDecodeError) as info:
            load_image(data, min_size=min_size)
        assert info.value.reason == "too_small"


# --------------------------------------------------------------------------- decodes


def test_path_and_bytes_agree(tmp_path):
    data = noisy_jpeg(48, 32)
    path = write(tmp_path, "photo.jpg", data)
    from_path = load_image(path)
    from_str = load_image(str(path))
    from_bytes = load_image(data)
    from_bytearray = load_image(bytearray(data))
    assert from_path.size == (48, 32)
    reference = np.asarray(from_bytes)
    for other in (from_path, from_str, from_bytearray):
        assert other.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(other), reference)


def test_cmyk_jpeg_decodes_to_rgb(tmp_path):
    cmyk_red = Image.new("CMYK", (32, 24), (0, 255, 255, 0))
    path = write(tmp_path, "cmyk.jpg", encode(cmyk_red, "JPEG", quality=95))
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    image = load_image(path)
    assert image.size == (32, 24)
    array = pixels(image)
    assert array[..., 0].min() >= 200
    assert array[..., 1].max() <= 60
    assert array[..., 2].max() <= 60


def test_16bit_png_scaled_to_8bit_gray(tmp_path):
    array = np.array([[0, 32768, 65535]] * 2, dtype=np.uint16)
    source = Image.fromarray(array)
    assert source.mode == "I;16"
    path = write(tmp_path, "deep.png", encode(source, "PNG"))
    image = load_image(path)
    assert image.size == (3, 2)
    decoded = pixels(image)
    for column, expected in enumerate((0, 128, 255)):
        assert_colour(decoded[:, column], (expected,) * 3, tol=1)


def test_palette_png_with_transparency_composited_on_white(tmp_path):
    palette_image = Image.new("P", (4, 2), 0)
    palette_image.putpalette([0, 255, 0, *RED, *BLUE] + [0] * (256 - 3) * 3)
    palette_image.putpixel((0, 0), 1)  # red, opaque
    palette_image.putpixel((1, 0), 2)  # blue, opaque
    # everything else is index 0: green, but fully transparent
    path = write(tmp_path, "palette.png", encode(palette_image, "PNG", transparency=0))
    with Image.open(path) as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    decoded = pixels(load_image(path))
    assert_colour(decoded[0, 0], RED)
    assert_colour(decoded[0, 1], BLUE)
    assert_colour(decoded[0, 2:], WHITE)
    assert_colour(decoded[1], WHITE)


def test_rgba_half_alpha_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (6, 4), (255, 0, 0, 128))
    rgba.paste((0, 0, 255, 255), (0, 0, 3, 4))  # left half opaque blue
    rgba.paste((0, 0, 0, 0), (5, 0, 6, 4))  # last column fully transparent black
    decoded = pixels(load_image(encode(rgba, "PNG")))
    assert_colour(decoded[:, :3], BLUE)
    assert_colour(decoded[:, 3:5], (255, 127, 127), tol=1)
    assert_colour(decoded[:, 5], WHITE)


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("L", 77, (77, 77, 77)),
        ("LA", (0, 128), (127, 127, 127)),
        ("LA", (200, 255), (200, 200, 200)),
        ("1", 1, WHITE),
        ("1", 0, (0, 0, 0)),
    ],
)
def test_grayscale_modes_to_rgb(mode, colour, expected):
    data = encode(Image.new(mode, (5, 3), colour), "PNG")
    image = load_image(data)
    assert image.size == (5, 3)
    assert_colour(pixels(image), expected, tol=1)


@pytest.mark.parametrize(("orientation", "top", "bottom"), [(6, RED, BLUE), (8, BLUE, RED)])
def test_exif_rotated_jpeg_is_upright(tmp_path, orientation, top, bottom):
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))  # left half red, right half blue, as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rotated{orientation}.jpg"
    stored.save(path, exif=exif, quality=95)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
        assert raw.getexif()[0x0112] == orientation
    image = load_image(path)
    assert image.size == (20, 40)
    decoded = pixels(image)
    # 6: rotate 90 degrees clockwise (stored left -> top); 8: counter-clockwise (left -> bottom).
    # Stay a few pixels away from the seam, where JPEG blurs the two colours together.
    assert_colour(decoded[2:16], top, tol=40)
    assert_colour(decoded[24:38], bottom, tol=40)


@pytest.mark.parametrize(("orientation", "left", "right"),
                         [(1, RED, BLUE), (2, BLUE, RED), (3, BLUE, RED), (9, RED, BLUE)])
def test_exif_orientation_without_quarter_turn(tmp_path, orientation, left, right):
    """1: as stored; 2: mirrored; 3: rotated 180 degrees; 9: out of range, ignored."""
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"oriented{orientation}.jpg"
    stored.save(path, exif=exif, quality=95)
    image = load_image(path)
    assert image.size == (40, 20)
    decoded = pixels(image)
    assert_colour(decoded[:, 2:16], left, tol=40)
    assert_colour(decoded[:, 24:38], right, tol=40)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 6), colour) for colour in (RED, BLUE, (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as raw:
        assert raw.n_frames == 3
        raw.seek(2)  # leave the file positioned elsewhere: load_image opens its own copy anyway
    image = load_image(path)
    assert image.size == (8, 6)
    assert_colour(pixels(image), RED)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_every_common_format_decodes(fmt):
    source = Image.new("RGB", (16, 12), BLUE)
    try:
        data = encode(source, fmt)
    except (OSError, KeyError):
        pytest.skip(f"this Pillow cannot write {fmt}")
    image = load_image(data)
    assert image.size == (16, 12)
    assert_colour(pixels(image), BLUE, tol=10)


# --------------------------------------------------------------------------- to_pixels


def test_to_pixels_inputs_agree():
    rng = np.random.default_rng(2)
    array = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    from_array = to_pixels(array)
    from_pil = to_pixels(Image.fromarray(array))
    from_tensor = to_pixels(torch.from_numpy(array).permute(2, 0, 1).float() / 255.0)
    assert from_array.shape == (3, 5, 7)
    assert from_array.dtype == torch.float32
    assert 0.0 <= float(from_array.min()) and float(from_array.max()) <= 1.0
    torch.testing.assert_close(from_pil, from_array)
    torch.testing.assert_close(from_tensor, from_array)
    assert float(from_array[1, 2, 3]) == pytest.approx(array[2, 3, 1] / 255.0)


def test_to_pixels_non_contiguous_array():
    array = np.zeros((4, 6, 3), dtype=np.uint8)
    array[..., 2] = 255
    flipped = array[:, ::-1]
    result = to_pixels(flipped)
    assert result.shape == (3, 4, 6)
    assert torch.equal(result[2], torch.ones(4, 6))
    assert torch.equal(result[:2], torch.zeros(2, 4, 6))


def test_to_pixels_converts_non_rgb_pil():
    result = to_pixels(Image.new("RGBA", (3, 2), (0, 0, 0, 0)))
    assert result.shape == (3, 2, 3)
    assert torch.equal(result, torch.ones(3, 2, 3))  # transparent → white
    gray = to_pixels(Image.new("L", (3, 2), 51))
    torch.testing.assert_close(gray, torch.full((3, 2, 3), 0.2))


def test_to_pixels_of_loaded_image(tmp_path):
    image = load_image(encode(Image.new("RGB", (9, 4), RED), "PNG"))
    result = to_pixels(image)
    assert result.shape == (3, 4, 9)
    assert torch.equal(result[0], torch.ones(4, 9))
    assert torch.equal(result[1:], torch.zeros(2, 4, 9))


def test_to_pixels_read_only_input_does_not_warn():
    """np.asarray(PIL image) is read-only; torch warns (once per process) on such arrays.

    Run in a fresh interpreter with warnings as errors, since the warning fires only once.
    """
    script = (
        "import numpy as np\n"
        "from PIL import Image\n"
        "from magiclens_core.images.pixels import to_pixels\n"
        "array = np.zeros((2, 3, 3), dtype=np.uint8)\n"
        "array.setflags(write=False)\n"
        "assert to_pixels(array).shape == (3, 2, 3)\n"
        "assert to_pixels(Image.new('RGB', (3, 2))).shape == (3, 2, 3)\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-W", "error", "-c", script], check=False, cwd=root,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 4), dtype=np.uint8),             # no channel axis
        np.zeros((4, 4, 4), dtype=np.uint8),          # RGBA array
        np.zeros((3, 4, 4), dtype=np.uint8),          # CHW array
        np.zeros((4, 4, 3), dtype=np.float32),        # float array
        np.zeros((4, 4, 3), dtype=np.uint16),         # 16-bit array
        np.zeros((1, 4, 4, 3), dtype=np.uint8),       # batched array
        torch.zeros(4, 4, 3),                         # HWC tensor
        torch.zeros(1, 3, 4, 4),                      # batched tensor
        torch.zeros(4, 4),                            # 2-D tensor
        torch.zeros(3, 4, 4, dtype=torch.uint8),      # integer tensor: not in [0,1] scale
    ],
    ids=["2d", "rgba", "chw-array", "float-array", "uint16-array", "batched-array",
         "hwc-tensor", "batched-tensor", "2d-tensor", "uint8-tensor"],
)
def test_to_pixels_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        to_pixels(bad)


# --------------------------------------------------------------------------- light imports


def test_decoding_filters_and_image_sources_import_no_torch():
    """The HTTP ingress and CPU decode tasks import these: torch and open_clip would cost them seconds and
    hundreds of MB. A fresh interpreter, since this test process has imported torch already."""
    script = (
        "import sys\n"
        "from magiclens_core import ImageDecodeError, load_image\n"
        "import magiclens_core.search.filters\n"
        "import magiclens_core.images.sources\n"
        "import magiclens_core.model.precision\n"
        "heavy = sorted({'torch', 'open_clip'} & set(sys.modules))\n"
        "assert not heavy, f'imported {heavy}'\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], check=False, cwd=root, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
