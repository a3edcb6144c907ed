"""The one embedding path: batching, input kinds, targets vs queries, precision options."""

import numpy as np
import pytest
import torch
from PIL import Image

from magiclens_core import Embedder, describe_model, save_model


@pytest.fixture(scope="module")
def embedder(official_model):
    return Embedder(official_model, device="cpu", batch_size=2)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in
            [(240, 320, 3), (300, 200, 3), (224, 224, 3), (64, 90, 3), (500, 260, 3)]]


def test_queries_match_the_model_directly(embedder, official_model, images):
    texts = ["make it red", "", "the same dish, but the recipe", "inside view", "two of them"]
    got = embedder.embed_queries(images, texts)
    with torch.no_grad():
        expected = torch.cat([official_model.embed(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255,
                                                   official_model.tokenize([t]))
                              for img, t in zip(images, texts, strict=True)]).numpy()
    assert got.shape == (5, 64) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_targets_are_queries_with_the_empty_instruction(embedder, images):
    np.testing.assert_allclose(embedder.embed_targets(images), embedder.embed_queries(images, [""] * 5),
                               atol=1e-5, rtol=0)


def test_batch_size_does_not_change_results(official_model, images):
    one = Embedder(official_model, device="cpu", batch_size=1).embed_targets(images)
    many = Embedder(official_model, device="cpu", batch_size=16).embed_targets(images)
    np.testing.assert_allclose(one, many, atol=1e-5, rtol=0)


def test_pil_numpy_and_tensor_inputs_agree(embedder, images):
    as_pil = [Image.fromarray(img) for img in images]
    as_tensor = [torch.from_numpy(img).permute(2, 0, 1).float() / 255 for img in images]
    reference = embedder.embed_targets(images)
    np.testing.assert_allclose(embedder.embed_targets(as_pil), reference, atol=1e-6, rtol=0)
    np.testing.assert_allclose(embedder.embed_targets(as_tensor), reference, atol=1e-6, rtol=0)


def test_clip_embeddings_are_the_backbones_normalised(embedder, official_model, images):
    got_images = embedder.embed_clip_images(images[:2])
    got_texts = embedder.embed_clip_texts(["a cat", "a dog on a sofa"])
    with torch.no_grad():
        pixels = embedder.pixels(images[:2])
        ref_images = torch.nn.functional.normalize(official_model.encode_image(pixels), dim=-1).numpy()
        ref_texts = torch.nn.functional.normalize(
            official_model.encode_text(official_model.tokenize(["a cat", "a dog on a sofa"])), dim=-1).numpy()
    np.testing.assert_allclose(got_images, ref_images, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_texts, ref_texts, atol=1e-5, rtol=0)


def test_bf16_autocast_stays_close_to_fp32(official_model, images):
    fp32 = Embedder(official_model, device="cpu").embed_queries(images, ["make it red"] * 5)
    bf16 = Embedder(official_model, device="cpu", precision="bf16").embed_queries(images, ["make it red"] * 5)
    assert bf16.dtype == np.float32
    assert (fp32 * bf16).sum(axis=1).min() > 0.99


def test_official_eval_mode_differs_from_model_mode_on_non_square_images(official_model, images):
    model_mode = Embedder(official_model, device="cpu").embed_targets(images[:2])
    eval_mode = Embedder(official_model, device="cpu", preprocess="official_eval").embed_targets(images[:2])
    assert np.abs(model_mode - eval_mode).max() > 1e-3


def test_over_long_instruction_fails_before_any_work(embedder, images):
    with pytest.raises(ValueError, match="tokens"):
        embedder.embed_queries(images[:2], ["fine", "word " * 100])
    long = embedder.embed_queries(images[:1], ["word " * 100], truncate=True)
    assert long.shape == (1, 64)


def test_empty_and_mismatched_inputs(embedder, images):
    assert embedder.embed_targets([]).shape == (0, 64)
    with pytest.raises(ValueError, match="instructions"):
        embedder.embed_queries(images[:2], ["one"])


def test_bad_options_are_rejected(official_model):
    with pytest.raises(ValueError, match="precision"):
        Embedder(official_model, device="cpu", precision="int4")
    with pytest.raises(ValueError, match="preprocessing mode"):
        Embedder(official_model, device="cpu", preprocess="squash")
    with pytest.raises(ValueError, match="batch_size"):
        Embedder(official_model, device="cpu", batch_size=0)


def test_load_from_a_model_folder_keeps_identity(official_model, tmp_path, images):
    folder = save_model(official_model, tmp_path / "model")
    loaded = Embedder.load(folder, device="cpu")
    assert loaded.model_id == describe_model(folder).model_id and loaded.dim == 64
    np.testing.assert_array_equal(loaded.embed_targets(images[:2]),
                                  Embedder(official_model, device="cpu").embed_targets(images[:2]))
