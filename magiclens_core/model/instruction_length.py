"""How many tokens an instruction takes, found at a bounded cost.

The CLIP BPE's cost grows with the square of a word's length, so an instruction that cannot fit the text
tower's context is refused from lower bounds computed in linear time before the BPE runs: every token is a
vocabulary entry, so a word takes at least as many tokens as the fewest vocabulary entries it splits into.
"""

from __future__ import annotations

import math
from functools import lru_cache

from magiclens_core.model.tokenizer import simple_tokenizer

MAX_INSTRUCTION_CHARS = 4096  # longer instructions are refused unread
_WORD_END = "</w>"


class _Vocabulary:
    """The tokenizer and its vocabulary as sets of pieces: inside a word, and ending one."""

    def __init__(self) -> None:
        self.bpe = simple_tokenizer()
        self.inner = {piece for piece in self.bpe.encoder if not piece.endswith(_WORD_END)}
        self.final = {piece[: -len(_WORD_END)] for piece in self.bpe.encoder if piece.endswith(_WORD_END)}
        self.longest = max(len(piece) for piece in self.inner | self.final)

    def words(self, text: str) -> list[str]:
        """The text cleaned and split as the tokenizer does, each word byte-encoded."""
        encoder = self.bpe.byte_encoder
        return ["".join(encoder[byte] for byte in word.encode("utf-8"))
                for word in self.bpe.pat.findall(self.bpe.clean_fn(text))]

    def fewest_tokens(self, word: str) -> int:
        """The fewest vocabulary entries `word` splits into (the BPE's own split is one of them)."""
        cached = self.bpe.cache.get(word)  # the special tokens, and words seen before
        if cached is not None:
            return len(cached.split(" "))
        fewest = list(range(len(word) + 1))  # fewest[i]: entries covering word[:i]; every single byte is one
        for end in range(1, len(word)):
            for start in range(max(0, end - self.longest), end):
                if word[start:end] in self.inner and fewest[start] + 1 < fewest[end]:
                    fewest[end] = fewest[start] + 1
        return min(fewest[start] + 1 for start in range(max(0, len(word) - self.longest), len(word))
                   if word[start:] in self.final)


@lru_cache(maxsize=1)
def _vocabulary() -> _Vocabulary:
    return _Vocabulary()


def instruction_tokens(text: str, limit: int) -> tuple[int, bool]:
    """The tokens `text` takes with the start and end tokens, and True, when that is at most `limit`; else a
    number over `limit` that it takes at least, and whether that number is exact."""
    vocabulary = _vocabulary()
    words = vocabulary.words(text)
    floor = 2 + sum(math.ceil(len(word) / vocabulary.longest) for word in words)
    if floor > limit:
        return floor, False
    floor = 2
    for word in words:
        floor += vocabulary.fewest_tokens(word)
        if floor > limit:
            return floor, False
    count = len(vocabulary.bpe.encode(text)) + 2
    return count, True
