"""Image sources as Ray Datasets: a folder (recursive), a glob, a text file of paths/URIs, or a Parquet/Lance
dataset with an `image` bytes column or a `uri` column. Local paths and pyarrow-filesystem URIs (s3://,
gs://, ...) alike.

Every source becomes rows with a `uri` (string), maybe `image` (bytes) and `id`, plus the source's other
columns (carried as metadata). A folder is listed without following symbolic links: a link to a file inside
the folder is listed, every other link is passed over and counted with its reason (`link_outside_root`,
`broken_link`, `link_loop`: a link to a folder holding it, `link_to_listed_folder`: one to another folder
inside, which is listed under its own path), as are `hidden_file`, `not_an_image_name`,
`not_a_regular_file` and `unreadable_folder`.
"""

from __future__ import annotations

import fnmatch
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import ray

from magiclens_core.images.sources import filesystem_of, read_uri

SourceFormat = Literal["auto", "files", "list", "parquet", "lance"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".jfif", ".pjpeg", ".pjp",
                    ".ppm", ".pgm", ".pbm", ".ico", ".heic", ".avif")
LIST_EXTENSIONS = (".txt", ".lst", ".list")
PATHS_PER_BLOCK = 512  # listed paths per Ray block: enough blocks to spread the read stage over the cluster
GLOB_CHARACTERS = "*?["


@dataclass
class Listing:
    """A source as a Dataset, the places it names (where its rows' URIs may be read from unless the
    operator allows more) and what the listing passed over, by reason."""

    dataset: ray.data.Dataset
    roots: list[str]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def skipped_files(self) -> int:
        """How many entries the listing passed over, all reasons together."""
        return sum(self.skipped.values())


def _full_uri(original: str, path: str) -> str:
    """A listed path as a URI in the same scheme the user gave."""
    if "://" not in original:
        return path
    return original.split("://", 1)[0] + "://" + path


def _is_remote(source: str) -> bool:
    return "://" in source and not source.lower().startswith("file://")


def is_lance_dataset(source: str) -> bool:
    """Whether `source` is a Lance dataset: a path ending in `.lance`, or a folder holding Lance's
    `_versions` folder (local or any URI pyarrow opens)."""
    if source.rstrip("/").endswith(".lance"):
        return True
    if any(char in source for char in GLOB_CHARACTERS):
        return False
    filesystem, path = filesystem_of(source)
    return filesystem.get_file_info(path.rstrip("/") + "/_versions").type == pafs.FileType.Directory


def _detect(source: str) -> SourceFormat:
    stripped = source.rstrip("/")
    if stripped.endswith(".parquet"):
        return "parquet"
    if stripped.lower().endswith(LIST_EXTENSIONS):
        return "list"
    if is_lance_dataset(source):
        return "lance"
    if not any(char in source for char in GLOB_CHARACTERS):
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


def _glob_base(source: str) -> tuple[str, str | None]:
    """The folder a folder or glob source is listed from, and the glob (None for a folder)."""
    if not any(char in source for char in GLOB_CHARACTERS):
        return source, None
    cut = min(source.index(char) for char in GLOB_CHARACTERS if char in source)
    return source[:cut].rsplit("/", 1)[0] or "/", source


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _link_outcome(path: str, real_root: str) -> str | None:
    """None for a link to a regular file inside the root (listed), else why the link is passed over."""
    target = os.path.realpath(path)
    if not os.path.exists(target):
        return "broken_link"
    if not _under(target, real_root):
        return "link_outside_root"
    if os.path.isdir(target):
        return "link_loop" if _under(os.path.realpath(os.path.dirname(path)), target) else "link_to_listed_folder"
    return None if os.path.isfile(target) else "not_a_regular_file"


def _walk_local(root: str) -> Iterator[tuple[str, str | None]]:
    """Every entry under a local folder, as (path, None) for a file to consider or (path, reason) for one
    passed over. Links are never followed and each folder is listed once, so the walk always ends."""
    real_root = os.path.realpath(root)
    pending, listed = [root], set()
    while pending:
        folder = pending.pop()
        try:
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in listed:  # the same folder mounted twice
                yield folder, "link_loop"
                continue
            listed.add((info.st_dev, info.st_ino))
            entries = list(os.scandir(folder))
        except OSError:
            yield folder, "unreadable_folder"
            continue
        for entry in entries:
            if entry.is_symlink():
                yield entry.path, _link_outcome(entry.path, real_root)
            elif entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
            else:
                yield entry.path, None if entry.is_file(follow_symlinks=False) else "not_a_regular_file"


def _walk_remote(filesystem: pafs.FileSystem, root: str) -> Iterator[tuple[str, str | None]]:
    for entry in filesystem.get_file_info(pafs.FileSelector(root, recursive=True)):
        if entry.type == pafs.FileType.File:
            yield entry.path, None


def list_files(source: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> tuple[list[str], dict[str, int]]:
    """Sorted URIs of the image files under a folder (recursive) or matching a glob, and how many entries
    were passed over, by reason (see the module docstring)."""
    base, pattern = _glob_base(source)
    filesystem, root = filesystem_of(base)
    local = isinstance(filesystem, pafs.LocalFileSystem)
    found, skipped = [], Counter()
    for path, reason in _walk_local(root) if local else _walk_remote(filesystem, root):
        uri = _full_uri(source, path)
        if pattern is not None and not fnmatch.fnmatch(uri if "://" in source else path,
                                                        pattern if "://" in source else os.path.abspath(pattern)):
            continue
        name = path.rsplit("/", 1)[-1]
        if reason is None and name.startswith("."):
            reason = "hidden_file"
        elif reason is None and not name.lower().endswith(extensions):
            reason = "not_an_image_name"
        if reason is None:
            found.append(uri)
        else:
            skipped[reason] += 1
    return sorted(found), dict(skipped)


def source_roots(source: str, kind: SourceFormat) -> list[str]:
    """The places a source names: the folder of a folder or glob source, the folder holding a list or a
    Parquet/Lance source, and for any source in object storage its bucket. Its rows' URIs are read from
    there (the indexing job adds the places its operator allows)."""
    if _is_remote(source):
        parts = urlsplit(source)
        return [f"{parts.scheme}://{parts.netloc}"]
    if source.lower().startswith("file://"):
        source = urlsplit(source).path
    if kind == "files":
        return [os.path.abspath(_glob_base(source)[0])]
    return [os.path.dirname(os.path.abspath(source.rstrip("/") or "/"))]


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


def source_dataset(source: str, source_format: SourceFormat = "auto",
                   extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> Listing:
    """The images of `source` as a lazily read Dataset (see the module docstring)."""
    kind = _detect(source) if source_format == "auto" else source_format
    roots = source_roots(source, kind)
    if kind == "files":
        uris, skipped = list_files(source, extensions)
        return Listing(uris_dataset(uris), roots, skipped)
    if kind == "list":
        return Listing(uris_dataset(read_list(source)), roots)
    dataset = ray.data.read_lance(source) if kind == "lance" else ray.data.read_parquet(source)
    names = dataset.schema().names
    if "image" not in names and "uri" not in names:
        raise ValueError(f"{source}: a {kind} source needs an `image` bytes column or a `uri` column; "
                         f"it has {names}")
    return Listing(dataset, roots)
