"""The CLIP BPE tokenizer with the official MagicLens contract: `[SOT] + bpe + [EOT]`, zero-padded."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from open_clip.tokenizer import SimpleTokenizer


@lru_cache(maxsize=1)
def _bpe() -> SimpleTokenizer:
    return SimpleTokenizer()


class Tokenizer:
    """Texts → LongTensor [B, context_length], ids identical to the official tokenizer.

    A text longer than the context raises `ValueError` naming it, as the official tokenizer does,
    unless `truncate=True` (then the last position holds the end-of-text token, as in open_clip).
    """

    def __init__(self, context_length: int = 77) -> None:
        self.context_length = context_length
        self.sot_id = _bpe().sot_token_id
        self.eot_id = _bpe().eot_token_id

    def token_count(self, text: str) -> int:
        """Tokens the text takes, start and end tokens included."""
        return len(_bpe().encode(text)) + 2

    def __call__(self, texts: Sequence[str] | str, truncate: bool = False) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"instruction must be a str, got {type(text).__name__}")
            tokens = [self.sot_id, *_bpe().encode(text), self.eot_id]
            if len(tokens) > self.context_length:
                if not truncate:
                    raise ValueError(
                        f"text has {len(tokens)} tokens, over the limit of {self.context_length}: {text!r}")
                tokens = tokens[: self.context_length - 1] + [self.eot_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids
