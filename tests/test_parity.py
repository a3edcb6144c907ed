"""Numerical parity with the official JAX model on its own outputs (tests/fixtures/official_tiny)."""

import numpy as np
import torch

from magiclens_core import load_official_checkpoint

ATOL = 1e-4


def test_embeddings_match_official(official_tiny, official_model):
    with torch.no_grad():
        got = official_model.embed(official_tiny["pixels"], official_tiny["ids"]).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, official_tiny["multimodal_embed_norm"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_unnormalised_head_output_matches_official(official_tiny, official_model):
    with torch.no_grad():
        image_embed, text_embed = official_model.clip_embed(official_tiny["pixels"], official_tiny["ids"])
        fused = official_model.head(image_embed, text_embed).numpy()
    np.testing.assert_allclose(fused, official_tiny["multimodal_embed"], atol=ATOL, rtol=0)


def test_clip_embeddings_match_official(official_tiny, official_model):
    with torch.no_grad():
        image_embed, text_embed = official_model.clip_embed(official_tiny["pixels"], official_tiny["ids"])
    np.testing.assert_allclose(image_embed.numpy(), official_tiny["clip_image_embed"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(text_embed.numpy(), official_tiny["clip_text_embed"], atol=ATOL, rtol=0)


def test_tokenizer_ids_match_official(official_tiny, official_model):
    assert torch.equal(official_model.tokenize(official_tiny["texts"]), official_tiny["ids"])


def test_loaded_model_is_eval_float32(official_tiny):
    model = load_official_checkpoint(official_tiny["pkl"])
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.model_id.startswith("magiclens-official-")
