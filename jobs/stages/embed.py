"""The shared Ray Data stages that turn images into MagicLens embeddings.

    rows (uri | image bytes, the source's own columns)
      → read_images:  image bytes, a stable id, a status (new / present / rejected)      [CPU tasks]
      → embed_images: decode + preprocess                                               [CPU tasks]
                      → `Embedder` in an actor pool, one model load per actor            [GPU or CPU actors]
      → the same rows with the embedding, the model id, the image's width and height

Working columns: everything the stages add is named under the reserved prefix `__ml_` (`STAGE_PREFIX`):
`ID`, `STATUS`, `REASON`, `DETAIL`, `WIDTH`, `HEIGHT`, `EMBEDDING`, `CLIP_EMBEDDING` (with the
`clip_vector` option) and `MODEL_ID` come out, the image bytes and pixels live there between stages. The
source's own columns (a caption, an `instruction`, a `box`, a `status`, ...) are carried through untouched,
except the `image` bytes, which the read stage takes; a `uri` column (null when the source has none) is
kept for the consumer. A source column under the prefix is refused. The stages read no column by its
name alone: whether rows embed as queries (image + instruction) or as targets (image + empty instruction)
is the `role` given to `embed_images`, with the `instruction_column` of queries, and `box_column` names
crop boxes. Consumers map the working columns to their own outputs.

Rows are never dropped: an image that cannot be read or decoded, or whose URI the read policy refuses
(reason `uri_not_allowed`), comes out with status `rejected` and a reason, an id listed in `skip_ids` with
status `present` (neither decoded nor embedded), so the consumer can account for every input row. The
indexing, evaluation and batch-retrieval jobs all embed through these stages.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from ray.data.extensions import ArrowTensorArray

from jobs.common import Demand
from jobs.stages.pools import actor_pool
from magiclens_core.images.decode import DEFAULT_MAX_PIXELS, ImageDecodeError
from magiclens_core.images.identity import content_id
from magiclens_core.images.pixels import as_float_batch, decode_on_device, model_pixels
from magiclens_core.images.sources import UriNotAllowed, UriPolicy
from magiclens_core.model.precision import Precision
from magiclens_core.model.tokenizer import Tokenizer

NEW, PRESENT, REJECTED = "new", "present", "rejected"
STAGE_PREFIX = "__ml_"
ID, STATUS, REASON, DETAIL = "__ml_id", "__ml_status", "__ml_reason", "__ml_detail"
WIDTH, HEIGHT, MODEL_ID = "__ml_width", "__ml_height", "__ml_model_id"
EMBEDDING, CLIP_EMBEDDING = "__ml_vector", "__ml_clip_vector"
IMAGE, PIXELS = "__ml_image", "__ml_pixels"  # between stages only
Role = Literal["query", "target"]

READ_BATCH = 64  # images per read/decode task batch
# Memory reserved per decode task (a large image decodes to a few hundred MB). Declaring it also keeps
# Ray Data from fusing decoding into the embedding actors: decoding stays in CPU tasks that scale apart.
DECODE_MEMORY = 768 * 1024 * 1024


@dataclass(kw_only=True)
class EmbedOptions:
    """How images are decoded and embedded. A job's config dataclass inherits these fields (they become its
    flags) and passes itself wherever options are wanted."""

    model: str = field(metadata={"help": "model folder or official .pkl"})
    batch_size: int = field(default=32, metadata={"help": "images per model call"})
    workers: int = field(default=1, metadata={"help": "embedding actors"})
    gpus_per_worker: float = field(default=0.0, metadata={"help": "GPUs per embedding actor (0: CPU)"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs reserved per embedding actor"})
    precision: Precision = "auto"
    preprocess: Literal["model", "official_eval"] = "model"
    clip_vector: bool = field(default=False, metadata={"help": "also compute the CLIP image embedding"})
    gpu_decode: bool = field(default=False, metadata={"help": "decode JPEGs with nvJPEG in the embedding actors"})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={"help": "reject larger images"})
    min_size: int = field(default=1, metadata={"help": "reject images with a shorter side"})
    truncate_instructions: bool = field(default=False, metadata={"help": "cut instructions over 77 tokens"})


def embedding_demand(options: EmbedOptions, extra_cpus: float = 0.0, extra_flags: str = "") -> Demand:
    """What the embedding stages reserve at once: the actor pool, one CPU for the read and decode tasks,
    and `extra_cpus` of the job's own (named by `extra_flags`)."""
    flags = "--workers or --cpus-per-worker" + (f" (or {extra_flags})" if extra_flags else "")
    return Demand(cpus=options.workers * options.cpus_per_worker + 1 + extra_cpus,
                  gpus=options.workers * options.gpus_per_worker, flags=flags)


