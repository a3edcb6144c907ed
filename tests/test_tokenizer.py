"""Tokenizer contract: official ids, the 77-token limit, and the official text mask."""

import pytest
import torch

from magiclens_core.model.tokenizer import Tokenizer

EOT = 49407


def test_layout_start_end_and_zero_padding():
    ids = Tokenizer()(["a red car", ""])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, 0] == 49406 and ids[0, 4] == EOT and ids[0, 5:].eq(0).all()
    assert ids[1, :2].tolist() == [49406, EOT] and ids[1, 2:].eq(0).all()


def test_over_long_text_raises_naming_text_and_count():
    text = "word " * 80
    with pytest.raises(ValueError) as err:
        Tokenizer()(["fine", text])
    assert "82 tokens" in str(err.value) and "word word" in str(err.value)


def test_truncate_keeps_77_with_end_token_last():
    ids = Tokenizer()(["word " * 80], truncate=True)
    assert ids.shape == (1, 77) and ids[0, -1] == EOT and ids[0].ne(0).all()


def test_exactly_77_tokens_is_allowed():
    tokenizer = Tokenizer()
    text = "word " * 75
    assert tokenizer.token_count(text) == 77
    assert tokenizer([text])[0, -1] == EOT


def test_exclamation_mark_is_token_zero_and_masked_like_official(official_model):
    """The official text mask drops keys whose id is 0, and a '!' inside a word ('!=' → '!', '=') is
    id 0 in CLIP's vocabulary: its embedding must not reach the pooled text embedding, while other
    tokens' embeddings do."""
    ids = official_model.tokenize(["wow != great"])
    assert ids[0, 2] == 0 and ids[0, 3] != 0
    other = int(ids[0, 1])
    model = official_model
    with torch.no_grad():
        before = model.encode_text(ids).clone()
        saved = model.clip.token_embedding.weight.clone()
        try:
            noise = torch.randn(saved.shape[1], generator=torch.Generator().manual_seed(0))
            model.clip.token_embedding.weight[0] += noise
            after_bang = model.encode_text(ids)
            model.clip.token_embedding.weight[other] += noise
            after_other = model.encode_text(ids)
        finally:
            model.clip.token_embedding.weight.copy_(saved)
    assert torch.allclose(before, after_bang, atol=1e-6)
    assert not torch.allclose(before, after_other, atol=1e-3)


def test_text_encoding_does_not_depend_on_padding_length(official_model):
    """Encoding cuts the sequence after the longest text; a short text alone or beside a long one agrees."""
    ids = official_model.tokenize(["short", "a much longer instruction with many more words in it"])
    with torch.no_grad():
        together = official_model.encode_text(ids)[0]
        alone = official_model.encode_text(ids[:1])[0]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
