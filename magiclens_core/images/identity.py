"""The one content id of an image: table rows, validation pools and mined triplets all name images by it."""

from __future__ import annotations

import hashlib


def content_id(data: bytes) -> str:
    """The stable id of an image: a 128-bit BLAKE2b hash of its bytes, as 32 hex characters."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()