def check_source_columns(names: Iterable[str]) -> None:
    """Refuse (`ValueError`) a source whose columns would collide with the stages' working columns."""
    taken = sorted(name for name in names if name.startswith(STAGE_PREFIX))
    if taken:
        raise ValueError(f"source column(s) {taken} use the prefix {STAGE_PREFIX!r}, which the embedding "
                         "stages reserve for their working columns; rename them")


def user_columns(batch: pa.Table) -> list[str]:
    """The columns of a stage's output that came from the source (everything not under `STAGE_PREFIX`)."""
    return [name for name in batch.column_names if not name.startswith(STAGE_PREFIX)]


def _set_column(table: pa.Table, name: str, values: Any) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def _read_batch(batch: pa.Table, skip_ids: ray.ObjectRef | None, id_column: str | None,
                policy: UriPolicy) -> pa.Table:
    check_source_columns(batch.column_names)
    rows = batch.num_rows
    if "uri" not in batch.column_names:
        batch = batch.append_column("uri", pa.nulls(rows, pa.string()))
    reasons: list[str | None] = [None] * rows
    details: list[str | None] = [None] * rows
    images = batch.column("image").to_pylist() if "image" in batch.column_names else [None] * rows
    for index, uri in enumerate(batch.column("uri").to_pylist()):
        if images[index] is None and uri is not None:  # bytes given win; else read the uri
            try:
                images[index] = policy.read(uri)
            except UriNotAllowed as err:
                reasons[index], details[index] = "uri_not_allowed", str(err)
            except (OSError, ValueError) as err:
                reasons[index], details[index] = "unreadable", str(err)
    if id_column and id_column in batch.column_names:
        ids = [None if value is None else str(value) for value in batch.column(id_column).to_pylist()]
    else:
        ids = [None if data is None else content_id(data) for data in images]
    for index, data in enumerate(images):
        if data is None and reasons[index] is None:
            reasons[index], details[index] = "empty", "no image bytes"
    status = [REJECTED if reason else NEW for reason in reasons]
    if skip_ids is not None:
        present = ray.get(skip_ids)
        if len(present):
            keys = np.array([i or "" for i in ids], dtype=np.bytes_)
            slots = np.minimum(np.searchsorted(present, keys), len(present) - 1)
            for index in np.nonzero(present[slots] == keys)[0]:
                if status[index] == NEW:
                    status[index], images[index] = PRESENT, None  # drop the bytes: nothing more to do
    if "image" in batch.column_names:
        batch = batch.drop_columns(["image"])
    for name, values in ((IMAGE, pa.array(images, pa.binary())), (ID, pa.array(ids, pa.string())),
                         (STATUS, pa.array(status, pa.string())), (REASON, pa.array(reasons, pa.string())),
                         (DETAIL, pa.array(details, pa.string()))):
        batch = batch.append_column(name, values)
    return batch


def read_images(dataset: ray.data.Dataset, skip_ids: np.ndarray | None = None, id_column: str | None = None,
                policy: UriPolicy | None = None) -> ray.data.Dataset:
    """Fetch each row's image bytes (from `uri` under `policy` where no `image` bytes are given; no policy:
    every URI is refused) and give it an `ID` (`id_column` of the source, else the content hash). Rows
    whose id is in `skip_ids` (a sorted numpy bytes array, as `ImageTable.ids` returns) get status
    `present` and lose their bytes."""
    schema = dataset.schema(fetch_if_missing=False)
    if schema is not None:  # known without reading: refuse here, else the first batch refuses
        check_source_columns(schema.names)
    reference = ray.put(skip_ids) if skip_ids is not None and len(skip_ids) else None
    return dataset.map_batches(_read_batch, batch_format="pyarrow", batch_size=READ_BATCH, zero_copy_batch=True,
                               fn_kwargs={"skip_ids": reference, "id_column": id_column,
                                          "policy": policy or UriPolicy()})


