"""The records that flow through mining: pages, their image candidates, and rejects."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from magiclens_core.images.identity import content_id


@dataclass
class ImageCandidate:
    """One image of a page as the page describes it; `data` holds bytes the source itself stored (a WARC)."""

    url: str
    alt: str = ""
    title: str = ""
    caption: str = ""  # a figure caption, else the text next to the image
    position: int = 0  # order on the page
    width: int | None = None  # the HTML attributes, when given
    height: int | None = None
    data: bytes | None = None


@dataclass
class Page:
    """A web page and its image candidates, in page order."""

    url: str
    title: str
    source: str  # the file or URI the page was read from
    ordinal: int  # the page's place in its source (stable across runs)
    images: list[ImageCandidate] = field(default_factory=list)

    @property
    def page_id(self) -> str:
        """A stable id: the source, the place in it and the URL, hashed."""
        key = f"{self.source}\n{self.ordinal}\n{self.url}".encode()
        return content_id(key)

    def to_row(self) -> dict[str, Any]:
        """The page as one Arrow-ready row (see `PAGE_SCHEMA` in the Ray stages)."""
        return {"page_id": self.page_id, "page_url": self.url, "page_title": self.title, "source": self.source,
                "images": [asdict(image) for image in self.images]}


@dataclass
class Reject:
    """Something dropped, with the stage that dropped it, a short reason and a human detail."""

    stage: str
    reason: str
    detail: str = ""
    source: str = ""
    page_url: str = ""
    image_url: str = ""

    def to_row(self) -> dict[str, str]:
        return asdict(self)
