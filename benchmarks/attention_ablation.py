"""The paper's attention ablation at our scale: evaluate runs trained with 3d / temporal / 2d.

Train the three runs first with the same budget (one Hydra multirun; see benchmarks/README.md):

    .venv/bin/python jobs/train.py -m model=tiny_init 'model.attention_mode=3d,temporal,2d' \
        'run.name=ablation-${model.attention_mode}' trainer.max_steps=1000 ...

then score each final pipeline with identical settings:

    .venv/bin/python benchmarks/attention_ablation.py --runs outputs/runs \
        --names ablation-3d ablation-temporal ablation-2d

Per run: cross-view consistency on colour-open captions ("a cube": share of 4-view sets whose
views all agree on the colour, and of agreeing view pairs), and on held-out single-primitive
captions colour accuracy and silhouette IoU against ground-truth renders
(mvdream_platform.evaluation), plus the run's training cost and final loss from its
tracking/metrics.jsonl. Writes results/attention_ablation.json, prints a markdown table and
saves each run's sample grids under --grids.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mvdream_platform import storage
from mvdream_platform.evaluation import (
    EvalReport,
    EvalSettings,
    evaluate,
    open_colour_consistency,
    score_open_sets,
)
from mvdream_platform.pipelines import MVDreamPipeline
from mvdream_platform.tracking import read_metrics

RESULTS = Path(__file__).resolve().parent / "results"


def training_record(run: Path, tail_steps: int) -> dict:
    """Final loss (mean over the last ``tail_steps`` steps' windows), cost per step, wall time."""
    metrics = read_metrics(run / "tracking")
    if not metrics:
        raise FileNotFoundError(f"{run}/tracking/metrics.jsonl is missing or empty")
    last = metrics[-1]["step"]
    tail = [m for m in metrics if m["step"] > last - tail_steps]
    return {"steps": last, "final_loss": statistics.mean(m["loss"] for m in tail),
            "step_time_s": statistics.median(m["step_time_s"] for m in metrics),
            "images_per_s": statistics.median(m["images_per_s"] for m in metrics)}


def score(name: str, run: Path, settings: EvalSettings, grids: Path) -> dict:
    pipe = MVDreamPipeline.from_pretrained(run / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    mode = pipe.unet.attention_mode
    start = time.perf_counter()
    report, grid = evaluate(pipe, settings)
    open_grid = open_colour_consistency(pipe, settings, report)
    storage.write_bytes(grids / name / "grid.png", storage.encode_png(grid))
    storage.write_bytes(grids / name / "open_colour_grid.png", storage.encode_png(open_grid))
    storage.write_json(grids / name / "report.json", report.to_json())
    return {"run": name, "attention_mode": mode, **training_record(run, tail_steps=100),
            "open_colour_sets": report.open_colour_sets,
            "open_colour_agreement": report.open_colour_agreement,
            "open_colour_pairwise": report.open_colour_pairwise,
            "open_colour_object_views": report.open_colour_object_views,
            "objects": report.objects, "colour_accuracy": report.colour_accuracy,
            "mean_iou": report.mean_iou, "mean_iou_raw": report.mean_iou_raw,
            "eval_seconds": time.perf_counter() - start}


def rescore(name: str, run: Path, settings: EvalSettings, grids: Path) -> dict:
    """Score a run again from its saved samples (report.json + open_colour_grid.png), e.g.
    after a metric fix, without sampling again: the images are the same, only the scoring runs."""
    import numpy as np
    from PIL import Image

    saved = json.loads((grids / name / "report.json").read_text())
    grid = np.asarray(Image.open(grids / name / "open_colour_grid.png")).astype(np.float32) / 255
    size = grid.shape[1] // settings.num_views
    sets = [grid[r * size:(r + 1) * size].reshape(size, settings.num_views, size, 3).transpose(1, 0, 2, 3)
            for r in range(grid.shape[0] // size)]
    report = EvalReport()
    score_open_sets([s["caption"] for s in saved["per_open_set"]], sets, settings, report)
    saved.update({k: getattr(report, k) for k in ("open_colour_sets", "open_colour_agreement",
                                                  "open_colour_pairwise", "open_colour_object_views",
                                                  "per_open_set")})
    storage.write_json(grids / name / "report.json", saved)
    mode = json.loads((run / "pipeline" / "unet" / "config.json").read_text())["attention_mode"]
    return {"run": name, "attention_mode": mode, **training_record(run, tail_steps=100),
            **{k: saved[k] for k in ("open_colour_sets", "open_colour_agreement", "open_colour_pairwise",
                                     "open_colour_object_views", "objects", "colour_accuracy", "mean_iou",
                                     "mean_iou_raw")}, "rescored": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="outputs/runs", help="the runs' storage_path")
    parser.add_argument("--names", nargs="+", default=["ablation-3d", "ablation-temporal", "ablation-2d"])
    parser.add_argument("--num-objects", type=int, default=40)
    parser.add_argument("--open-colour-sets", type=int, default=4, help="4-view sets per shape")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--grids", default="outputs/ablation")
    parser.add_argument("--out", default=str(RESULTS / "attention_ablation.json"))
    parser.add_argument("--rescore", action="store_true",
                        help="score the samples saved under --grids again instead of sampling")
    args = parser.parse_args()

    torch.set_num_threads(2)
    settings = EvalSettings(num_objects=args.num_objects, steps=args.steps,
                            guidance_scale=args.guidance_scale,
                            open_colour_sets=args.open_colour_sets)
    rows = []
    for name in args.names:
        scorer = rescore if args.rescore else score
        rows.append(scorer(name, Path(args.runs) / name, settings, Path(args.grids)))
        print(json.dumps(rows[-1]), flush=True)

    print("\n| attention | steps | final loss | views showing an object | colour-open sets agreeing "
          "| view pairs agreeing | colour correct | silhouette IoU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['attention_mode']} | {r['steps']} | {r['final_loss']:.4f} | {r['open_colour_object_views']:.1%} | "
              f"{r['open_colour_agreement']:.1%} ({r['open_colour_sets']}) | {r['open_colour_pairwise']:.1%} | "
              f"{r['colour_accuracy']:.1%} | {r['mean_iou']:.3f} |")
    record = {"benchmark": "attention_ablation", "date": time.strftime("%Y-%m-%d"),
              "settings": {"num_objects": args.num_objects, "open_colour_sets_per_shape": args.open_colour_sets,
                           "steps": args.steps, "guidance_scale": args.guidance_scale,
                           "views": settings.num_views, "elevation": settings.elevation},
              "runs": rows}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
