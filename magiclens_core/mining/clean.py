"""Cleaning rules for page images: icons, logos, ads and tracking pixels by URL, alt text and declared size
(before fetching), then minimum side and aspect ratio (after decoding), and a perceptual hash for near
duplicates within a page."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from magiclens_core.mining.records import ImageCandidate

_DECORATION = r"logo|icon|favicon|sprite|avatar|badge|button|banner|ads?|advert\w*|sponsor\w*|pixel|track\w*|beacon|" \
              r"spacer|blank|transparent|1x1|placeholder|loading|spinner|emoji"
DECORATION_URL = re.compile(rf"(?:^|[/_.\-=?&])(?:{_DECORATION})(?:[/_.\-=?&\d]|$)", re.IGNORECASE)
DECORATION_ALT = re.compile(rf"^\W*(?:{_DECORATION})\W*$|\blogo\b|\badvertisement\b", re.IGNORECASE)
TRACKER_DOMAINS = ("doubleclick.net", "google-analytics.com", "googlesyndication.com", "googleadservices.com",
                   "scorecardresearch.com", "quantserve.com", "adnxs.com")
TRACKER_HOST_PREFIXES = ("pixel.", "analytics.", "ads.", "adservice.", "tracking.", "beacon.")


@dataclass(frozen=True)
class CleanRules:
    """Which images are kept."""

    min_side: int = 128
    max_aspect: float = 3.0  # longer side over shorter side
    near_duplicate_bits: int = 8  # perceptual hashes this close (of 384 bits) are the same picture


def decoration_reason(candidate: ImageCandidate) -> str | None:
    """Why a candidate is page decoration or tracking (no need to fetch it), else None."""
    url = candidate.url.lower()
    if (candidate.width is not None and candidate.width <= 2) or (candidate.height is not None and
                                                                   candidate.height <= 2):
        return "tracking_pixel"
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host.startswith(TRACKER_HOST_PREFIXES) or any(host == d or host.endswith("." + d) for d in TRACKER_DOMAINS):
        return "tracker_or_ad_host"
    path = parts.path + ("?" + parts.query if parts.query else "")
    if DECORATION_URL.search(path) or DECORATION_ALT.search(candidate.alt or ""):
        return "icon_logo_or_ad"
    return None


def shape_reason(width: int, height: int, rules: CleanRules) -> tuple[str, str] | None:
    """(reason, detail) when a decoded image is too small or too elongated to teach anything, else None."""
    if max(width, height) <= 2:
        return "tracking_pixel", f"{width}x{height}"
    if min(width, height) < rules.min_side:
        return "too_small", f"{width}x{height}, under the minimum side of {rules.min_side}"
    if max(width, height) / min(width, height) > rules.max_aspect:
        return "extreme_aspect_ratio", f"{width}x{height}, over {rules.max_aspect:g}:1"
    return None


def perceptual_hash(image: Image.Image) -> int:
    """A 384-bit difference hash: the 9x9 colour thumbnail's left-right and top-bottom steps, per channel
    (colour matters: a grey hash calls a red and a blue circle on the same background the same picture)."""
    rgb = np.asarray(image.convert("RGB").resize((9, 9), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = np.concatenate([(rgb[:-1, 1:] > rgb[:-1, :-1]).ravel(), (rgb[1:, :-1] > rgb[:-1, :-1]).ravel()])
    return int("".join("1" if bit else "0" for bit in bits), 2)


def hamming(a: int, b: int) -> int:
    """Bits that differ between two hashes."""
    return (a ^ b).bit_count()
