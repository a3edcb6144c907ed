"""Web pages from the files a crawl leaves: WARC (`.warc`, `.warc.gz`), WAT (Common Crawl's page metadata
JSON), HTML files and JSONL pages. Every reader yields `Page`s and `Reject`s and never raises on bad input.

WARC and WAT records are read with FastWARC (measured faster than warcio on the same files: see
`tests/perf/mine_readers.py`), HTML with selectolax (Lexbor). Image responses stored in a WARC are attached
to the candidates of that archive's pages that name them, so they are used without being fetched.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal
from urllib.parse import quote, urljoin

from fastwarc.warc import ArchiveIterator, WarcRecordType

from magiclens_core.images.sources import filesystem_of
from magiclens_core.mining.html import clean_text, parse_html, resolve
from magiclens_core.mining.records import ImageCandidate, Page, Reject

PageFormat = Literal["warc", "wat", "html", "jsonl"]
PAGE_EXTENSIONS = (".warc", ".warc.gz", ".wat", ".wat.gz", ".html", ".htm", ".xhtml", ".jsonl", ".jsonl.gz")
MAX_HTML_BYTES = 8 * 1024 * 1024  # larger documents are cut (their images come first in the markup anyway)
MAX_STORED_IMAGE_BYTES = 16 * 1024 * 1024  # larger image records of a WARC are left to the fetcher
HTML_TYPES = ("text/html", "application/xhtml+xml")

Record = Page | Reject


def page_format(path: str) -> PageFormat | None:
    """The reader for a file, by its name."""
    name = path.lower()
    if name.endswith((".wat", ".wat.gz")):
        return "wat"
    if name.endswith((".warc", ".warc.gz")):
        return "warc"
    if name.endswith((".html", ".htm", ".xhtml")):
        return "html"
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    return None


def file_uri(path: str) -> str:
    """A local path or URI as the URI its relative links resolve against."""
    return path if "://" in path else Path(path).resolve().as_uri()


def _open(path: str) -> BinaryIO:
    filesystem, inner = filesystem_of(path)
    return filesystem.open_input_file(inner)


def target_uri(raw: str | None) -> str:
    """A WARC-Target-URI as a usable URL: wget's `<...>` wrapping removed, spaces escaped."""
    uri = (raw or "").strip()
    if uri.startswith("<") and uri.endswith(">"):
        uri = uri[1:-1]
    return quote(uri, safe=":/?#[]@!$&'()*+,;=%~")


