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