def _check_instruction_batch(batch: pa.Table, column: str, context_length: int) -> pa.Table:
    """Reject the queries whose instruction the text tower cannot take whole."""
    tokenizer = Tokenizer(context_length)
    status = batch.column(STATUS).to_pylist()
    reasons, details = batch.column(REASON).to_pylist(), batch.column(DETAIL).to_pylist()
    for index, text in enumerate(batch.column(column).to_pylist()):
        tokens = tokenizer.token_count(text or "")
        if status[index] == NEW and tokens > context_length:
            status[index], reasons[index] = REJECTED, "instruction_too_long"
            details[index] = f"{tokens} tokens, over the limit of {context_length}"
    for name, values in ((STATUS, status), (REASON, reasons), (DETAIL, details)):
        batch = _set_column(batch, name, pa.array(values, pa.string()))
    return batch


def check_instructions(dataset: ray.data.Dataset, instruction_column: str) -> ray.data.Dataset:
    """Mark `rejected` (reason `instruction_too_long`) the `new` rows of a `read_images` dataset whose
    instruction the text tower cannot take whole, instead of failing in the embedding actors."""
    return dataset.map_batches(_check_instruction_batch, batch_format="pyarrow",
                               fn_kwargs={"column": instruction_column,
                                          "context_length": Tokenizer().context_length})


def _decode_batch(batch: pa.Table, size: int, preprocess: str, max_pixels: int, min_size: int,
                  box_column: str | None) -> pa.Table:
    rows = batch.num_rows
    pixels = np.zeros((rows, size, size, 3), dtype=np.uint8)
    widths: list[int | None] = [None] * rows
    heights: list[int | None] = [None] * rows
    status = batch.column(STATUS).to_pylist()
    reasons = batch.column(REASON).to_pylist()
    details = batch.column(DETAIL).to_pylist()
    boxes = batch.column(box_column).to_pylist() if box_column else [None] * rows
    for index, data in enumerate(batch.column(IMAGE).to_pylist()):
        if status[index] != NEW:
            continue
        try:
            pixels[index], widths[index], heights[index] = model_pixels(data, size, preprocess, max_pixels, min_size,
                                                                        boxes[index])
        except ImageDecodeError as err:
            status[index], reasons[index], details[index] = REJECTED, err.reason, err.detail
    batch = batch.drop_columns([IMAGE]).append_column(PIXELS, ArrowTensorArray.from_numpy(pixels))
    return _with_outcome(batch, status, reasons, details, widths, heights)


def _with_outcome(batch: pa.Table, status: list, reasons: list, details: list, widths: list,
                  heights: list) -> pa.Table:
    batch = _set_column(batch, STATUS, pa.array(status, pa.string()))
    batch = _set_column(batch, REASON, pa.array(reasons, pa.string()))
    batch = _set_column(batch, DETAIL, pa.array(details, pa.string()))
    batch = _set_column(batch, WIDTH, pa.array(widths, pa.int32()))
    return _set_column(batch, HEIGHT, pa.array(heights, pa.int32()))


def _vector_column(vectors: np.ndarray) -> pa.FixedSizeListArray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


