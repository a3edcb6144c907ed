"""The CLIP BPE tokenizer with the official MagicLens contract: `[SOT] + bpe + [EOT]`, zero-padded."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from open_clip.tokenizer import SimpleTokenizer


def _open_clip_tokenizer_module() -> ModuleType:
    """open_clip's `tokenizer` module. The package's own `__init__` imports every model family it has
    (transformers, torchvision: seconds per process), so a process that only tokenizes (an ingress replica,
    a decode task) loads the tokenizer's file alone; one that has imported open_clip uses it as it is."""
    if "open_clip" in sys.modules:
        return importlib.import_module("open_clip.tokenizer")
    name = "magiclens_core.model._open_clip_tokenizer"
    if name not in sys.modules:
        package = importlib.util.find_spec("open_clip")  # finds the package without importing it
        if package is None or not package.submodule_search_locations:
            raise ImportError("open_clip_torch is not installed")
        spec = importlib.util.spec_from_file_location(
            name, Path(next(iter(package.submodule_search_locations))) / "tokenizer.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@lru_cache(maxsize=1)
def simple_tokenizer() -> SimpleTokenizer:
    """open_clip's CLIP BPE (`SimpleTokenizer`), one per process."""
    return _open_clip_tokenizer_module().SimpleTokenizer()


class Tokenizer:
    """Texts → LongTensor [B, context_length], ids identical to the official tokenizer.

    A text longer than the context raises `ValueError` naming it, as the official tokenizer does,
    unless `truncate=True` (then the last position holds the end-of-text token, as in open_clip).
    """

    def __init__(self, context_length: int = 77) -> None:
        self.context_length = context_length
        self.sot_id = simple_tokenizer().sot_token_id
        self.eot_id = simple_tokenizer().eot_token_id

    def token_count(self, text: str) -> int:
        """Tokens the text takes, start and end tokens included."""
        return len(simple_tokenizer().encode(text)) + 2

    def __call__(self, texts: Sequence[str] | str, truncate: bool = False) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"instruction must be a str, got {type(text).__name__}")
            tokens = [self.sot_id, *simple_tokenizer().encode(text), self.eot_id]
            if len(tokens) > self.context_length:
                if not truncate:
                    raise ValueError(
                        f"text has {len(tokens)} tokens, over the limit of {self.context_length}: {text!r}")
                tokens = tokens[: self.context_length - 1] + [self.eot_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids
