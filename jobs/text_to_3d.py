"""Text-to-3D by multi-view score distillation into a NeRF (paper §3.2).

    python jobs/text_to_3d.py prompt="a red cube" steps=400 seed=0 model=tiny out=outputs/red_cube
    python jobs/text_to_3d.py prompt="a red cube" guidance=dreamfusion ...   # the 2D baseline
    python jobs/text_to_3d.py sds=reference model=/models/mvdream-sd21 prompt="an astronaut riding a horse"
    python jobs/text_to_3d.py -m seed=0,1 hydra/launcher=ray_tasks   # a sweep: mvdream_platform.sweeps

``model`` is a name from conf/model/ (tiny, sd21_base, ...) or an MVDreamPipeline folder
(path or fsspec URI; rewritten to ``model=trained model.path=...`` before Hydra composes). Writes mesh.{glb,obj,ply}, turntable.{gif,mp4}, multiview.png, metrics.json and
resumable field checkpoints into ``out``; rerunning with the same ``out`` resumes.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mvdream_platform import storage, sweeps
from mvdream_platform.pipelines.loading import build_pipeline, pick_device
from mvdream_platform.sds.config import SDSConfig, sds_config_for
from mvdream_platform.sds.pipeline import run_text_to_3d
from mvdream_platform.tracking import start_tracking

from _common import expand_model_argv, model_config_from, save_resolved_config

log = logging.getLogger("text_to_3d")

def sds_config_from(cfg: DictConfig) -> SDSConfig:
    return sds_config_for(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))


def run(cfg: DictConfig) -> dict:
    sds = sds_config_from(cfg)
    sds.validate()
    model = model_config_from(cfg.model)
    device = pick_device(cfg.device)
    pipe = build_pipeline(model, device=device, seed=cfg.seed)
    pipe.set_progress_bar_config(disable=True)
    save_resolved_config(cfg, cfg.out)
    name = Path(str(cfg.out).rstrip("/")).name
    # W&B writes local files: inside `out` when it is local, else under outputs/wandb/.
    local = storage.local_path(cfg.out) if storage.is_local(cfg.out) else str(Path("outputs", "wandb", name))
    tracker = start_tracking(mode=cfg.logger.mode, project=cfg.logger.project, run_name=f"t23d-{name}",
                             group=cfg.group, config=OmegaConf.to_container(cfg, resolve=True),
                             dir=str(Path(local) / "tracking"), job_type="text_to_3d",
                             # one W&B run per output folder, continued when the job resumes
                             resume_id=f"t23d-{zlib.crc32(str(cfg.out).encode()):08x}")
    try:
        record = run_text_to_3d(cfg.prompt, pipe, sds, cfg.out, seed=cfg.seed, device=device,
                                tracker=tracker, progress=cfg.progress)
    finally:
        tracker.finish()
    for name in ("mesh.glb", "turntable.gif"):
        if name in record["assets"]:
            print(f"{name}: {record['assets'][name]}")
    print(f"metrics: {storage.join(cfg.out, 'metrics.json')}")
    if "quality" in record:
        q = record["quality"]
        log.info("vs ground truth (%s): silhouette IoU %.3f (raw %.3f), colour correct %.0f%%",
                 q["object"], q["mean_iou"], q["mean_iou_raw"], 100 * q["colour_accuracy"])
    return record


@hydra.main(config_path="../conf", config_name="text_to_3d", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:  # -m: each job its own folder, <sweep dir>/<job num>
        cfg.out = sweeps.job_out(cfg.out, hydra_cfg.overrides.task, hydra_cfg.runtime.output_dir)
    return run(cfg)


if __name__ == "__main__":
    expand_model_argv()
    main()
