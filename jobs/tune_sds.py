"""Ray Tune sweep of text-to-3D hyper-parameters: each trial is one jobs/text_to_3d.py run.

    python jobs/tune_sds.py name=first-sweep                       # embedded default, local Ray
    python jobs/tune_sds.py tune=reference sds=reference model=mvdream_official model.path=/models/mvdream-sd21 steps=10000 \
        name=sd21 storage_path=s3://bucket/sweeps                 # GPUs: one per trial
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"excludes": ["/.venv", "/data", "/outputs", "/wandb", "/.git"]}' \
        -- python jobs/tune_sds.py name=... storage_path=/shared/sweeps

The search space and Tune settings are conf/tune/<name>.yaml (``tune=``); every text_to_3d
override is the trials' common base. ASHA stops poor trials early on a ground-truth-free score
(how much the prompt lowers the prior's denoising error on the NeRF's renders); rerunning with the same ``name`` resumes an
interrupted sweep. Writes <storage_path>/<name>/: results.{csv,parquet,md}, best.yaml (run it with
``python jobs/text_to_3d.py --config-dir <storage_path>/<name> --config-name best``),
best_overrides.txt, summary.json and trials/<trial_id>/ (each trial's assets).
On a cluster started with ``ray start --head`` token authentication is on: give the client the
token (``RAY_AUTH_MODE=token``) as for jobs/train.py. Under ``ray job submit`` give an absolute
``storage_path`` on storage every node shares (or a URI): a relative one would land in the job's
temporary copy of the working dir. Plain ``python jobs/tune_sds.py`` starts a local cluster.
"""

from __future__ import annotations

import _starting  # noqa: F401  (its first line, before the heavy imports below)

# isort: split
import logging
from dataclasses import asdict
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from mvdream_platform import storage
from mvdream_platform.pipelines.loading import REPO_ROOT
from mvdream_platform.tune.sweep import SweepConfig, run_sweep

from _common import model_config_from

log = logging.getLogger("tune_sds")

RUN_KEYS = ("prompt", "seed", "steps", "guidance_kind", "guidance_scale", "device")


def _absolute(path: str | None, keep_repo_relative: bool = False) -> str | None:
    """Local relative paths -> absolute (trials run in other folders); URIs as they are."""
    if keep_repo_relative and path and storage.is_local(path) and (REPO_ROOT / path).exists():
        return path  # resolved against the installed source tree on every node
    return storage.absolute(path)


def sweep_config_from(cfg: DictConfig) -> SweepConfig:
    """The composed config -> :class:`SweepConfig` (the trials' base is the text_to_3d part)."""
    values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    run = {key: values[key] for key in RUN_KEYS} | {"sds": values["sds"]}
    # The trials build their SDSConfig from this dict through TextTo3DSettings.of_run, as
    # jobs/text_to_3d.py does from the same keys of the same composed config.
    model = asdict(model_config_from(cfg.model))
    model["path"] = _absolute(model.get("path"), keep_repo_relative=True)
    tune = values["tune"]
    if (tune.get("objective") or {}).get("clip_model"):
        tune["objective"]["clip_model"] = _absolute(tune["objective"]["clip_model"])
    return SweepConfig.from_tune_dict(
        tune, name=cfg.name, storage_path=_absolute(cfg.storage_path), run=run, model=model,
        logger_mode=cfg.logger.mode, logger_project=cfg.logger.project, group=cfg.group)


def run(cfg: DictConfig) -> dict:
    """Run or resume the sweep; returns its summary (also in <sweep>/summary.json)."""
    config = sweep_config_from(cfg)
    summary = run_sweep(config)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary["counts"].items()))
    log.info("sweep %s: %d trials (%s)%s", config.name, summary["trials"], counts,
             "; interrupted: rerun with the same name to resume" if summary["interrupted"] else "")
    print(f"results: {summary['files']['md']}")
    best = summary["best"]
    if best is None:
        log.warning("no trial finished: no best config")
    else:
        print(f"best trial {best['trial_id']} ({config.metric} = {best[config.metric]:.4g}): "
              f"{summary['files']['best_yaml']}")
        print(f"  python jobs/text_to_3d.py --config-dir {Path(summary['sweep_dir'])} --config-name best")
    return summary


@hydra.main(config_path="../conf", config_name="tune_sds", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
