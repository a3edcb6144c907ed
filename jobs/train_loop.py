"""Distributed contrastive training of MagicLens on Ray Train (v2): the options, the per-worker loop,
checkpoint validation and export.

Layout under `STORAGE/NAME/`: Ray Train's checkpoints (`checkpoint_<step>/` with `model/`, a model
folder, and `train_state.pt`), the exported `model/` and `summary.json` once the run has finished.
Rerunning the same name resumes from the latest checkpoint (Ray Train restores the run from its
storage); rerunning a finished run prints its summary without starting workers (with remote storage,
where no summary file is kept, the workers restore the final checkpoint and stop at once).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from jobs.stages.triplets import read_triplets, training_dataset
from magiclens_core import Embedder, MagicLens, MagicLensConfig, load_model, save_model
from magiclens_core.evaluation.retrieval_set import evaluate_retrieval, read_retrieval_set
from magiclens_core.learning.learner import Learner, Precision, TrainParts, initial_model

MODEL_DIR = "model"
STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
SUMMARY_FILE = "summary.json"
SCORE = "val_recall@1"
# Fault-injection for tests: a worker process dies once at this step (only in an attempt that started from 0).
FAULT_ENV = "MAGICLENS_TRAIN_KILL_AT_STEP"

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Options of `python -m jobs.train` (flags, or a YAML/JSON file given with --config)."""

    triplets: str = field(metadata={"help": "Parquet or Lance triplets: query_image, instruction, target_image"})
    init: str = field(metadata={"help": "base | large | tiny | config .json | official .pkl | model folder"})
    name: str = field(metadata={"help": "run name; rerunning the same name resumes it"})
    storage: str = field(default="runs", metadata={"help": "folder (or URI) of runs"})
    backbone: str | None = field(default=None, metadata={"help": "open_clip tag or local file for base/large"})
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
    precision: Precision = field(default="auto", metadata={"help": "auto: bf16 autocast on CUDA, fp32 on CPU"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute tower activations"})
    train_parts: TrainParts = field(default="all", metadata={"help": "all | head | last_blocks"})
    last_blocks: int = field(default=2, metadata={"help": "blocks of each tower that train with last_blocks"})
    temperature: float = field(default=0.02, metadata={"help": "softmax temperature (initial if learned)"})
    learn_temperature: bool = field(default=False, metadata={"help": "learn the temperature"})
    query_negatives: bool = field(default=True, metadata={"help": "query images with '' as negatives"})
    gather_with_grad: bool = field(default=True, metadata={"help": "all-gather negatives with gradient"})
    crop_min: float = field(default=1.0, metadata={"help": "random square crop of this..1 of the side; 1 = none"})
    shuffle_buffer: int = field(default=1024, metadata={"help": "rows in each worker's local shuffle buffer"})
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
        if self.validate_every % self.checkpoint_every:
            raise ValueError("validate_every must be a multiple of checkpoint_every (validation runs on checkpoints)")


def cpus_needed(config: TrainConfig) -> int:
    """Logical CPUs a run needs at least: the workers', the validation task's, and one for Ray Data's
    decoding (a local Ray gets at least this many, so data tasks never wait behind the workers)."""
    validation = config.validation_cpus if config.validation else 0.0
    return math.ceil(config.workers * config.cpus_per_worker + validation) + 1


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


# ---------------------------------------------------------------- per-worker loop


def _micro_batch_groups(shard, config: TrainConfig) -> Iterator[list[dict[str, torch.Tensor]]]:
    """One epoch of this worker's shard as groups of `grad_accum` micro-batches."""
    batches = iter(shard.iter_torch_batches(batch_size=config.batch_size, drop_last=True,
                                            local_shuffle_buffer_size=config.shuffle_buffer or None))
    while True:
        group = list(islice(batches, config.grad_accum))
        if len(group) < config.grad_accum:
            return
        yield group


def _initial(initial_ref) -> MagicLens:
    """The initial model the driver built (one build for all workers, identical weights everywhere)."""
    import ray

    config, state = ray.get(initial_ref)
    model = MagicLens(MagicLensConfig.from_dict(config))
    model.load_state_dict(state)
    return model


def _learner(config: TrainConfig, total: int, initial_ref) -> tuple[Learner, dict[str, Any]]:
    """This worker's learner and data position: from the run's latest checkpoint, else from the start."""
    import ray.train
    import ray.train.torch

    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint is None:
        model = _initial(initial_ref)
    else:
        with checkpoint.as_directory() as folder:
            model = load_model(Path(folder) / MODEL_DIR)
            state = torch.load(Path(folder) / STATE_FILE, weights_only=True)
    learner = Learner(
        model, device=ray.train.torch.get_device(), lr=config.lr, weight_decay=config.weight_decay,
        warmup_steps=min(config.warmup_steps, total), total_steps=total, min_lr_ratio=config.min_lr_ratio,
        temperature=config.temperature, learn_temperature=config.learn_temperature,
        query_negatives=config.query_negatives, gather_with_grad=config.gather_with_grad,
        grad_clip=config.grad_clip, precision=config.precision, grad_checkpointing=config.grad_checkpointing,
        train_parts=config.train_parts, last_blocks=config.last_blocks)
    position = {"epoch": 0, "step_in_epoch": 0, "elapsed_s": 0.0, "history": []}
    if state is not None:
        learner.load_state_dict(state)
        position = state["position"]
    learner.wrap(ray.train.torch.prepare_model)
    return learner, position


class _Interval:
    """Losses and step times since the last report; training wall time (reports included) in `position`."""

    def __init__(self, position: dict[str, Any]) -> None:
        self.position = position
        self.losses: list[torch.Tensor] = []
        self.step_times: list[float] = []
        self.step_clock = self.wall_clock = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        now = time.perf_counter()
        self.losses.append(loss)
        self.step_times.append(now - self.step_clock)
        self.position["elapsed_s"] += now - self.wall_clock
        self.step_clock = self.wall_clock = now

    def mean_loss(self, last: int | None = None) -> float:
        return float(torch.stack(self.losses[-last if last else 0:]).mean())

    def reset(self) -> None:
        self.losses.clear()
        self.step_times.clear()
        self.step_clock = time.perf_counter()  # step times leave the checkpoint out; elapsed keeps it


def _report(learner: Learner, config: TrainConfig, position: dict[str, Any], interval: _Interval,
            start_step: int, total: int) -> None:
    """Report this interval's metrics with a checkpoint (written by rank 0), validated when due."""
    import ray.train

    context = ray.train.get_context()
    step = learner.step
    metrics = {"step": step, "epoch": position["epoch"], "loss": interval.mean_loss(), "lr": learner.lr,
               "temperature": learner.temperature, "elapsed_s": position["elapsed_s"], "start_step": start_step,
               "step_time_s": statistics.median(interval.step_times),
               "triplets_seen": step * config.batch_size * config.grad_accum * context.get_world_size()}
    position["history"].append({k: metrics[k] for k in ("step", "elapsed_s", "loss", "lr", "temperature")})
    validate = config.validation is not None and (step % (config.validate_every or config.checkpoint_every) == 0
                                                  or step == total)
    if validate:
        metrics[SCORE] = float("nan")  # replaced by the validation task's result
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if context.get_world_rank() == 0:
            save_model(learner.model, Path(folder) / MODEL_DIR, metadata={"step": step, "run": config.name})
            torch.save({**learner.state_dict(), "position": position}, Path(folder) / STATE_FILE)
            (Path(folder) / HISTORY_FILE).write_text(json.dumps(position["history"]))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:08d}",
                         validation=validate and checkpoint is not None)
    interval.reset()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker: resume or initialise, then train to `total_steps`, checkpointing as it goes."""
    import ray.train

    config = TrainConfig(**loop_config["options"])
    total = loop_config["total_steps"]
    context = ray.train.get_context()
    learner, position = _learner(config, total, loop_config["initial_model"])
    start_step = learner.step
    last_rank = context.get_world_rank() == context.get_world_size() - 1
    dies_at = loop_config.get("fault_step") if start_step == 0 and last_rank else None
    shard = ray.train.get_dataset_shard("train")
    interval = _Interval(position)
    while learner.step < total:
        stepped = False
        for group in islice(_micro_batch_groups(shard, config), position["step_in_epoch"], None):
            interval.add(learner.train_step(group))
            position["step_in_epoch"] += 1
            stepped = True
            if learner.step == dies_at:
                os._exit(1)  # a hard worker death, as when a node is lost
            if learner.step % config.log_every == 0 and context.get_world_rank() == 0:
                print(f"step {learner.step}/{total} loss {interval.mean_loss(config.log_every):.4f} "
                      f"lr {learner.lr:.2e}", flush=True)
            if learner.step % config.checkpoint_every == 0 or learner.step == total:
                _report(learner, config, position, interval, start_step, total)
            if learner.step >= total:
                break
        else:
            if not stepped and position["step_in_epoch"] == 0:
                raise RuntimeError("an epoch gave no complete batch: too few usable triplets for the batch size")
            position.update(epoch=position["epoch"] + 1, step_in_epoch=0)


# ---------------------------------------------------------------- validation and export


def validate_checkpoint(checkpoint, validation: str, batch_size: int) -> dict[str, float]:
    """Recall@1/5/10 of a checkpoint's model on the validation set, through the `Embedder` (a Ray task)."""
    retrieval_set = read_retrieval_set(validation)
    with checkpoint.as_directory() as folder:
        embedder = Embedder.load(Path(folder) / MODEL_DIR, batch_size=batch_size)
    return {f"val_{name}": value for name, value in evaluate_retrieval(embedder, retrieval_set).items()}


