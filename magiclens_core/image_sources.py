"""Image cells of a dataset as decoded images: encoded bytes, a local path, or a URI pyarrow can open."""

from __future__ import annotations

from PIL import Image

from magiclens_core.images import ImageDecodeError, load_image


def read_source(value: bytes | str) -> bytes | str:
    """Bytes as they are; a URI with a scheme (`s3://`, `gs://`, `file://`) read into bytes with pyarrow's
    filesystems; a plain path returned as is (`load_image` reads it)."""
    if isinstance(value, (bytes, bytearray, memoryview)) or "://" not in value:
        return value
    import pyarrow.fs

    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(value)
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except (OSError, ValueError) as err:
        raise ImageDecodeError("unreadable", str(err), value) from err


def load_image_source(value: bytes | str | None, **limits) -> Image.Image:
    """Decode one image cell (bytes, path or URI) into RGB, or raise `ImageDecodeError` with a reason."""
    if value is None:
        raise ImageDecodeError("empty", "missing value")
    return load_image(read_source(value), **limits)
