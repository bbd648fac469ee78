"""Evaluate a multi-view model on held-out procedural captions against ground-truth renders.

    python jobs/evaluate.py model=trained model.path=outputs/runs/tiny/pipeline out=outputs/eval/tiny

Writes `report.json` (colour accuracy per view, silhouette IoU aligned and raw, per object)
and `grid.png` (each object's generated views above its ground truth) into `out`. With
`consistency_sets=N` it also runs the multi-view consistency benchmark
(`mvdream_platform.evaluation.consistency`: colour-open, layout-open and marked captions, N
4-view sets each, views sampled jointly and independently): `consistency.json` and one grid per
kind and arm (`consistency_<kind>_<arm>.png`).
"""

from __future__ import annotations

import _starting  # noqa: F401  (its first line, before the heavy imports below)

# isort: split
import logging

import hydra
from omegaconf import DictConfig

from mvdream_platform import storage
from mvdream_platform.evaluation import EvalSettings, evaluate
from mvdream_platform.evaluation.consistency import ConsistencySettings, run_consistency
from mvdream_platform.pipelines.loading import build_pipeline, pick_device

from _common import model_config_from, save_resolved_config

log = logging.getLogger("evaluate")


def run(cfg: DictConfig) -> dict:
    settings = EvalSettings(**{k: cfg[k] for k in EvalSettings.__dataclass_fields__ if k in cfg})
    model_cfg = model_config_from(cfg.model)
    pipe = build_pipeline(model_cfg, device=pick_device(cfg.device), seed=cfg.seed)
    save_resolved_config(cfg, cfg.out)
    report, grid = evaluate(pipe, settings)
    record = report.to_json() | {"model": {"name": model_cfg.name, "path": model_cfg.path,
                                           "trained": model_cfg.trained}}
    if cfg.consistency_sets > 0:
        consistency, grids = run_consistency(pipe, ConsistencySettings(
            sets=cfg.consistency_sets, num_views=settings.num_views, elevation=settings.elevation,
            steps=settings.steps, guidance_scale=settings.guidance_scale, resolution=settings.resolution,
            batch_prompts=settings.batch_prompts, seed=settings.seed, shape_seed=settings.shape_seed))
        storage.write_json(storage.join(cfg.out, "consistency.json"), consistency.to_json())
        for name, image in grids.items():
            storage.write_bytes(storage.join(cfg.out, f"consistency_{name}.png"), storage.encode_png(image))
        record["consistency"] = {kind: {"rates": k.rates, "margin": k.margin, "margin_interval": k.margin_interval}
                                 for kind, k in consistency.kinds.items()}
        log.info("multi-view consistency (joint vs views sampled alone):\n%s", consistency.table())
    storage.write_json(storage.join(cfg.out, "report.json"), record)
    storage.write_bytes(storage.join(cfg.out, "grid.png"), storage.encode_png(grid))
    log.info("%d objects, %d views: colour accuracy %.3f (ground truth %.3f), silhouette IoU "
             "%.3f aligned / %.3f raw -> %s", report.objects, report.views, report.colour_accuracy,
             report.gt_colour_accuracy, report.mean_iou, report.mean_iou_raw, cfg.out)
    return record


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
