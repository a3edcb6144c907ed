"""Parity with the official outputs on any device: the tiny official fixture embedded in fp32 and bf16.

    python tests/perf/parity_on_device.py [--device cuda]

Prints one JSON object: max absolute error against the official embeddings (goal ≤ 1e-4 in fp32)
and the smallest cosine similarity between bf16-autocast and official embeddings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from magiclens_core import Embedder, load_official_checkpoint

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "official_tiny"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    pixels = torch.from_numpy(np.load(FIXTURE / "image.npy")).permute(0, 3, 1, 2)
    texts = json.loads((FIXTURE / "texts.json").read_text())
    official = np.load(FIXTURE / "multimodal_embed_norm.npy")
    model = load_official_checkpoint(FIXTURE / "params_tiny.pkl")
    report = {"benchmark": "parity_on_device", "device": args.device}
    for precision in ("fp32", "bf16"):
        got = Embedder(model, device=args.device, precision=precision).embed_queries(pixels, texts)
        report[f"{precision}_max_abs_error"] = float(np.abs(got - official).max())
        report[f"{precision}_min_cosine"] = float((got * official).sum(axis=1).min())
    print(json.dumps(report))


if __name__ == "__main__":
    main()
