"""The paper's attention ablation at our scale: evaluate runs trained with 3d / temporal / 2d.

Train the three runs first with the same budget (one Hydra multirun; see benchmarks/README.md):

    .venv/bin/python jobs/train.py -m model=tiny_init 'model.attention_mode=3d,temporal,2d' \
        'run.name=ablation-${model.attention_mode}' trainer.max_steps=1000 ...

then score each final pipeline with identical settings:

    .venv/bin/python benchmarks/attention_ablation.py --runs outputs/runs \
        --names ablation-3d ablation-temporal ablation-2d

Per run: the multi-view consistency benchmark (mvdream_platform.evaluation.consistency:
colour-open, layout-open and marked captions, views sampled jointly against each view sampled
alone, with 95% bootstrap intervals), and on held-out single-primitive captions colour accuracy
and silhouette IoU against ground-truth renders (mvdream_platform.evaluation), plus the run's
training cost and final loss from its tracking/metrics.jsonl. Writes
results/attention_ablation_grammar2.json (results/attention_ablation.json is the run on the
grammar-1 world, with the old colour-open score), prints a markdown table and saves each run's
sample grids under --grids.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mvdream_platform import storage
from mvdream_platform.evaluation import EvalSettings, evaluate
from mvdream_platform.evaluation.consistency import ConsistencySettings, run_consistency
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


def score(name: str, run: Path, settings: EvalSettings, consistency: ConsistencySettings,
          grids: Path) -> dict:
    pipe = MVDreamPipeline.from_pretrained(run / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    mode = pipe.unet.attention_mode
    start = time.perf_counter()
    report, grid = evaluate(pipe, settings)
    storage.write_bytes(grids / name / "grid.png", storage.encode_png(grid))
    storage.write_json(grids / name / "report.json", report.to_json())
    agreement, samples = run_consistency(pipe, consistency)
    storage.write_json(grids / name / "consistency.json", agreement.to_json())
    for kind, image in samples.items():
        storage.write_bytes(grids / name / f"consistency_{kind}.png", storage.encode_png(image))
    return {"run": name, "attention_mode": mode, "camera_mode": pipe.unet.config.camera_mode,
            **training_record(run, tail_steps=100),
            "consistency": {kind: {"rates": k.rates, "intervals": k.intervals, "margin": k.margin,
                                   "margin_interval": k.margin_interval, "object_views": k.object_views}
                            for kind, k in agreement.kinds.items()},
            "objects": report.objects, "colour_accuracy": report.colour_accuracy,
            "mean_iou": report.mean_iou, "mean_iou_raw": report.mean_iou_raw,
            "eval_seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="outputs/runs", help="the runs' storage_path")
    parser.add_argument("--names", nargs="+", default=["ablation-3d", "ablation-temporal", "ablation-2d"])
    parser.add_argument("--num-objects", type=int, default=40)
    parser.add_argument("--sets", type=int, default=200, help="consistency: 4-view sets per kind and arm")
    parser.add_argument("--kinds", nargs="+", default=None,
                        help="consistency kinds (default: all of colour, layout, marker)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--grids", default="outputs/ablation")
    parser.add_argument("--out", default=str(RESULTS / "attention_ablation_grammar2.json"))
    args = parser.parse_args()

    torch.set_num_threads(2)
    settings = EvalSettings(num_objects=args.num_objects, steps=args.steps,
                            guidance_scale=args.guidance_scale)
    consistency = ConsistencySettings(sets=args.sets, steps=args.steps, guidance_scale=args.guidance_scale,
                                      **({"kinds": tuple(args.kinds)} if args.kinds else {}))
    rows = []
    for name in args.names:
        rows.append(score(name, Path(args.runs) / name, settings, consistency, Path(args.grids)))
        print(json.dumps(rows[-1]), flush=True)

    kinds = list(consistency.kinds)
    print("\n| attention | steps | final loss | " + " | ".join(
        f"{k}: joint / chance (margin)" for k in kinds) + " | colour correct | silhouette IoU |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in kinds) + " | --- | --- |")
    for r in rows:
        cells = []
        for kind in kinds:
            c = r["consistency"][kind]
            lo, hi = c["margin_interval"]
            cells.append(f"{c['rates']['joint']:.1%} / {c['rates']['independent']:.1%} "
                         f"({c['margin']:+.1%} [{lo:+.1%}, {hi:+.1%}])")
        print(f"| {r['attention_mode']} | {r['steps']} | {r['final_loss']:.4f} | " + " | ".join(cells)
              + f" | {r['colour_accuracy']:.1%} | {r['mean_iou']:.3f} |")
    record = {"benchmark": "attention_ablation", "date": time.strftime("%Y-%m-%d"),
              "settings": {"num_objects": args.num_objects, "consistency_sets": args.sets,
                           "consistency_kinds": list(consistency.kinds),
                           "steps": args.steps, "guidance_scale": args.guidance_scale,
                           "views": settings.num_views, "elevation": settings.elevation},
              "runs": rows}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
