"""Text-to-3D by multi-view score distillation into a NeRF (paper §3.2).

    python jobs/text_to_3d.py prompt="a red cube" steps=400 seed=0 model=tiny out=outputs/red_cube
    python jobs/text_to_3d.py prompt="a red cube" guidance_kind=dreamfusion ...   # the 2D baseline
    python jobs/text_to_3d.py sds=reference model=mvdream_official model.path=/models/mvdream-sd21 prompt="an astronaut riding a horse"
    python jobs/text_to_3d.py -m seed=0,1 hydra/launcher=ray_tasks   # a sweep: mvdream_platform.sweeps

``model`` is a name from conf/model/ (tiny, sd21_base, ...) or an MVDreamPipeline folder
(path or fsspec URI; rewritten to ``model=trained model.path=...`` before Hydra composes). Writes mesh.{glb,obj,ply}, turntable.{gif,mp4}, multiview.png, metrics.json and
resumable field checkpoints into ``out``; rerunning with the same ``out`` resumes. With
``score=true`` (default), prompts of the procedural vocabulary ("a red cube", "a red cube with a
yellow front") are scored against their ground truth (views, 3D geometry, the Janus verdict:
:class:`mvdream_platform.evaluation.text_to_3d.ProceduralScorer`), adding quality.png (and
janus.png for marked prompts). Prints every file it wrote.
"""

from __future__ import annotations

import _starting  # noqa: F401  (its first line, before the heavy imports below)

# isort: split
import logging
import zlib
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mvdream_platform import storage, sweeps
from mvdream_platform.evaluation.text_to_3d import ProceduralScorer, headline
from mvdream_platform.pipelines.loading import build_pipeline, pick_device
from mvdream_platform.sds.config import SDSConfig, TextTo3DSettings
from mvdream_platform.sds.pipeline import TextTo3DResult, run_text_to_3d
from mvdream_platform.threads import set_torch_threads
from mvdream_platform.tracking import start_tracking, tracking_dir

from _common import model_config_from, save_resolved_config, warn_unknown_words

log = logging.getLogger("text_to_3d")

# What each file of the output folder is (printed after the run).
FILES = {
    "config.yaml": "the resolved job config",
    "mesh.glb": "mesh, binary glTF (+y up) with vertex colours",
    "mesh.obj": "mesh, OBJ (z up) with vertex colours",
    "mesh.ply": "mesh, binary PLY (z up) with vertex colours",
    "turntable.gif": "360-degree turntable of the albedo, looping GIF",
    "turntable.mp4": "360-degree turntable of the albedo, H.264",
    "multiview.png": "4 views 90 degrees apart, from the front",
    "quality.png": "held-out views: the NeRF (top) against the ground truth (bottom)",
    "janus.png": "the Janus orbit (16 views from the front): the NeRF (top), the ground truth (bottom)",
    "metrics.json": "the run record: steps, seconds, final losses, assets, quality",
    "checkpoints/": "the field's checkpoints (rerun with the same out= to resume)",
    "tracking/": "the run's tracking: metrics.jsonl, renders, W&B offline run",
}


def sds_config_from(cfg: DictConfig) -> SDSConfig:
    """The job's SDSConfig: its ``sds``, ``steps``, ``guidance`` and ``guidance_scale``."""
    return TextTo3DSettings.of_run(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)).config()


def run(cfg: DictConfig) -> TextTo3DResult:
    threads = set_torch_threads(cfg.threads)
    sds = sds_config_from(cfg)
    print(f"text-to-3d: {sds.steps} steps at {sds.cameras.resolution} px on {threads} CPU thread"
          f"{'' if threads == 1 else 's'} (threads=N to change; on a shared machine give each job its own cores)",
          flush=True)
    model = model_config_from(cfg.model)
    warn_unknown_words(model, [cfg.prompt])
    device = pick_device(cfg.device)
    pipe = build_pipeline(model, device=device, seed=cfg.seed)
    pipe.set_progress_bar_config(disable=True)
    save_resolved_config(cfg, cfg.out)
    name = Path(str(cfg.out).rstrip("/")).name
    tracker = start_tracking(mode=cfg.logger.mode, project=cfg.logger.project, run_name=f"t23d-{name}",
                             group=cfg.group, config=OmegaConf.to_container(cfg, resolve=True),
                             dir=tracking_dir(cfg.out, name), job_type="text_to_3d",
                             # one W&B run per output folder, continued when the job resumes
                             resume_id=f"t23d-{zlib.crc32(str(cfg.out).encode()):08x}")
    try:
        result = run_text_to_3d(cfg.prompt, pipe, sds, cfg.out, seed=cfg.seed, device=device,
                                tracker=tracker, progress=cfg.progress,
                                scorer=ProceduralScorer() if cfg.score else None)
        if result.quality is not None:  # flat numbers beside the run's final loss
            tracker.summary(headline(result.quality))
    finally:
        tracker.finish()
    print(f"wrote {cfg.out}:")
    for name, description in FILES.items():
        if name in result.assets or storage.exists(storage.join(cfg.out, name.rstrip("/"))):
            print(f"  {name:<14} {description}")
    if "mesh_error" in result.assets:
        print(f"  (no mesh: {result.assets['mesh_error']})")
    if result.quality is not None:
        print(quality_line(result.quality))
    elif cfg.score:
        print(f"no ground truth for {cfg.prompt!r} (not a prompt of the procedural vocabulary): no quality scores")
    return result


def quality_line(quality: dict) -> str:
    """One line: the scores against ground truth, the Janus verdict beside IoU for marked prompts."""
    h = headline(quality)
    line = f"vs ground truth ({quality['object']}): silhouette IoU {h['iou']:.3f} (raw {h['iou_raw']:.3f})"
    janus = quality.get("janus")
    if janus is not None:
        side = ""
        if janus["verdict"] == "single":
            side = f", {'at the front' if janus['front_correct'] else 'not at the front'} (centre {janus['centre']:+.0f} deg)"
        line += f", Janus: {janus['verdict']}{side}"
    line += f", colour correct {100 * h['colour_accuracy']:.0f}%, volume IoU {h['volume_iou']:.3f}"
    if h["chamfer"] is not None:
        line += f", Chamfer {h['chamfer']:.3f}"
    genus, truth = quality["genus"], quality["genus_truth"]
    line += f", genus {'?' if genus is None else genus} (truth {truth})"
    if quality["geometry"].get("error"):
        line += f" [{quality['geometry']['error']}]"
    return line


@hydra.main(config_path="../conf", config_name="text_to_3d", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:  # -m: each job its own folder, <sweep dir>/<job num>
        cfg.out = sweeps.job_out(cfg.out, hydra_cfg.overrides.task, hydra_cfg.runtime.output_dir)
    return run(cfg)


if __name__ == "__main__":
    main()