def _export(checkpoint, destination: Path) -> str:
    """Copy a checkpoint's model folder to `destination` (replacing it as a whole); returns its model id."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}."))
    try:
        with checkpoint.as_directory() as folder:
            shutil.copytree(Path(folder) / MODEL_DIR, staging / MODEL_DIR)
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(staging / MODEL_DIR, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_model(destination).model_id  # it loads as it will in the index job and the server


def _validated(result) -> list[tuple[Any, dict[str, Any]]]:
    return [(c, m) for c, m in result.best_checkpoints or [] if not math.isnan(m.get(SCORE, math.nan))]


def _best(result) -> tuple[Any, dict[str, Any]]:
    """The checkpoint to export and its metrics: best validation R@1 when validated, else the latest."""
    validated = _validated(result)
    if validated:
        return max(validated, key=lambda item: (item[1][SCORE], item[1]["step"]))
    return result.checkpoint, result.metrics


def _history(result) -> list[dict[str, Any]]:
    """Every report of the run (loss, lr, time), with validation results where the checkpoint is kept."""
    with result.checkpoint.as_directory() as folder:
        history = json.loads((Path(folder) / HISTORY_FILE).read_text())
    validated = {metrics["step"]: metrics for _, metrics in _validated(result)}
    for point in history:
        point.update({k: v for k, v in validated.get(point["step"], {}).items() if k.startswith("val_")})
    return history


def _summary(result, config: TrainConfig, exported: Path, model_id: str, run_dir: Path,
             total: int) -> dict[str, Any]:
    _, best = _best(result)
    return {
        "run": str(run_dir), "steps": result.metrics["step"], "total_steps": total,
        "final_loss": result.metrics["loss"], "resumed_from_step": result.metrics["start_step"],
        "best_val_recall@1": best.get(SCORE), "best_val_recall@5": best.get("val_recall@5"),
        "best_val_recall@10": best.get("val_recall@10"), "exported_step": best["step"],
        "model": str(exported), "model_id": model_id,
        "train_seconds": result.metrics["elapsed_s"], "workers": config.workers,
        "triplets_seen": result.metrics["triplets_seen"], "history": _history(result),
    }


def _validation_config(config: TrainConfig):
    import ray.train

    if config.validation is None:
        return None
    path = str(Path(config.validation).resolve())
    read_retrieval_set(path)  # fail now, not in the first validation task
    return ray.train.ValidationConfig(
        fn=validate_checkpoint,
        task_config=ray.train.ValidationTaskConfig(
            fn_kwargs={"validation": path, "batch_size": config.validation_batch_size}),
        ray_remote_kwargs={"num_cpus": config.validation_cpus, "num_gpus": config.validation_gpus})


def build_trainer(config: TrainConfig, dataset, total: int, model: MagicLens, fault_step: int | None = None):
    """The `TorchTrainer` of a run: `dataset` yields decoded rows (`training_dataset`), `model` is the
    initial model (used unless the run's storage holds a checkpoint)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"options": asdict(config), "total_steps": total, "fault_step": fault_step,
                           "initial_model": ray.put((model.config.to_dict(), model.state_dict()))},
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu,
                                               resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=config.name, storage_path=_storage(config),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.keep_checkpoints,
                checkpoint_score_attribute=SCORE if config.validation else None)),
        datasets={"train": dataset},
        validation_config=_validation_config(config),
    )


