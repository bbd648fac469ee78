"""Ray Train wiring: one TorchTrainer for 2 CPU workers or 32 GPUs, by configuration alone."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

from .. import storage
from ..cluster import ensure_ray
from ..data.shards import is_sharded
from .config import TrainJobConfig
from .loop import PIPELINE_DIR, make_loader, run_checkpoints, run_dir, train_loop_per_worker

log = logging.getLogger(__name__)


def build_trainer(cfg: TrainJobConfig):
    """A Ray Train V2 ``TorchTrainer`` for ``cfg`` (not started)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cluster = cfg.cluster
    resources = {"CPU": cluster.cpus_per_worker}
    if cluster.use_gpu:
        resources["GPU"] = 1
    data = {}
    if cfg.data.loader == "ray_data":
        from ray.train import DataConfig

        from ..data.ray_ingest import build_datasets

        step, epochs = resume_position(cfg)
        micro = cfg.trainer.grad_accumulation
        data = {"datasets": build_datasets(cfg.data, seed=cfg.trainer.seed,
                                           steps=(cfg.trainer.max_steps - step) * micro,
                                           world=cluster.num_workers, start_epochs=epochs,
                                           cpus_per_task=cfg.data.ingest_cpus_per_task),
                "dataset_config": DataConfig(datasets_to_split="all")}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        **data,
        scaling_config=ScalingConfig(num_workers=cluster.num_workers, use_gpu=cluster.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cluster.placement_strategy),
        torch_config=TorchConfig(backend=cluster.backend),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
        ),
    )


def resume_position(cfg: TrainJobConfig) -> tuple[int, dict[str, int]]:
    """(step, {kind: epoch}) of the run's newest intact checkpoint, (0, {}) for a new run: where
    the Ray Data streams start again (the epoch the run had reached, not epoch 0)."""
    from .checkpointing import CorruptCheckpoint, verify_checkpoint

    if not storage.exists(run_dir(cfg)):
        return 0, {}
    for checkpoint in run_checkpoints(cfg):
        try:
            verify_checkpoint(checkpoint.path)
            state = storage.read_json(storage.join(checkpoint.path, "state.json"))
        except (CorruptCheckpoint, OSError, ValueError):
            continue
        epochs = ((state.get("loader") or {}).get("stats") or {}).get("epoch") or {}
        return int(state["step"]), {k: int(v) for k, v in epochs.items()}
    return 0, {}


def absolute_local_paths(cfg: TrainJobConfig) -> None:
    """Make local relative paths absolute: Ray workers do not share the driver's cwd."""

    cfg.data.uri, cfg.data.image_uri = storage.absolute(cfg.data.uri), storage.absolute(cfg.data.image_uri)
    cfg.run.storage_path = storage.absolute(cfg.run.storage_path)
    if cfg.model.path and storage.is_local(cfg.model.path) and os.path.exists(cfg.model.path):
        cfg.model.path = storage.absolute(cfg.model.path)


def preflight(cfg: TrainJobConfig) -> None:
    """Fail now, in the driver, on what no retry can fix: data folders that are missing or
    hold nothing readable, a model folder that is not there. Ray Train retries a worker's error
    ``run.max_failures`` times, which only helps against lost workers."""
    model = cfg.model
    if model.source in ("pipeline", "sd") and storage.is_local(model.path) and not os.path.exists(
            storage.local_path(model.path)):
        raise ValueError(f"model.path {model.path!r} does not exist (model.source={model.source!r})")
    bias = cfg.trainer.timestep_bias_range
    if bias is not None and bias[1] > (steps := _train_timesteps(model)):
        raise ValueError(f"trainer.timestep_bias_range {list(bias)} reaches past the model's "
                         f"{steps} training timesteps")
    workers = max(1, cfg.cluster.num_workers)
    # lists both datasets the way the map-style workers would (Ray Data's are built by the
    # trainer); the last rank gets the fewest items
    listing = replace(cfg, data=replace(cfg.data, loader="mixture"))
    try:
        make_loader(listing, rank=workers - 1, world=workers, start_micro_step=0)
        if cfg.data.loader == "ray_data" and cfg.data.uri and not is_sharded(cfg.data.uri):
            raise ValueError(f"data.loader=ray_data streams parquet shards; {cfg.data.uri!r} is a "
                             "folder layout: convert it (jobs/prepare_data.py mode=shard)")
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"training data: {error}") from error


def _train_timesteps(model) -> int:
    """T of the schedule the run will train on: ``model.scheduler``'s value, else a saved
    folder's scheduler config, else SD's 1000."""
    given = (model.scheduler or {}).get("num_train_timesteps")
    if given is not None:
        return int(given)
    if model.source in ("pipeline", "sd") and model.path:
        saved = storage.join(model.path, "scheduler", "scheduler_config.json")
        if storage.exists(saved):
            return int(storage.read_json(saved).get("num_train_timesteps", 1000))
    return 1000


def run_training(cfg: TrainJobConfig) -> dict[str, Any]:
    """Check the inputs, start (or join) Ray, train, and return a summary of the run."""
    absolute_local_paths(cfg)
    preflight(cfg)
    # Ray Data's read and decode tasks need CPUs beside the training workers': a local cluster
    # gets a few logical CPUs more than the machine has (they share its cores).
    extra = 2 if cfg.data.loader == "ray_data" else 0
    ensure_ray(num_cpus=(os.cpu_count() or 1) + extra if extra else None)
    result = build_trainer(cfg).fit()
    summary = {
        "run": run_dir(cfg),
        "pipeline": storage.join(run_dir(cfg), PIPELINE_DIR),
        "metrics": dict(result.metrics or {}),
        "checkpoint": None if result.checkpoint is None else result.checkpoint.path,
    }
    storage.write_json(storage.join(run_dir(cfg), "train_summary.json"), summary)
    return summary
