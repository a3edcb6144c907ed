"""The shared Ray Data stages that turn images into MagicLens embeddings.

    rows (uri | image bytes, other columns)
      → read_images:  bytes, a stable `id`, `status` (new / present / rejected)     [CPU tasks]
      → embed_images: decode + preprocess                                           [CPU tasks]
                      → `Embedder` in an actor pool, one model load per actor        [GPU or CPU actors]
      → rows with `vector` (+ `clip_vector`), `width`, `height`, `model_id`, `status`, `reason`, `detail`

Rows are never dropped: an image that cannot be read or decoded comes out with `status == "rejected"` and a
reason, an id listed in `skip_ids` with `status == "present"` (neither decoded nor embedded), so the
consumer can account for every input row. Rows with an `instruction` column are embedded as queries
(image + instruction), others as targets (image + empty instruction). The indexing, evaluation and
batch-retrieval jobs all embed through these two functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from ray.data.extensions import ArrowTensorArray

from magiclens_core import Embedder, ImageDecodeError
from magiclens_core.images.decode import DEFAULT_MAX_PIXELS
from magiclens_core.images.identity import content_id
from magiclens_core.images.pixels import as_float_batch, decode_on_device, model_pixels
from magiclens_core.images.sources import read_uri
from magiclens_core.model.tokenizer import Tokenizer

NEW, PRESENT, REJECTED = "new", "present", "rejected"
READ_BATCH = 64  # images per read/decode task batch
# Memory reserved per decode task (a large image decodes to a few hundred MB). Declaring it also keeps
# Ray Data from fusing decoding into the embedding actors: decoding stays in CPU tasks that scale apart.
DECODE_MEMORY = 512 * 1024 * 1024


@dataclass(kw_only=True)
class EmbedOptions:
    """How images are decoded and embedded. A job's config dataclass inherits these fields (they become its
    flags) and passes itself wherever options are wanted."""

    model: str = field(metadata={"help": "model folder or official .pkl"})
    batch_size: int = field(default=32, metadata={"help": "images per model call"})
    workers: int = field(default=1, metadata={"help": "embedding actors"})
    gpus_per_worker: float = field(default=0.0, metadata={"help": "GPUs per embedding actor (0: CPU)"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs reserved per embedding actor"})
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    preprocess: Literal["model", "official_eval"] = "model"
    clip_vector: bool = field(default=False, metadata={"help": "also compute the CLIP image embedding"})
    gpu_decode: bool = field(default=False, metadata={"help": "decode JPEGs with nvJPEG in the embedding actors"})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={"help": "reject larger images"})
    min_size: int = field(default=1, metadata={"help": "reject images with a shorter side"})
    truncate_instructions: bool = field(default=False, metadata={"help": "cut instructions over 77 tokens"})


def _set_column(table: pa.Table, name: str, values: Any) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def _read_batch(batch: pa.Table, skip_ids: ray.ObjectRef | None, id_column: str | None) -> pa.Table:
    rows = batch.num_rows
    if "uri" not in batch.column_names:
        batch = batch.append_column("uri", pa.nulls(rows, pa.string()))
    reasons: list[str | None] = [None] * rows
    details: list[str | None] = [None] * rows
    images = batch.column("image").to_pylist() if "image" in batch.column_names else [None] * rows
    for index, uri in enumerate(batch.column("uri").to_pylist()):
        if images[index] is None and uri is not None:  # bytes given win; else read the uri
            try:
                images[index] = read_uri(uri)
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
    batch = _set_column(batch, "image", pa.array(images, pa.binary()))
    batch = _set_column(batch, "id", pa.array(ids, pa.string()))
    batch = _set_column(batch, "status", pa.array(status, pa.string()))
    batch = _set_column(batch, "reason", pa.array(reasons, pa.string()))
    return _set_column(batch, "detail", pa.array(details, pa.string()))


def read_images(dataset: ray.data.Dataset, skip_ids: np.ndarray | None = None,
                id_column: str | None = None) -> ray.data.Dataset:
    """Fetch each row's image bytes (from `uri` where no `image` bytes are given) and give it an `id`
    (`id_column` of the source, else the content hash). Rows whose id is in `skip_ids` (a sorted numpy
    bytes array, as `ImageTable.ids` returns) get `status == "present"` and lose their bytes."""
    reference = ray.put(skip_ids) if skip_ids is not None and len(skip_ids) else None
    return dataset.map_batches(_read_batch, batch_format="pyarrow", batch_size=READ_BATCH, zero_copy_batch=True,
                               fn_kwargs={"skip_ids": reference, "id_column": id_column})


def _check_instruction_batch(batch: pa.Table, context_length: int) -> pa.Table:
    """Reject the queries whose instruction the text tower cannot take whole."""
    tokenizer = Tokenizer(context_length)
    status = batch.column("status").to_pylist()
    reasons, details = batch.column("reason").to_pylist(), batch.column("detail").to_pylist()
    for index, text in enumerate(batch.column("instruction").to_pylist()):
        tokens = tokenizer.token_count(text or "")
        if status[index] == NEW and tokens > context_length:
            status[index], reasons[index] = REJECTED, "instruction_too_long"
            details[index] = f"{tokens} tokens, over the limit of {context_length}"
    for name, values in (("status", status), ("reason", reasons), ("detail", details)):
        batch = batch.set_column(batch.column_names.index(name), name, pa.array(values, pa.string()))
    return batch


def check_instructions(dataset: ray.data.Dataset) -> ray.data.Dataset:
    """Mark `rejected` (reason `instruction_too_long`) the `new` rows of a `read_images` dataset whose
    `instruction` the text tower cannot take whole, instead of failing in the embedding actors."""
    return dataset.map_batches(_check_instruction_batch, batch_format="pyarrow",
                               fn_kwargs={"context_length": Tokenizer().context_length})


def _decode_batch(batch: pa.Table, size: int, preprocess: str, max_pixels: int, min_size: int) -> pa.Table:
    rows = batch.num_rows
    pixels = np.zeros((rows, size, size, 3), dtype=np.uint8)
    widths: list[int | None] = [None] * rows
    heights: list[int | None] = [None] * rows
    status = batch.column("status").to_pylist()
    reasons = batch.column("reason").to_pylist()
    details = batch.column("detail").to_pylist()
    boxes = batch.column("box").to_pylist() if "box" in batch.column_names else [None] * rows
    for index, data in enumerate(batch.column("image").to_pylist()):
        if status[index] != NEW:
            continue
        try:
            pixels[index], widths[index], heights[index] = model_pixels(data, size, preprocess, max_pixels, min_size,
                                                                        boxes[index])
        except ImageDecodeError as err:
            status[index], reasons[index], details[index] = REJECTED, err.reason, err.detail
    batch = batch.drop_columns(["image"])
    batch = _set_column(batch, "pixels", ArrowTensorArray.from_numpy(pixels))
    return _with_outcome(batch, status, reasons, details, widths, heights)


def _with_outcome(batch: pa.Table, status: list, reasons: list, details: list, widths: list,
                  heights: list) -> pa.Table:
    batch = _set_column(batch, "status", pa.array(status, pa.string()))
    batch = _set_column(batch, "reason", pa.array(reasons, pa.string()))
    batch = _set_column(batch, "detail", pa.array(details, pa.string()))
    batch = _set_column(batch, "width", pa.array(widths, pa.int32()))
    return _set_column(batch, "height", pa.array(heights, pa.int32()))


def _vector_column(vectors: np.ndarray) -> pa.FixedSizeListArray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


class EmbedWorker:
    """One embedding actor: loads the model once, embeds every `new` row of each batch."""

    def __init__(self, options: EmbedOptions) -> None:
        device = "cuda" if options.gpus_per_worker > 0 else "cpu"
        self.options = options
        self.embedder = Embedder.load(options.model, device=device, precision=options.precision,
                                      batch_size=options.batch_size, preprocess=options.preprocess)

    def _pixels(self, batch: pa.Table, todo: np.ndarray) -> tuple[Any, pa.Table]:
        if "pixels" in batch.column_names:  # uint8 to the model's device (a quarter of float32's bytes)
            pixels = torch.from_numpy(batch.column("pixels").combine_chunks().to_numpy()[todo])
            return as_float_batch(pixels.to(self.embedder.device)), batch.drop_columns(["pixels"])
        status = batch.column("status").to_pylist()
        reasons, details = batch.column("reason").to_pylist(), batch.column("detail").to_pylist()
        widths: list[int | None] = [None] * batch.num_rows
        heights: list[int | None] = [None] * batch.num_rows
        images = batch.column("image").to_pylist()
        pixels, outcome = decode_on_device([images[i] for i in todo], self.embedder.model.image_size,
                                           self.embedder.device, self.options.preprocess,
                                           self.options.max_pixels, self.options.min_size)
        for index, result in zip(todo, outcome, strict=True):
            if isinstance(result, ImageDecodeError):
                status[index], reasons[index], details[index] = REJECTED, result.reason, result.detail
            else:
                widths[index], heights[index] = result
        batch = _with_outcome(batch.drop_columns(["image"]), status, reasons, details, widths, heights)
        return pixels, batch

    def __call__(self, batch: pa.Table) -> pa.Table:
        todo = np.nonzero(pc.equal(batch.column("status"), NEW).to_numpy(zero_copy_only=False))[0]
        pixels, batch = self._pixels(batch, todo)
        todo = np.nonzero(pc.equal(batch.column("status"), NEW).to_numpy(zero_copy_only=False))[0]
        dim = self.embedder.dim
        vectors = np.zeros((batch.num_rows, dim), dtype=np.float32)
        clip = np.zeros((batch.num_rows, self.embedder.model.config.clip.embed_dim), dtype=np.float32)
        if len(todo):
            if "instruction" in batch.column_names:
                instructions = batch.column("instruction").to_pylist()
                vectors[todo] = self.embedder.embed_queries(pixels, [instructions[i] or "" for i in todo],
                                                            truncate=self.options.truncate_instructions)
            elif self.options.clip_vector:
                vectors[todo], clip[todo] = self.embedder.embed_targets_and_clip(pixels)
            else:
                vectors[todo] = self.embedder.embed_targets(pixels)
        batch = _set_column(batch, "vector", _vector_column(vectors))
        if self.options.clip_vector:
            batch = _set_column(batch, "clip_vector", _vector_column(clip))
        return _set_column(batch, "model_id", pa.array([self.embedder.model_id] * batch.num_rows, pa.string()))


def embed_images(dataset: ray.data.Dataset, options: EmbedOptions, image_size: int) -> ray.data.Dataset:
    """Decode (CPU tasks, or on the GPU with `gpu_decode`) and embed (actor pool) the `new` rows of a
    `read_images` dataset; see the module docstring for the columns added."""
    if not options.gpu_decode:
        dataset = dataset.map_batches(
            _decode_batch, batch_format="pyarrow", batch_size=READ_BATCH, zero_copy_batch=True, memory=DECODE_MEMORY,
            fn_kwargs={"size": image_size, "preprocess": options.preprocess,
                       "max_pixels": options.max_pixels, "min_size": options.min_size})
    return dataset.map_batches(
        EmbedWorker, fn_constructor_kwargs={"options": options}, batch_format="pyarrow",
        batch_size=options.batch_size, concurrency=options.workers, num_gpus=options.gpus_per_worker or None,
        num_cpus=options.cpus_per_worker, zero_copy_batch=True)


@ray.remote(num_cpus=1)
def _describe(path: str) -> dict[str, Any]:
    from magiclens_core import load_model

    model = load_model(path)
    return {"model_id": model.model_id, "dim": model.embed_dim, "image_size": model.image_size}


def model_info(path: str) -> dict[str, Any]:
    """`model_id`, `dim` and `image_size` of a model, read on a cluster worker (the driver stays light)."""
    return ray.get(_describe.remote(path))
