"""Scoring every image pair of a page and selecting the few worth an instruction.

A pair is kept when both its image-image similarity (CLIP image embeddings) and its text-text similarity
(sentence embeddings of the images' metadata) fall inside a window: above a lower bound (the two images
are related) and below an upper bound (same-page pairs are often near duplicates, which teach nothing).
The kept pairs are ranked by the mean of both similarities and at most `max_pairs` are taken per page.
Which image of a pair is the query is a stable coin toss on the two images' content ids: pages are often
ordered (by colour, size, date), and any rule tied to page order or description length makes most
instructions point one way (towards the later colour, the larger size), which a model then learns.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairRules:
    image_low: float = 0.5
    image_high: float = 0.95
    text_low: float = 0.2
    text_high: float = 0.95
    max_pairs: int = 3


@dataclass(frozen=True)
class ScoredPair:
    query: int  # indexes into the page's kept images
    target: int
    image_similarity: float
    text_similarity: float

    @property
    def score(self) -> float:
        return (self.image_similarity + self.text_similarity) / 2


@dataclass(frozen=True)
class DroppedPair:
    first: int
    second: int
    reason: str
    detail: str


def _window_reason(name: str, value: float, low: float, high: float) -> tuple[str, str] | None:
    if value < low:
        return "unrelated", f"{name} similarity {value:.3f} under {low:g}"
    if value > high:
        return "near_duplicate", f"{name} similarity {value:.3f} over {high:g}"
    return None


def query_first(first: int, second: int, ids: list[str]) -> tuple[int, int]:
    """(query, target) of a pair: a coin toss seeded by the two images' ids, the same whichever order
    they come in (so a rerun, or the same two images on another page, picks the same query)."""
    low, high = sorted((ids[first], ids[second]))
    toss = zlib.crc32(f"{low}|{high}".encode()) & 1
    return (first, second) if (ids[first] == low) == (toss == 0) else (second, first)


def select_pairs(image_vectors: np.ndarray, text_vectors: np.ndarray, ids: list[str],
                 rules: PairRules) -> tuple[list[ScoredPair], list[DroppedPair]]:
    """The chosen pairs of one page (best first) and every pair left out, with its reason; `ids` are the
    images' stable ids (content hashes), which pick each pair's query."""
    image_similarity = image_vectors @ image_vectors.T
    text_similarity = text_vectors @ text_vectors.T
    candidates, dropped = [], []
    count = len(ids)
    for first in range(count):
        for second in range(first + 1, count):
            sim_image, sim_text = float(image_similarity[first, second]), float(text_similarity[first, second])
            reason = (_window_reason("image", sim_image, rules.image_low, rules.image_high)
                      or _window_reason("text", sim_text, rules.text_low, rules.text_high))
            if reason:
                dropped.append(DroppedPair(first, second, *reason))
                continue
            query, target = query_first(first, second, ids)
            candidates.append(ScoredPair(query, target, sim_image, sim_text))
    candidates.sort(key=lambda pair: (-pair.score, pair.query, pair.target))
    for pair in candidates[rules.max_pairs:]:
        dropped.append(DroppedPair(pair.query, pair.target, "page_cap",
                                   f"score {pair.score:.3f}; at most {rules.max_pairs} pairs per page"))
    return candidates[: rules.max_pairs], dropped
