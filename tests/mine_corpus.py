"""Small crawl files for the mining tests and speed scripts: WARCs and WATs written with warcio, PNG images."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter


def png(width: int = 64, height: int = 64, colour: tuple[int, int, int] = (200, 40, 40), stripe: int = 0) -> bytes:
    """A PNG of one colour; `stripe` > 0 paints a darker band that far from the left (distinct content)."""
    image = Image.new("RGB", (width, height), colour)
    if stripe:
        image.paste((20, 20, 20), (stripe % width, 0, min(width, stripe % width + 6), height))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _response(writer: WARCWriter, url: str, body: bytes, content_type: str, status: str = "200 OK") -> None:
    headers = StatusAndHeaders(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))],
                               protocol="HTTP/1.1")
    writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers))


def write_warc(path: Path, pages: dict[str, str], images: dict[str, bytes] | None = None,
               gzip: bool = True) -> Path:
    """A WARC with one HTML response per page (url → html) and one image response per image (url → bytes)."""
    with open(path, "wb") as stream:
        writer = WARCWriter(stream, gzip=gzip)
        writer.write_record(writer.create_warcinfo_record(path.name, {"software": "test"}))
        for url, html in pages.items():
            _response(writer, url, html.encode(), "text/html; charset=utf-8")
        for url, data in (images or {}).items():
            _response(writer, url, data, "image/png")
    return path


def wat_envelope(url: str, title: str, links: list[dict]) -> dict:
    """Common Crawl's WAT JSON for one HTML response: the target URI, the head's title and the links."""
    return {"Envelope": {
        "WARC-Header-Metadata": {"WARC-Type": "response", "WARC-Target-URI": url},
        "Payload-Metadata": {"HTTP-Response-Metadata": {"HTML-Metadata": {
            "Head": {"Title": title}, "Links": links}}}}}


def write_wat(path: Path, envelopes: list[dict | bytes]) -> Path:
    """A WAT file: one metadata record per envelope (raw bytes are written as they are)."""
    with open(path, "wb") as stream:
        writer = WARCWriter(stream, gzip=True)
        for envelope in envelopes:
            body = envelope if isinstance(envelope, bytes) else json.dumps(envelope).encode()
            url = "http://unknown.example/" if isinstance(envelope, bytes) else \
                envelope["Envelope"]["WARC-Header-Metadata"]["WARC-Target-URI"]
            writer.write_record(writer.create_warc_record(url, "metadata", payload=io.BytesIO(body),
                                                          warc_content_type="application/json"))
    return path
