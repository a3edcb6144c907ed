"""Train MagicLens on triplets with Ray Train; the last line printed is a JSON summary.

    python -m jobs.train --triplets train.parquet --init tiny --name demo --storage runs --steps 200
    ray job submit --working-dir . -- python -m jobs.train --config train.yaml

Layout under `STORAGE/NAME/`: Ray Train's checkpoints (`checkpoint_<step>/` with `model/`, a model
folder, and `train_state.pt`), the exported `model/` and `summary.json` once the run has finished.
Rerunning the same name resumes from the latest checkpoint (Ray Train restores the run from its
storage); rerunning a finished run prints its summary without starting workers (with remote storage,
where no summary file is kept, the workers restore the final checkpoint and stop at once).
The per-worker loop, checkpoints and export are in `jobs.train_loop`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.common import Demand, require_paths, run_job
from jobs.stages.triplets import decoded_row_bytes, read_triplets, training_dataset
from jobs.train_loop import (
    MODEL_DIR,
    best_checkpoint,
    build_trainer,
    export_model,
    storage_path,
    stored_result,
    summarize,
)
from magiclens_core.factory import initial_model
from magiclens_core.learning.learner import TrainParts, check_training_precision
from magiclens_core.model.config import NAMED_CONFIGS
from magiclens_core.model.precision import Precision

SUMMARY_FILE = "summary.json"
# Fault-injection for tests: a worker process dies once at this step (only in an attempt that started from 0).
FAULT_ENV = "MAGICLENS_TRAIN_KILL_AT_STEP"


@dataclass
class TrainConfig:
    """Options of `python -m jobs.train` (flags, or a YAML/JSON file given with --config)."""

    triplets: str = field(metadata={"help": "Parquet or Lance triplets: query_image, instruction, target_image"})
    init: str = field(metadata={"help": "base | large | tiny | config .json | official .pkl | model folder"})
    name: str = field(metadata={"help": "run name; rerunning the same name resumes it"})
    storage: str = field(default="runs", metadata={"help": "folder (or URI) of runs"})
    backbone: str | None = field(default=None, metadata={"help": "open_clip tag or local file for a named size"})
    export: str | None = field(default=None, metadata={"help": "model folder to export to (default: run/model)"})
    workers: int = field(default=2, metadata={"help": "training workers"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs reserved per worker"})
    batch_size: int = field(default=64, metadata={"help": "triplets per worker per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    steps: int | None = field(default=None, metadata={"help": "optimiser steps (overrides epochs)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the triplets, when steps is not set"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps, then cosine decay"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "final learning rate as a fraction of the peak"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (not on 1-D parameters)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm; 0 disables"})
    precision: Precision = field(default="auto", metadata={"help": "auto: bf16 on CUDA, fp32 on CPU; no fp16"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute tower activations"})
    train_parts: TrainParts = field(default="all", metadata={"help": "all | head | last_blocks"})
    last_blocks: int = field(default=2, metadata={"help": "blocks of each tower that train with last_blocks"})
    temperature: float = field(default=0.02, metadata={"help": "softmax temperature (initial if learned)"})
    learn_temperature: bool = field(default=False, metadata={"help": "learn the temperature"})
    query_negatives: bool = field(default=True, metadata={"help": "query images with '' as negatives"})
    gather_with_grad: bool = field(default=True, metadata={"help": "all-gather negatives with gradient"})
    crop_min: float = field(default=1.0, metadata={"help": "random square crop of this..1 of the side; 1 = none"})
    shuffle_buffer: int = field(default=1024, metadata={"help": "rows in each worker's local shuffle buffer"})
    cache_decoded_mb: int = field(default=1024, metadata={
        "help": "decoded triplets up to this size are decoded once and kept in Ray's object store for every "
                "epoch (not with crop_min < 1); 0 decodes on every pass"})
    validation: str | None = field(default=None, metadata={"help": "retrieval-set folder or held-out triplets"})
    validate_every: int = field(default=0, metadata={"help": "steps between validations (0: every checkpoint)"})
    validation_batch_size: int = field(default=64, metadata={"help": "Embedder batch size for validation"})
    validation_cpus: float = field(default=1.0, metadata={"help": "CPUs of the validation task"})
    validation_gpus: float = field(default=0.0, metadata={"help": "GPUs of the validation task"})
    checkpoint_every: int = field(default=500, metadata={"help": "steps between checkpoints"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept (best by validation R@1)"})
    max_failures: int = field(default=3, metadata={"help": "worker-group restarts from the last checkpoint"})
    log_every: int = field(default=50, metadata={"help": "steps between progress lines"})
    seed: int = field(default=0, metadata={"help": "seed of the initial weights"})

    def __post_init__(self) -> None:
        positive = ("workers", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.steps is not None and self.steps < 1:
            raise ValueError("steps must be at least 1")
        if self.steps is None and self.epochs <= 0:
            raise ValueError("give steps, or epochs above 0")
        if not 0 < self.crop_min <= 1:
            raise ValueError("crop_min must be in (0, 1]")
        if self.cache_decoded_mb < 0:
            raise ValueError("cache_decoded_mb must be 0 or more")
        if self.validate_every % self.checkpoint_every:
            raise ValueError("validate_every must be a multiple of checkpoint_every (validation runs on checkpoints)")
        check_training_precision(self.precision)


def demand(config: TrainConfig) -> Demand:
    """What a run reserves at once: the workers', the validation task's, and one CPU for Ray Data's decoding
    (a local Ray gets at least this many logical CPUs, so data tasks never wait behind the workers)."""
    validation = config.validation_cpus if config.validation else 0.0
    gpus = (config.workers if config.use_gpu else 0) + (config.validation_gpus if config.validation else 0.0)
    return Demand(cpus=math.ceil(config.workers * config.cpus_per_worker + validation) + 1, gpus=gpus,
                  flags="--workers, --cpus-per-worker or --validation-cpus (GPUs: --use-gpu, --validation-gpus)")


def check_inputs(config: TrainConfig) -> None:
    """The triplets, the validation set and a model given by path exist (before Ray starts)."""
    require_paths(config, "triplets", "validation")
    if config.init not in NAMED_CONFIGS:
        require_paths(config, "init")


def total_steps(config: TrainConfig, count_rows: Callable[[], int]) -> int:
    """Optimiser steps of the run: `steps`, or `epochs` over the triplets at the global batch size
    (`count_rows` is only called then)."""
    if config.steps is not None:
        return config.steps
    rows = count_rows()
    per_epoch = rows // (config.batch_size * config.workers * config.grad_accum)
    if per_epoch < 1:
        raise ValueError(f"{rows} triplets are fewer than one global batch "
                         f"({config.batch_size} x {config.workers} workers x {config.grad_accum} accumulation)")
    return max(1, math.floor(per_epoch * config.epochs))


def fits_decoded_cache(config: TrainConfig, image_size: int) -> bool:
    """Whether the decoded triplets fit `cache_decoded_mb` (and decoding is the same every epoch); counts at
    most one row past what fits, so a large corpus is not read to find out."""
    if config.crop_min < 1.0:
        return False
    fits = config.cache_decoded_mb * 2**20 // decoded_row_bytes(image_size)
    return fits > 0 and read_triplets(config.triplets).limit(fits + 1).count() <= fits


def run(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume, or recognise a finished run) and export; returns the summary."""

    storage = storage_path(config)
    remote = "://" in storage
    if config.export is None and remote:
        raise ValueError("give --export (a local folder) when the storage is remote")
    run_dir = Path(storage) / config.name
    exported = Path(config.export).resolve() if config.export else run_dir / MODEL_DIR
    total = total_steps(config, read_triplets(config.triplets).count)
    summary_path = run_dir / SUMMARY_FILE
    if summary_path.is_file():
        finished = json.loads(summary_path.read_text())
        if finished["steps"] >= total and Path(finished["model"]).is_dir():
            return {**finished, "already_finished": True}
    model = initial_model(config.init, config.backbone, config.seed)
    fault = os.environ.get(FAULT_ENV)
    dataset = training_dataset(config.triplets, model.image_size, crop_min=config.crop_min)
    if fits_decoded_cache(config, model.image_size):
        dataset = dataset.materialize()  # later epochs reread the decoded rows, not the files
    finished = build_trainer(config, dataset, total, model, int(fault) if fault else None).fit()
    result = stored_result(finished)
    model_id = export_model(best_checkpoint(result)[0], exported)
    summary = summarize(result, config, exported, model_id, run_dir, total)
    if not remote:
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse options, check the inputs, connect to Ray (sized by `demand`), train, print and return the summary."""
    return run_job(TrainConfig, run, argv, description=__doc__.splitlines()[0], prog="python -m jobs.train",
                   demand=demand, check_inputs=check_inputs)


if __name__ == "__main__":
    main()
