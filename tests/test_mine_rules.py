"""Mining rules: cleaning, pair selection, instruction prompts, parsing, checks and the template."""

from __future__ import annotations

import numpy as np
from PIL import Image

from magiclens_core.mining.clean import CleanRules, decoration_reason, hamming, perceptual_hash, shape_reason
from magiclens_core.mining.instructions import (
    ANSWER_MARKER,
    DEMONSTRATIONS,
    ImageText,
    build_messages,
    build_prompt,
    check_instruction,
    parse_answer,
    template_instruction,
)
from magiclens_core.mining.pairs import PairRules, query_first, select_pairs
from magiclens_core.mining.records import ImageCandidate
from magiclens_core.model.tokenizer import Tokenizer


def test_decoration_rules():
    def reason(url, alt="", **size):
        return decoration_reason(ImageCandidate(url=url, alt=alt, **size))

    assert reason("https://s.example/static/logo.png") == "icon_logo_or_ad"
    assert reason("https://s.example/img/favicon-32.ico") == "icon_logo_or_ad"
    assert reason("https://s.example/ads/banner_728x90.jpg") == "icon_logo_or_ad"
    assert reason("https://s.example/a.png", alt="Company logo") == "icon_logo_or_ad"
    assert reason("https://s.example/p.gif", width=1, height=1) == "tracking_pixel"
    assert reason("https://stats.g.doubleclick.net/x.gif") == "tracker_or_ad_host"
    assert reason("https://pixel.example.com/p?id=1") == "tracker_or_ad_host"
    assert reason("https://s.example/t/pixel.gif") == "icon_logo_or_ad"
    assert reason("https://pixel-art.example/gallery/cat.png") is None
    assert reason("https://s.example/photos/beach-at-dawn.jpg", alt="a beach at dawn") is None
    assert reason("https://s.example/photos/iconic-bridge.jpg", alt="the iconic bridge") is None  # words, not tokens


def test_shape_rules():
    rules = CleanRules(min_side=100, max_aspect=3.0)
    assert shape_reason(1, 1, rules)[0] == "tracking_pixel"
    assert shape_reason(99, 400, rules)[0] == "too_small"
    assert shape_reason(1000, 200, rules)[0] == "extreme_aspect_ratio"
    assert shape_reason(300, 200, rules) is None


def test_perceptual_hash_finds_near_duplicates():
    gradient = np.tile(np.linspace(0, 255, 128, dtype=np.uint8), (96, 1))
    image = Image.fromarray(np.stack([gradient, gradient[:, ::-1], gradient], axis=-1))
    smaller = image.resize((64, 48))
    other = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert hamming(perceptual_hash(image), perceptual_hash(smaller)) <= 6
    assert hamming(perceptual_hash(image), perceptual_hash(other)) > 30


def test_pairs_inside_the_window_and_capped():
    vectors = np.eye(5, dtype=np.float32)
    vectors[1] = vectors[0] * 0.8 + vectors[1] * 0.6  # related to 0
    vectors[2] = vectors[0] * 0.7 + vectors[2] * 0.714
    vectors[3] = vectors[0]  # a near duplicate of 0
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rules = PairRules(image_low=0.3, image_high=0.95, text_low=-1, text_high=1.01, max_pairs=2)
    chosen, dropped = select_pairs(vectors, vectors, [f"id{i}" for i in range(5)], rules)
    assert len(chosen) == 2
    assert all(0.3 <= p.image_similarity <= 0.95 for p in chosen)
    assert chosen[0].score >= chosen[1].score
    reasons = {(d.first, d.second): d.reason for d in dropped}
    assert reasons[(0, 3)] == "near_duplicate" and reasons[(0, 4)] == "unrelated"
    assert "page_cap" in reasons.values()


def test_the_query_is_a_stable_coin_toss_not_the_page_order():
    ids = [f"image-{index}" for index in range(200)]
    pairs = [(first, first + 1) for first in range(0, 200, 2)]
    chosen = [query_first(first, second, ids) for first, second in pairs]
    assert all(sorted(pair) == [first, second] for pair, (first, second) in zip(chosen, pairs, strict=True))
    earlier_is_query = sum(query == first for (query, _), (first, _) in zip(chosen, pairs, strict=True))
    assert 30 < earlier_is_query < 70  # not always the earlier image
    swapped = [query_first(first, second, list(reversed(ids))) for first, second in
               ((199 - second, 199 - first) for first, second in pairs)]
    assert [ids[::-1][query] for query, _ in swapped] == [ids[query] for query, _ in chosen]  # order-free


def test_prompt_in_the_paper_format_and_answers_parsed():
    messages = build_messages("Dog shows", ImageText(alt="a poodle", caption="Best in show"), ImageText(alt="a pug"))
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 5 + ["user"]
    prompt = build_prompt(messages)
    assert prompt.count("Both Images are from a website titled") == len(DEMONSTRATIONS) + 1 == 6
    assert prompt.count(ANSWER_MARKER) == 5 + 1  # one per demonstration, one in the task
    assert prompt.endswith('titled "Dog shows"\nQ Image: a poodle Best in show\nT Image: a pug\nAnswer:')
    assert parse_answer(f'Both are dogs. {ANSWER_MARKER} "a smaller breed".\nmore') == "a smaller breed"
    assert parse_answer(f"x {ANSWER_MARKER} one. {ANSWER_MARKER} two") == "two"
    assert parse_answer("The instruction can be: bigger") == "bigger"
    assert parse_answer("no marker here") is None


def test_bad_instructions_rejected():
    tokenizer = Tokenizer()
    texts = ["a pug on a sofa", "a poodle"]
    assert check_instruction(None, texts, tokenizer)[0] == "malformed"
    assert check_instruction(" .. ", texts, tokenizer)[0] == "empty"
    assert check_instruction("word " * 80, texts, tokenizer)[0] == "too_long"
    assert check_instruction("A pug, on a sofa!", texts, tokenizer)[0] == "repeats_caption"
    assert check_instruction(DEMONSTRATIONS[0][-1], texts, tokenizer)[0] == "copies_demonstration"
    assert check_instruction("the same dog, asleep", texts, tokenizer) is None


def test_template_is_deterministic_and_fits():
    tokenizer = Tokenizer()
    target = ImageText(alt="a large blue square", caption="blue things: a large blue square")
    text = template_instruction(target, tokenizer)
    assert text == "a large blue square instead"
    assert template_instruction(ImageText(caption="a dog"), tokenizer) == "a dog instead"
    assert text == template_instruction(target, tokenizer)
    query = ImageText(alt="a small blue circle, on the left")
    assert template_instruction(target, tokenizer, query) == "large square instead"  # what the target adds
    assert template_instruction(target, tokenizer, ImageText(alt="A large, blue square")) == text  # adds nothing
    long = template_instruction(ImageText(alt="word " * 200), tokenizer)
    assert long.endswith("instead") and tokenizer.token_count(long) <= 77
