"""Image sources as Ray Datasets: a folder (recursive), a glob, a text file of paths/URIs, or a Parquet/Lance
dataset with an `image` bytes column or a `uri` column. Local paths and pyarrow-filesystem URIs (s3://,
gs://, ...) alike.

Every source becomes rows with a `uri` (string), maybe `image` (bytes) and `id`, plus the source's other
columns (carried as metadata).
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs
import ray

from magiclens_core.images.sources import filesystem_of, read_uri

SourceFormat = Literal["auto", "files", "list", "parquet", "lance"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".jfif", ".pjpeg", ".pjp",
                    ".ppm", ".pgm", ".pbm", ".ico", ".heic", ".avif")
LIST_EXTENSIONS = (".txt", ".lst", ".list")
PATHS_PER_BLOCK = 512  # listed paths per Ray block: enough blocks to spread the read stage over the cluster


@dataclass
class Listing:
    """A source as a Dataset, with what the listing left out (files not named like images)."""

    dataset: ray.data.Dataset
    skipped_files: int = 0


def _full_uri(original: str, path: str) -> str:
    """A listed path as a URI in the same scheme the user gave."""
    if "://" not in original:
        return path
    return original.split("://", 1)[0] + "://" + path


def _detect(source: str) -> SourceFormat:
    stripped = source.rstrip("/")
    if stripped.endswith(".lance"):
        return "lance"
    if stripped.endswith(".parquet"):
        return "parquet"
    if stripped.lower().endswith(LIST_EXTENSIONS):
        return "list"
    if not any(char in source for char in "*?["):
        filesystem, path = filesystem_of(source)
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"image source not found: {source}")
        if info.type == pafs.FileType.Directory:  # a Parquet dataset: Parquet files at its top, nothing else
            names = [entry.base_name for entry in filesystem.get_file_info(pafs.FileSelector(path))
                     if entry.type == pafs.FileType.File and not entry.base_name.startswith((".", "_"))]
            if names and all(name.endswith(".parquet") for name in names):
                return "parquet"
    return "files"


def list_files(source: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> tuple[list[str], int]:
    """Sorted URIs of the image files under a folder (recursive) or matching a glob, and how many other
    files were passed over (hidden files and names without an image extension)."""
    pattern = None
    base = source
    if any(char in source for char in "*?["):
        base = source[:min(source.index(char) for char in "*?[" if char in source)].rsplit("/", 1)[0] or "/"
        pattern = source
    filesystem, root = filesystem_of(base)
    entries = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    found, skipped = [], 0
    for entry in entries:
        if entry.type != pafs.FileType.File:
            continue
        uri = _full_uri(source, entry.path)
        if pattern is not None and not fnmatch.fnmatch(uri if "://" in source else entry.path,
                                                        pattern if "://" in source else os.path.abspath(pattern)):
            continue
        if entry.base_name.startswith(".") or not entry.base_name.lower().endswith(extensions):
            skipped += 1
            continue
        found.append(uri)
    return sorted(found), skipped


def read_list(source: str) -> list[str]:
    """The paths/URIs of a text file, one a line (blank lines and `#` comments ignored); relative local
    paths are relative to the file's folder."""
    text = read_uri(source).decode("utf-8")
    folder = os.path.dirname(os.path.abspath(source)) if "://" not in source else None
    uris = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if folder is not None and "://" not in line and not os.path.isabs(line):
            line = os.path.join(folder, line)
        uris.append(line)
    return uris


def table_dataset(table: pa.Table) -> ray.data.Dataset:
    """A Dataset of an in-memory table's rows, in blocks of `PATHS_PER_BLOCK` (so reading and decoding
    spread over tasks)."""
    blocks = [table.slice(start, PATHS_PER_BLOCK) for start in range(0, max(table.num_rows, 1), PATHS_PER_BLOCK)]
    return ray.data.from_arrow(blocks)


def uris_dataset(uris: list[str]) -> ray.data.Dataset:
    """A Dataset with one `uri` row per entry, in blocks of `PATHS_PER_BLOCK`."""
    return table_dataset(pa.table({"uri": pa.array(uris, pa.string())}))


def read_source(source: str, source_format: SourceFormat = "auto",
                extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> Listing:
    """The images of `source` as a lazily read Dataset (see the module docstring)."""
    kind = _detect(source) if source_format == "auto" else source_format
    if kind == "files":
        uris, skipped = list_files(source, extensions)
        return Listing(uris_dataset(uris), skipped)
    if kind == "list":
        return Listing(uris_dataset(read_list(source)))
    dataset = ray.data.read_lance(source) if kind == "lance" else ray.data.read_parquet(source)
    names = dataset.schema().names
    if "image" not in names and "uri" not in names:
        raise ValueError(f"{source}: a {kind} source needs an `image` bytes column or a `uri` column; "
                         f"it has {names}")
    return Listing(dataset)
