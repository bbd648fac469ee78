"""Ray Train wiring: one TorchTrainer for 2 CPU workers or 32 GPUs, by configuration alone."""

from __future__ import annotations

import logging
import os
from typing import Any

from .. import storage
from ..cluster import ensure_ray
from .config import TrainJobConfig
from .loop import PIPELINE_DIR, make_loader, run_dir, train_loop_per_worker

log = logging.getLogger(__name__)


def build_trainer(cfg: TrainJobConfig):
    """A Ray Train V2 ``TorchTrainer`` for ``cfg`` (not started)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cluster = cfg.cluster
    resources = {"CPU": cluster.cpus_per_worker}
    if cluster.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
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
    workers = max(1, cfg.cluster.num_workers)
    try:  # lists both datasets the way the workers will; the last rank gets the fewest items
        make_loader(cfg, rank=workers - 1, world=workers, start_micro_step=0)
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"training data: {error}") from error


def run_training(cfg: TrainJobConfig) -> dict[str, Any]:
    """Check the inputs, start (or join) Ray, train, and return a summary of the run."""
    absolute_local_paths(cfg)
    preflight(cfg)
    ensure_ray(num_cpus=None)
    result = build_trainer(cfg).fit()
    summary = {
        "run": run_dir(cfg),
        "pipeline": storage.join(run_dir(cfg), PIPELINE_DIR),
        "metrics": dict(result.metrics or {}),
        "checkpoint": None if result.checkpoint is None else result.checkpoint.path,
    }
    storage.write_json(storage.join(run_dir(cfg), "train_summary.json"), summary)
    return summary
