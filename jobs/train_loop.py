"""Distributed contrastive training of MagicLens on Ray Train (v2): the per-worker loop, checkpoints,
their validation and the export of the best one. `jobs.train` holds the options and runs it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from magiclens_core import Embedder, MagicLens, MagicLensConfig, load_model, save_model
from magiclens_core.evaluation.evaluator import retrieval_set_recall
from magiclens_core.evaluation.retrieval_set import read_retrieval_set
from magiclens_core.learning.learner import Learner

if TYPE_CHECKING:
    from jobs.train import TrainConfig

MODEL_DIR = "model"
STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
SCORE = "val_recall@1"


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

    config: TrainConfig = loop_config["config"]
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
    """Recall@1/5/10 in percent of a checkpoint's model on the validation set (a Ray task), exactly as
    `jobs.evaluate --benchmark synthetic` scores it."""
    with checkpoint.as_directory() as folder:
        embedder = Embedder.load(Path(folder) / MODEL_DIR, batch_size=batch_size)
    return {f"val_{name}": value for name, value in retrieval_set_recall(embedder, validation).items()}


def export_model(checkpoint, destination: Path) -> str:
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


def stored_result(finished):
    """The run as stored, where the last checkpoint's validation (finished at shutdown) is recorded too. Ray
    Train's note that it found the run's snapshot (true, and expected here) is kept out of the output."""
    import logging

    import ray.train

    manager_log = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
    level = manager_log.level
    manager_log.setLevel(logging.WARNING)
    try:
        return ray.train.Result.from_path(finished.path, storage_filesystem=finished.filesystem)
    finally:
        manager_log.setLevel(level)


def _validated(result) -> list[tuple[Any, dict[str, Any]]]:
    return [(c, m) for c, m in result.best_checkpoints or [] if not math.isnan(m.get(SCORE, math.nan))]


def best_checkpoint(result) -> tuple[Any, dict[str, Any]]:
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


def summarize(result, config: TrainConfig, exported: Path, model_id: str, run_dir: Path,
              total: int) -> dict[str, Any]:
    """The run's summary (the job's output): its steps and loss, the exported model and its validation."""
    _, best = best_checkpoint(result)
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
        train_loop_config={"config": config, "total_steps": total, "fault_step": fault_step,
                           "initial_model": ray.put((model.config.to_dict(), model.state_dict()))},
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu,
                                               resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=config.name, storage_path=storage_path(config),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.keep_checkpoints,
                checkpoint_score_attribute=SCORE if config.validation else None)),
        datasets={"train": dataset},
        validation_config=_validation_config(config),
    )


def storage_path(config: TrainConfig) -> str:
    """Where the run's storage is, as Ray Train wants it: an absolute local path or a URI."""
    return config.storage if "://" in config.storage else str(Path(config.storage).resolve())
