"""Tiny randomly initialised `transformers` models, built offline, for the mining model stages."""

from __future__ import annotations

import re
from pathlib import Path

from magiclens_core.mining.instructions import DEMONSTRATIONS, TASK

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]


def _tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(dict.fromkeys(SPECIAL + words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", eos_token="[EOS]")


def _words(extra: str = "") -> list[str]:
    text = TASK + " ".join(" ".join(shot) for shot in DEMONSTRATIONS) + extra
    return sorted(set(re.findall(r"\w+|[^\w\s]", text.lower() + text)))


def tiny_sentence_model(folder: Path, extra_text: str = "") -> Path:
    """A 2-layer BERT encoder with a word-level tokenizer, saved to `folder`."""
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = _tokenizer(_words(extra_text))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_causal_model(folder: Path, extra_text: str = "") -> Path:
    """A 2-layer Llama with a word-level tokenizer, saved to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer(_words(extra_text))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=2048,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


CAPTION_WORDS = "a the small large red green blue yellow purple orange circle square triangle diamond on left right " \
                "middle white black gray background of one two three"


def tiny_captioner(folder: Path, image_size: int = 32) -> Path:
    """A ViT encoder with a 2-layer GPT-2 decoder (a vision encoder-decoder), its image processor and a
    word-level tokenizer, saved to `folder`; it never ends a caption early."""
    import torch
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    tokenizer = _tokenizer(CAPTION_WORDS.split())
    torch.manual_seed(0)
    encoder = ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64)
    decoder = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                         bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, add_cross_attention=True, is_decoder=True,
                         tie_word_embeddings=False)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = tokenizer.cls_token_id
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    model = VisionEncoderDecoderModel(config=config)
    with torch.no_grad():  # special tokens score 0, under the best word: every caption is words to its length limit
        model.decoder.lm_head.weight[:len(SPECIAL)] = 0
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