def _mime(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def read_warc(path: str) -> Iterator[Record]:
    """The HTML pages of a WARC (response records with status 200, and resource records), with the images
    the same archive stores attached; a damaged archive yields the pages read before the damage and a
    reject saying where it broke."""
    pages: list[Page] = []
    stored: dict[str, bytes] = {}
    failure: Reject | None = None
    types = WarcRecordType.response | WarcRecordType.resource
    try:
        with _open(path) as stream:
            for record in ArchiveIterator(stream, record_types=types, parse_http=True, auto_decode="all"):
                url = target_uri(record.headers.get("WARC-Target-URI"))
                if record.record_type == WarcRecordType.response:
                    if record.http_headers is None or record.http_headers.status_code != 200:
                        continue
                    mime = _mime(record.http_content_type)
                else:
                    mime = _mime(record.headers.get("Content-Type"))
                if mime in HTML_TYPES:
                    title, images, _ = parse_html(record.reader.read(MAX_HTML_BYTES), url)
                    pages.append(Page(url=url, title=title, source=path, ordinal=len(pages), images=images))
                elif mime.startswith("image/") and record.content_length <= MAX_STORED_IMAGE_BYTES:
                    stored[url] = record.reader.read(MAX_STORED_IMAGE_BYTES)
    except (OSError, ValueError, EOFError) as err:
        failure = Reject("read", "damaged_archive", f"{type(err).__name__}: {err} (after {len(pages)} pages)",
                         source=path)
    for page in pages:
        for image in page.images:
            image.data = stored.get(image.url)
        yield page
    if failure is not None:
        yield failure


def _wat_page(data: dict[str, Any], path: str, ordinal: int) -> Page | None:
    envelope = data.get("Envelope") or {}
    url = target_uri((envelope.get("WARC-Header-Metadata") or {}).get("WARC-Target-URI"))
    html_meta = ((envelope.get("Payload-Metadata") or {}).get("HTTP-Response-Metadata") or {}).get("HTML-Metadata")
    if not url or not isinstance(html_meta, dict):
        return None
    head = html_meta.get("Head") or {}
    base = urljoin(url, head.get("Base") or "") if isinstance(head.get("Base"), str) else url
    images: list[ImageCandidate] = []
    seen: set[str] = set()
    for link in html_meta.get("Links") or []:
        if not isinstance(link, dict) or not str(link.get("path", "")).startswith("IMG@"):
            continue
        absolute = resolve(str(link.get("url") or ""), base)
        if absolute is None or absolute in seen:
            continue
        seen.add(absolute)
        images.append(ImageCandidate(url=absolute, alt=clean_text(link.get("alt")),
                                     title=clean_text(link.get("title")), position=len(images)))
    return Page(url=url, title=clean_text(head.get("Title")), source=path, ordinal=ordinal, images=images)


def read_wat(path: str) -> Iterator[Record]:
    """The pages described by a WAT file's metadata records (`<img>` links with their alt and title)."""
    ordinal = 0
    try:
        with _open(path) as stream:
            for record in ArchiveIterator(stream, record_types=WarcRecordType.metadata, parse_http=False):
                try:
                    data = json.loads(record.reader.read())
                except (ValueError, UnicodeDecodeError) as err:
                    yield Reject("read", "bad_metadata_json", str(err)[:200], source=path,
                                 page_url=target_uri(record.headers.get("WARC-Target-URI")))
                    continue
                page = _wat_page(data, path, ordinal) if isinstance(data, dict) else None
                if page is not None:
                    ordinal += 1
                    yield page
    except (OSError, ValueError, EOFError) as err:
        yield Reject("read", "damaged_archive", f"{type(err).__name__}: {err} (after {ordinal} pages)", source=path)


def read_html_file(path: str) -> Iterator[Record]:
    """One HTML file as a page whose URL is the file's own URI (its relative links resolve next to it)."""
    try:
        with _open(path) as stream:
            data = stream.read(MAX_HTML_BYTES)
    except OSError as err:
        yield Reject("read", "unreadable", str(err), source=path)
        return
    url = file_uri(path)
    title, images, _ = parse_html(data, url)
    yield Page(url=url, title=title, source=path, ordinal=0, images=images)


def _jsonl_page(data: dict[str, Any], path: str, ordinal: int) -> Page:
    url = str(data.get("url") or f"{file_uri(path)}#{ordinal}")
    if isinstance(data.get("html"), str):
        title, images, _ = parse_html(data["html"], url)
        title = clean_text(data.get("title")) or title
        return Page(url=url, title=title, source=path, ordinal=ordinal, images=images)
    images, seen = [], set()
    for item in data.get("images") or []:
        item = {"src": item} if isinstance(item, str) else item
        absolute = resolve(str(item.get("src") or item.get("url") or ""), url) if isinstance(item, dict) else None
        if absolute is None or absolute in seen:
            continue
        seen.add(absolute)
        images.append(ImageCandidate(url=absolute, alt=clean_text(item.get("alt")),
                                     title=clean_text(item.get("title")), caption=clean_text(item.get("caption")),
                                     position=len(images)))
    return Page(url=url, title=clean_text(data.get("title")), source=path, ordinal=ordinal, images=images)


def read_jsonl(path: str) -> Iterator[Record]:
    """One page per line: `url`, `title`, and `html` or `images: [{src, alt, title, caption}]`."""
    try:
        with _open(path) as raw:
            stream = gzip.GzipFile(fileobj=raw) if path.lower().endswith(".gz") else raw
            for ordinal, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8", errors="replace")):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                    if not isinstance(data, dict):
                        raise ValueError(f"a page is a JSON object, not {type(data).__name__}")
                    yield _jsonl_page(data, path, ordinal)
                except (ValueError, TypeError, AttributeError) as err:
                    yield Reject("read", "bad_page_json", f"line {ordinal + 1}: {err}"[:300], source=path)
    except (OSError, EOFError) as err:
        yield Reject("read", "unreadable", f"{type(err).__name__}: {err}", source=path)


READERS = {"warc": read_warc, "wat": read_wat, "html": read_html_file, "jsonl": read_jsonl}


def read_pages(path: str, kind: PageFormat | None = None) -> Iterator[Record]:
    """The pages and rejects of one file, with the reader its name calls for (or `kind`)."""
    kind = kind or page_format(path)
    if kind is None:
        yield Reject("read", "unknown_format", "not a WARC, WAT, HTML or JSONL file name", source=path)
        return
    yield from READERS[kind](path)
