"""Joint multi-view fine-tuning on Ray Train (the paper's 70/30 mixture).

    python jobs/train.py cluster=local_cpu model=tiny data=shapes data.uri=data/shapes_mv \
        data.image_uri=data/shapes_2d trainer.max_steps=2000 run.name=tiny

starts a local Ray cluster in-process. On an existing cluster (see README for token auth):

    ray job submit --working-dir . -- python jobs/train.py cluster=a100x32 ...

Rerunning with the same run.name resumes from the latest complete checkpoint. The trained
model is written as an MVDreamPipeline folder to <run.storage_path>/<run.name>/pipeline.
"""

from __future__ import annotations

import _starting  # noqa: F401  (its first line, before the heavy imports below)

# isort: split
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from mvdream_platform import storage
from mvdream_platform.training.config import TrainJobConfig
from mvdream_platform.training.trainer import run_training

from _common import save_resolved_config

log = logging.getLogger("train")


def run(cfg: DictConfig) -> dict:
    """Train; returns the run summary (run folder, pipeline folder, last metrics)."""
    values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    values.pop("hydra", None)
    job = TrainJobConfig.from_dict(values)
    save_resolved_config(cfg, storage.join(job.run.storage_path, job.run.name))
    summary = run_training(job)
    log.info("run %s finished: %s; pipeline at %s", job.run.name, summary["metrics"], summary["pipeline"])
    return summary


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