def _storage(config: TrainConfig) -> str:
    """Ray Train wants an absolute local path or a URI."""
    return config.storage if "://" in config.storage else str(Path(config.storage).resolve())


def run_training(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume, or recognise a finished run) and export; returns the summary."""
    import ray
    import ray.train

    storage = _storage(config)
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
    cluster_cpus = ray.cluster_resources().get("CPU", 0)
    if cluster_cpus < cpus_needed(config):
        logger.warning("the cluster has %s CPUs now; this run needs %s (workers, validation and data decoding): "
                       "it waits until the cluster grows (or lower --workers/--cpus-per-worker)",
                       cluster_cpus, cpus_needed(config))
    model = initial_model(config.init, config.backbone, config.seed)
    fault = os.environ.get(FAULT_ENV)
    dataset = training_dataset(config.triplets, model.image_size, crop_min=config.crop_min)
    finished = build_trainer(config, dataset, total, model, int(fault) if fault else None).fit()
    # the run as stored, where the last checkpoint's validation (finished at shutdown) is recorded too
    result = ray.train.Result.from_path(finished.path, storage_filesystem=finished.filesystem)
    best_checkpoint, _ = _best(result)
    summary = _summary(result, config, exported, _export(best_checkpoint, exported), run_dir, total)
    if not remote:
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary
