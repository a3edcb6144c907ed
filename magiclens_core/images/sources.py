"""Image cells of a dataset as decoded images: encoded bytes, a local path, or a URI pyarrow can open, and
the `UriPolicy` that limits which of those a reader stored in data (a table's `uri` column) may open.

A URI is data: one naming `s3://bucket/key?endpoint_override=host:port` would make pyarrow connect to that
host, one naming `file:///etc/passwd` would read that file. Readers of stored URIs therefore take a
`UriPolicy` built from the places the operator configured, and open only what it allows.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

import pyarrow.fs as pafs
from PIL import Image

from magiclens_core.images.decode import ImageDecodeError, load_image

# the object stores and cluster filesystems pyarrow opens by URI; `file://` is read as a local path
REMOTE_SCHEMES = frozenset({"s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"})


class UriNotAllowed(ValueError):
    """A URI outside the places a `UriPolicy` allows, or one carrying options of its own."""


def filesystem_of(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path of a local path or a URI (`s3://`, `gs://`, `file://`, ...)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def _split_remote(uri: str) -> tuple[str, str, str]:
    """(scheme, bucket or host, path without `/` at either end) of a URI with no options, credentials or
    `.`/`..` segments in it; `UriNotAllowed` otherwise. The path is percent-decoded, as pyarrow reads it."""
    if "?" in uri or "#" in uri:
        raise UriNotAllowed(f"{uri}: a URI with a query string or fragment (endpoint, credential or scheme "
                            "overrides) is not read")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in REMOTE_SCHEMES:
        raise UriNotAllowed(f"{uri}: scheme {scheme or '(none)'!r} is not read")
    if "@" in parts.netloc or not parts.netloc:
        raise UriNotAllowed(f"{uri}: a URI needs a bucket or host and no credentials")
    path = unquote(parts.path).strip("/")
    if any(segment in (".", "..") for segment in path.split("/")):
        raise UriNotAllowed(f"{uri}: `.` and `..` segments are not read")
    return scheme, parts.netloc, path


def _local_path(value: str) -> str:
    """The real absolute path (links resolved) of a plain path or a `file://` URI."""
    if value.lower().startswith("file://"):
        parts = urlsplit(value)
        if parts.netloc or parts.query or parts.fragment or "?" in value or "#" in value:
            raise UriNotAllowed(f"{value}: a file:// URI names a local path, with no host, query or fragment")
        value = unquote(parts.path)
    return os.path.realpath(os.path.abspath(value))


def _is_local(value: str) -> bool:
    return "://" not in value or value.lower().startswith("file://")


def _folders_of(path: str) -> list[str]:
    """A real absolute path and every folder above it, up to `/`."""
    folders = [path]
    while folders[-1] != os.path.dirname(folders[-1]):
        folders.append(os.path.dirname(folders[-1]))
    return folders


def _key_under(key: str, prefix: str) -> bool:
    return not prefix or key == prefix or key.startswith(prefix + "/")


@dataclass(frozen=True)
class UriPolicy:
    """The places a reader of stored URIs may open: local folders (plain paths or `file://` URIs; symbolic
    links resolved before the check, so a link out of an allowed folder is refused) and remote prefixes
    (`s3://bucket` for a whole bucket, `s3://bucket/photos` for the keys under `photos/`). A URI with a
    query string, a fragment, credentials, a scheme no prefix names or `.`/`..` segments is refused. The
    empty policy allows nothing."""

    local_roots: frozenset[str] = frozenset()
    remote_prefixes: frozenset[tuple[str, str, str]] = frozenset()  # (scheme, bucket or host, key prefix)

    @classmethod
    def allowing(cls, prefixes: Iterable[str]) -> UriPolicy:
        """The policy allowing these folders and URI prefixes; `UriNotAllowed` for a prefix that is not one
        (a query string, credentials, an unknown scheme)."""
        local, remote = [], []
        for prefix in prefixes:
            if _is_local(prefix):
                local.append(_local_path(prefix))
            else:
                remote.append(_split_remote(prefix))
        return cls(frozenset(local), frozenset(remote))

    def __bool__(self) -> bool:
        return bool(self.local_roots or self.remote_prefixes)

    def prefixes(self) -> list[str]:
        """The allowed places, as they are checked (for summaries and logs)."""
        return sorted([*self.local_roots, *(f"{scheme}://{'/'.join(filter(None, (bucket, path)))}"
                                            for scheme, bucket, path in self.remote_prefixes)])

    def check(self, uri: str) -> str:
        """The local path or URI to open for `uri` (links resolved, options refused), or `UriNotAllowed`."""
        if _is_local(uri):
            path = _local_path(uri)
            if not self.local_roots.isdisjoint(_folders_of(path)):
                return path
        else:
            scheme, bucket, key = _split_remote(uri)
            if any(scheme == allowed_scheme and bucket == allowed_bucket and _key_under(key, prefix)
                   for allowed_scheme, allowed_bucket, prefix in self.remote_prefixes):
                return f"{scheme}://{bucket}/{quote(key)}"
        raise UriNotAllowed(f"{uri}: outside the places this reader is allowed to open")

    def read(self, uri: str) -> bytes:
        """The bytes behind `uri` if the policy allows it: `UriNotAllowed` when it does not, `OSError`
        when it cannot be read (only regular files are opened locally, never a FIFO or a device)."""
        target = self.check(uri)
        if "://" in target:
            return read_uri(target)
        if not stat.S_ISREG(os.stat(target).st_mode):
            raise OSError(f"{uri}: not a regular file")
        with open(target, "rb") as file:
            return file.read()


def read_uri(uri: str) -> bytes:
    """The bytes behind a local path or a URI, opened as given (for places the operator names: a list file,
    a training set); `OSError` (or `ValueError` for an unknown scheme) when they cannot be read. Stored
    URIs go through `UriPolicy.read`."""
    filesystem, path = filesystem_of(uri)
    with filesystem.open_input_stream(path) as stream:
        return stream.readall()


def image_bytes_or_path(value: bytes | str, policy: UriPolicy | None = None) -> bytes | str:
    """One image cell ready for `load_image`: bytes as they are; a URI with a scheme read into bytes; a
    plain path returned as is. With a `policy`, every path and URI is read through it (reason
    `uri_not_allowed` when it refuses). An unreadable one is an `ImageDecodeError` with reason `unreadable`."""
    if isinstance(value, (bytes, bytearray, memoryview)) or (policy is None and "://" not in value):
        return value
    try:
        return read_uri(value) if policy is None else policy.read(value)
    except UriNotAllowed as err:
        raise ImageDecodeError("uri_not_allowed", str(err), value) from err
    except (OSError, ValueError) as err:
        raise ImageDecodeError("unreadable", str(err), value) from err


def load_image_source(value: bytes | str | None, policy: UriPolicy | None = None, **limits) -> Image.Image:
    """Decode one image cell (bytes, path or URI, read under `policy` when one is given) into RGB, or raise
    `ImageDecodeError` with a reason."""
    if value is None:
        raise ImageDecodeError("empty", "missing value")
    return load_image(image_bytes_or_path(value, policy), **limits)
