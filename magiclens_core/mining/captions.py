"""Image captions from a `transformers` image-to-text model (a vision encoder-decoder, BLIP, GIT, ...), by
local path or by a name already in the local Hugging Face cache: nothing is downloaded.

The model is loaded with `AutoModelForImageTextToText`, its image processor and tokenizer from the same
folder, and captions greedily in batches. `resolve_captioner` says, before anything is loaded, whether a
name can be used at all.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

NO_CAPTIONER = "none"


def resolve_captioner(name_or_path: str) -> str:
    """The captioner's local folder or cached name; `ValueError` when it is neither an existing folder
    with a `config.json` nor a name in the local Hugging Face cache."""
    if Path(name_or_path).is_dir():
        if not (Path(name_or_path) / "config.json").is_file():
            raise ValueError(f"captioner {name_or_path!r}: the folder has no config.json (not a transformers model)")
        return name_or_path
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(name_or_path, "config.json")
    except HFValidationError:
        cached = None
    if not isinstance(cached, str):
        raise ValueError(f"captioner {name_or_path!r}: no such folder, and not a model in the local Hugging Face "
                         f"cache (nothing is downloaded); give a local model folder or '{NO_CAPTIONER}'")
    return name_or_path


class Captioner:
    """PIL images → one caption each (stripped; empty when the model says nothing)."""

    def __init__(self, name_or_path: str, device: str = "cpu", batch_size: int = 16,
                 max_new_tokens: int = 30) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        source = resolve_captioner(name_or_path)
        self.name = name_or_path
        self.processor = AutoImageProcessor.from_pretrained(source, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        self.model = AutoModelForImageTextToText.from_pretrained(source, local_files_only=True).to(device).eval()
        self.device, self.batch_size, self.max_new_tokens = device, batch_size, max_new_tokens

    @torch.inference_mode()
    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image, in order (greedy, `batch_size` images per model call)."""
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=images[start:start + self.batch_size], return_tensors="pt")
            output = self.model.generate(pixel_values=pixels["pixel_values"].to(self.device),
                                         max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
            captions.extend(text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True))
        return captions
