"""Multi-view DreamBooth (paper §3.3): fine-tune a multi-view model on one subject.

    python jobs/dreambooth.py subject.uri=../shared/data/meshes/Duck.glb subject.class_noun=toy
    python jobs/dreambooth.py subject.uri=s3://bucket/my_dog/ subject.kind=images \
        model=mvdream_official model.path=/models/mvdream-sd21 cluster=single_gpu data.resolution=256
    python jobs/generate.py model=trained model.path=outputs/dreambooth/dreambooth-sks/pipeline prompt="a sks toy"
    python jobs/text_to_3d.py model=trained model.path=outputs/dreambooth/dreambooth-sks/pipeline prompt="a sks toy"

The subject's meshes are rendered into a multi-view set with cameras (or its images become
2D text-image shards), all captioned with the identifier prompt; then the ordinary Ray Train
loop fine-tunes with the diffusion loss plus the parameter-preservation loss
``lambda * distance(theta, theta_0) / N_theta``; optional prior data (``prior.uri``, e.g. the
model's own text-image training data) takes ``prior.fraction`` of the steps. Rerunning with
the same run.name resumes.
Writes <run>/pipeline and <run>/dreambooth.json (prompt, subject, settings).
"""

from __future__ import annotations

import _starting  # noqa: F401  (its first line, before the heavy imports below)

# isort: split
import logging
from dataclasses import asdict

import hydra
from omegaconf import DictConfig, OmegaConf

from mvdream_platform import storage
from mvdream_platform.config import build
from mvdream_platform.data.dreambooth import (
    PriorConfig,
    SubjectConfig,
    check_prior,
    detect_kind,
    mixture_settings,
    prepare_subject,
)
from mvdream_platform.training.config import TrainJobConfig
from mvdream_platform.training.trainer import run_training

from _common import save_resolved_config

log = logging.getLogger("dreambooth")


def training_config(cfg: DictConfig, subject_data: dict, prior: PriorConfig) -> TrainJobConfig:
    """The training run of this DreamBooth job: the subject's data (and prior data), preservation on."""
    values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    data = dict(values["data"], name="dreambooth",
                **mixture_settings(subject_data["kind"], subject_data["uri"], prior))
    trainer = dict(values["trainer"], preservation_weight=values["preservation"]["weight"],
                   preservation_distance=values["preservation"]["distance"])
    samples = dict(values["samples"], captions=[subject_data["prompt"]])
    job = TrainJobConfig.from_dict({"model": values["model"], "data": data, "trainer": trainer,
                                    "cluster": values["cluster"], "run": values["run"],
                                    "logger": values["logger"], "samples": samples})
    return job


def run(cfg: DictConfig) -> dict:
    subject = build(SubjectConfig, OmegaConf.to_container(cfg.subject, resolve=True), "subject")
    prior = build(PriorConfig, OmegaConf.to_container(cfg.prior, resolve=True), "prior")
    check_prior(detect_kind(subject)[0], prior)  # a config error now, not after the rendering
    run_folder = storage.join(cfg.run.storage_path, cfg.run.name)
    save_resolved_config(cfg, run_folder)
    subject_data = prepare_subject(subject, storage.join(run_folder, "subject"), cfg.data.resolution)
    job = training_config(cfg, subject_data, prior)
    summary = run_training(job)
    record = {"prompt": subject_data["prompt"], "identifier": subject.identifier,
              "class_noun": subject.class_noun, "subject": subject.uri, "subject_kind": subject_data["kind"],
              "subject_records": subject_data["records"], "preservation": dict(cfg.preservation),
              "prior": asdict(prior),
              "steps": job.trainer.max_steps, "base_model": OmegaConf.to_container(cfg.model, resolve=True),
              "pipeline": summary["pipeline"], "final_metrics": summary["metrics"]}
    storage.write_json(storage.join(run_folder, "dreambooth.json"), record)
    print(f"pipeline: {summary['pipeline']}\nprompt: {subject_data['prompt']!r}")
    return record


@hydra.main(config_path="../conf", config_name="dreambooth", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
