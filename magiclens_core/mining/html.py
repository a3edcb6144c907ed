"""One HTML document → its title and image candidates (selectolax's Lexbor parser: fast, and tolerant of the
broken markup that is normal on the web)."""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit

from selectolax.lexbor import LexborHTMLParser, LexborNode

from magiclens_core.mining.records import ImageCandidate

SOURCE_ATTRIBUTES = ("src", "data-src", "data-original", "data-lazy-src")
FETCHABLE_SCHEMES = ("http", "https", "file")
MAX_TEXT = 300  # characters kept of alt, title, caption and nearby text
_SPACES = re.compile(r"\s+")


def clean_text(text: str | None, limit: int = MAX_TEXT) -> str:
    """Whitespace collapsed, cut to `limit` characters."""
    return _SPACES.sub(" ", text or "").strip()[:limit]


def _int(value: str | None) -> int | None:
    digits = re.match(r"\s*(\d+)", value or "")
    return int(digits.group(1)) if digits else None


def largest_srcset(srcset: str) -> str | None:
    """The URL of the widest (or highest density) candidate of a `srcset`."""
    best, best_size = None, -1.0
    for part in srcset.split(","):
        pieces = part.strip().split()
        if not pieces:
            continue
        size = 1.0
        if len(pieces) > 1 and pieces[1][:-1].replace(".", "", 1).isdigit():
            size = float(pieces[1][:-1]) * (1.0 if pieces[1].endswith("w") else 1000.0)
        if size > best_size:
            best, best_size = pieces[0], size
    return best


def _source(node: LexborNode) -> str | None:
    attributes = node.attributes
    srcset = attributes.get("srcset") or attributes.get("data-srcset")
    if srcset and (chosen := largest_srcset(srcset)):
        return chosen
    for name in SOURCE_ATTRIBUTES:
        value = attributes.get(name)
        if value and not value.strip().startswith("data:"):
            return value
    return None


def _caption(node: LexborNode) -> str:
    """The enclosing figure's caption, else the text of the nearest ancestor that has some."""
    parent = node.parent
    for _ in range(4):
        if parent is None:
            return ""
        if parent.tag == "figure":
            caption = parent.css_first("figcaption")
            if caption is not None:
                return clean_text(caption.text(separator=" "))
        text = clean_text(parent.text(separator=" "))
        if text:
            return text
        parent = parent.parent
    return ""


def resolve(url: str, base: str) -> str | None:
    """`url` made absolute against `base`; None unless it can be fetched (http, https, file)."""
    if not url.strip():
        return None
    try:
        absolute = urljoin(base, url.strip())
        scheme = urlsplit(absolute).scheme
    except ValueError:
        return None
    return absolute if scheme in FETCHABLE_SCHEMES else None


def parse_html(html: str | bytes, page_url: str) -> tuple[str, list[ImageCandidate], int]:
    """The page's title, its image candidates (URLs resolved against `<base>` and the page URL; a URL seen
    twice kept once) and how many `<img>` had no usable URL."""
    tree = LexborHTMLParser(html if isinstance(html, str) else html.decode("utf-8", "replace"))
    title_node = tree.css_first("title")
    title = clean_text(title_node.text() if title_node else "")
    if not title and (meta := tree.css_first('meta[property="og:title"]')) is not None:
        title = clean_text(meta.attributes.get("content"))
    base = page_url
    if (base_node := tree.css_first("base[href]")) is not None:
        base = urljoin(page_url, (base_node.attributes.get("href") or "").strip())
    images: list[ImageCandidate] = []
    seen: set[str] = set()
    unusable = 0
    for node in tree.css("img"):
        raw = _source(node)
        url = resolve(raw, base) if raw else None
        if url is None:
            unusable += 1
            continue
        if url in seen:
            continue
        seen.add(url)
        attributes = node.attributes
        images.append(ImageCandidate(
            url=url, alt=clean_text(attributes.get("alt")), title=clean_text(attributes.get("title")),
            caption=_caption(node), position=len(images),
            width=_int(attributes.get("width")), height=_int(attributes.get("height"))))
    return title, images, unusable
