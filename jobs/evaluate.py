"""Evaluate a multi-view model on held-out procedural captions against ground-truth renders.

    python jobs/evaluate.py model=trained model.path=outputs/runs/tiny/pipeline out=outputs/eval/tiny

Writes `report.json` (colour accuracy per view, silhouette IoU aligned and raw, per object)
and `grid.png` (each object's generated views above its ground truth) into `out`. With
`open_colour_sets=N` (default 4) it also samples N 4-view sets of each colour-open caption
("a cube") and scores cross-view colour agreement (`open_colour_grid.png`).
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from mvdream_platform import storage
from mvdream_platform.evaluation import EvalSettings, evaluate, open_colour_consistency
from mvdream_platform.pipelines.loading import build_pipeline, pick_device

from _common import expand_model_argv, model_config_from, save_resolved_config

log = logging.getLogger("evaluate")


def run(cfg: DictConfig) -> dict:
    settings = EvalSettings(**{k: cfg[k] for k in EvalSettings.__dataclass_fields__ if k in cfg})
    model_cfg = model_config_from(cfg.model)
    pipe = build_pipeline(model_cfg, device=pick_device(cfg.device), seed=cfg.seed)
    save_resolved_config(cfg, cfg.out)
    report, grid = evaluate(pipe, settings)
    if settings.open_colour_sets > 0:
        open_grid = open_colour_consistency(pipe, settings, report)
        storage.write_bytes(storage.join(cfg.out, "open_colour_grid.png"), storage.encode_png(open_grid))
    record = report.to_json() | {"model": {"name": model_cfg.name, "path": model_cfg.path,
                                           "trained": model_cfg.trained}}
    storage.write_json(storage.join(cfg.out, "report.json"), record)
    storage.write_bytes(storage.join(cfg.out, "grid.png"), storage.encode_png(grid))
    log.info("%d objects, %d views: colour accuracy %.3f (ground truth %.3f), silhouette IoU "
             "%.3f aligned / %.3f raw -> %s", report.objects, report.views, report.colour_accuracy,
             report.gt_colour_accuracy, report.mean_iou, report.mean_iou_raw, cfg.out)
    if report.open_colour_agreement is not None:
        log.info("colour-open captions: %d sets, all views agree in %.3f, view pairs agree %.3f",
                 report.open_colour_sets, report.open_colour_agreement, report.open_colour_pairwise)
    return record


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    expand_model_argv()
    main()
