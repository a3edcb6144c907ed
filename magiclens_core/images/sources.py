"""Image cells of a dataset as decoded images: encoded bytes, a local path, or a URI pyarrow can open."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
from PIL import Image

from magiclens_core.images.decode import ImageDecodeError, load_image


def filesystem_of(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path of a local path or a URI (`s3://`, `gs://`, `file://`, ...)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def read_uri(uri: str) -> bytes:
    """The bytes behind a local path or a URI; `OSError` (or `ValueError` for an unknown scheme) when
    they cannot be read."""
    filesystem, path = filesystem_of(uri)
    with filesystem.open_input_stream(path) as stream:
        return stream.readall()


def read_source(value: bytes | str) -> bytes | str:
    """Bytes as they are; a URI with a scheme read into bytes; a plain path returned as is (`load_image`
    reads it). An unreadable URI is an `ImageDecodeError` with reason `unreadable`."""
    if isinstance(value, (bytes, bytearray, memoryview)) or "://" not in value:
        return value
    try:
        return read_uri(value)
    except (OSError, ValueError) as err:
        raise ImageDecodeError("unreadable", str(err), value) from err


def load_image_source(value: bytes | str | None, **limits) -> Image.Image:
    """Decode one image cell (bytes, path or URI) into RGB, or raise `ImageDecodeError` with a reason."""
    if value is None:
        raise ImageDecodeError("empty", "missing value")
    return load_image(read_source(value), **limits)