class EmbedWorker:
    """One embedding actor: loads the model once, embeds every `new` row of each batch as a query (with
    its instruction) or as a target, as its `role` says."""

    def __init__(self, options: EmbedOptions, role: Role, instruction_column: str | None) -> None:
        from magiclens_core.embedder import Embedder  # the model's imports only in the processes that embed

        device = "cuda" if options.gpus_per_worker > 0 else "cpu"
        self.options, self.role, self.instruction_column = options, role, instruction_column
        self.embedder = Embedder.load(options.model, device=device, precision=options.precision,
                                      batch_size=options.batch_size, preprocess=options.preprocess)

    def _pixels(self, batch: pa.Table, todo: np.ndarray) -> tuple[Any, pa.Table]:
        if PIXELS in batch.column_names:  # uint8 to the model's device (a quarter of float32's bytes)
            pixels = torch.from_numpy(batch.column(PIXELS).combine_chunks().to_numpy()[todo])
            return as_float_batch(pixels.to(self.embedder.device)), batch.drop_columns([PIXELS])
        status = batch.column(STATUS).to_pylist()
        reasons, details = batch.column(REASON).to_pylist(), batch.column(DETAIL).to_pylist()
        widths: list[int | None] = [None] * batch.num_rows
        heights: list[int | None] = [None] * batch.num_rows
        images = batch.column(IMAGE).to_pylist()
        pixels, outcome = decode_on_device([images[i] for i in todo], self.embedder.model.image_size,
                                           self.embedder.device, self.options.preprocess,
                                           self.options.max_pixels, self.options.min_size)
        for index, result in zip(todo, outcome, strict=True):
            if isinstance(result, ImageDecodeError):
                status[index], reasons[index], details[index] = REJECTED, result.reason, result.detail
            else:
                widths[index], heights[index] = result
        batch = _with_outcome(batch.drop_columns([IMAGE]), status, reasons, details, widths, heights)
        return pixels, batch

    def _embed_queries(self, pixels: torch.Tensor, instructions: list[str | None], todo: np.ndarray) -> np.ndarray:
        """Rows with an instruction as queries; rows whose instruction is null as targets (the same vector as
        the empty instruction, without running the text tower), so one pass can embed queries and a pool."""
        texts = [instructions[i] for i in todo]
        queries = np.array([text is not None for text in texts])
        vectors = np.zeros((len(todo), self.embedder.dim), dtype=np.float32)
        if queries.any():
            vectors[queries] = self.embedder.embed_queries(pixels[torch.from_numpy(queries)],
                                                           [text for text in texts if text is not None],
                                                           truncate=self.options.truncate_instructions)
        if not queries.all():
            vectors[~queries] = self.embedder.embed_targets(pixels[torch.from_numpy(~queries)])
        return vectors

    def __call__(self, batch: pa.Table) -> pa.Table:
        todo = np.nonzero(pc.equal(batch.column(STATUS), NEW).to_numpy(zero_copy_only=False))[0]
        pixels, batch = self._pixels(batch, todo)
        todo = np.nonzero(pc.equal(batch.column(STATUS), NEW).to_numpy(zero_copy_only=False))[0]
        dim = self.embedder.dim
        vectors = np.zeros((batch.num_rows, dim), dtype=np.float32)
        clip = np.zeros((batch.num_rows, self.embedder.model.config.clip.embed_dim), dtype=np.float32)
        if len(todo):
            if self.role == "query":
                vectors[todo] = self._embed_queries(pixels, batch.column(self.instruction_column).to_pylist(), todo)
            elif self.options.clip_vector:
                vectors[todo], clip[todo] = self.embedder.embed_targets_and_clip(pixels)
            else:
                vectors[todo] = self.embedder.embed_targets(pixels)
        batch = batch.append_column(EMBEDDING, _vector_column(vectors))
        if self.options.clip_vector:
            batch = batch.append_column(CLIP_EMBEDDING, _vector_column(clip))
        return batch.append_column(MODEL_ID, pa.array([self.embedder.model_id] * batch.num_rows, pa.string()))


def embed_images(dataset: ray.data.Dataset, options: EmbedOptions, image_size: int, *, role: Role,
                 instruction_column: str | None = None, box_column: str | None = None) -> ray.data.Dataset:
    """Decode (CPU tasks, or on the GPU with `gpu_decode`) and embed (actor pool) the `new` rows of a
    `read_images` dataset: as queries with the source's `instruction_column` (`role="query"`; a row whose
    instruction is null is embedded as a target) or as targets (`role="target"`), crops from `box_column`
    when given; see the module docstring for the columns added."""
    if (role == "query") != (instruction_column is not None):
        raise ValueError("queries are embedded with an instruction_column, targets without one")
    if box_column and options.gpu_decode:
        raise ValueError("gpu_decode cannot crop boxes: decode on the CPU to use a box_column")
    if not options.gpu_decode:
        dataset = dataset.map_batches(
            _decode_batch, batch_format="pyarrow", batch_size=READ_BATCH, zero_copy_batch=True, memory=DECODE_MEMORY,
            fn_kwargs={"size": image_size, "preprocess": options.preprocess, "max_pixels": options.max_pixels,
                       "min_size": options.min_size, "box_column": box_column})
    return dataset.map_batches(
        EmbedWorker, fn_constructor_kwargs={"options": options, "role": role,
                                            "instruction_column": instruction_column},
        batch_format="pyarrow", batch_size=options.batch_size, compute=actor_pool(options.workers),
        num_gpus=options.gpus_per_worker or None, num_cpus=options.cpus_per_worker, zero_copy_batch=True)
