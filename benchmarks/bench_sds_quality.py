"""Text-to-3D quality on the embedded default: multi-view SDS against the DreamFusion baseline.

For single-primitive prompts of the procedural vocabulary, runs the real text-to-3D code
(``mvdream_platform.sds.pipeline.run_text_to_3d``, conf/sds/tiny.yaml) with the shipped tiny
model twice per prompt and seed, same budget: ``guidance=mvdream`` (4 views 90 degrees apart
through the model's 3D attention and camera conditioning) and ``guidance=dreamfusion`` (the
same model one view at a time, 2D attention, no camera, view-dependent prompt suffixes). Each
NeRF is rendered at 8 held-out orbit views and scored against ground-truth renders of the
prompt's object: aligned silhouette IoU and dominant-colour accuracy. Targets (multi-view):
IoU >= 0.6, colour right in >= 90% of views. The untrained field (the density "blob") is
scored too, as the floor every number should be read against: a compact blob already
overlaps a compact object well once both are cropped to their boxes (aligned IoU), so the raw
IoU (same cameras, same pixels) is the stricter shape measure. Writes
results/sds_quality.json and prints a table; every run's assets stay under --out.

    .venv/bin/python benchmarks/bench_sds_quality.py [--steps 400] [--seeds 0] [--prompts ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mvdream_platform.pipelines import MVDreamPipeline
from mvdream_platform.sds.config import SDSConfig
from mvdream_platform.sds.optimize import build_scene
from mvdream_platform.sds.pipeline import run_text_to_3d, score_against_truth

from machine_info import describe

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["a red cube", "a blue sphere", "a green cylinder", "a yellow cone", "a purple torus",
           "an orange pyramid"]


def sds_config(kind: str, steps: int) -> SDSConfig:
    values = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "sds" / "tiny.yaml"), resolve=True)
    values["steps"], values["guidance_kind"] = steps, kind
    return SDSConfig.from_dict(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--prompts", nargs="+", default=PROMPTS)
    parser.add_argument("--model", default=str(REPO / "checkpoints" / "tiny"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="outputs/bench_sds_quality")
    parser.add_argument("--json", default=str(RESULTS / "sds_quality.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    rows = []
    for prompt in args.prompts:
        for seed in args.seeds:
            floor = score_against_truth(build_scene(sds_config("mvdream", 1), seed=seed), sds_config("mvdream", 1), prompt)
            rows.append({"prompt": prompt, "seed": seed, "guidance": "init (blob, 0 steps)",
                         "iou": floor["mean_iou"], "iou_raw": floor["mean_iou_raw"],
                         "colour_accuracy": floor["colour_accuracy"],
                         "colours": [v["colour"] for v in floor["views"]], "seconds": 0.0, "out": None})
            for kind in ("mvdream", "dreamfusion"):  # interleaved: drift hits both alike
                pipe = MVDreamPipeline.from_pretrained(args.model)  # fresh: guidance freezes it
                pipe.set_progress_bar_config(disable=True)
                out = str(Path(args.out) / f"{kind}-{prompt.replace(' ', '_')}-s{seed}")
                record = run_text_to_3d(prompt, pipe, sds_config(kind, args.steps), out, seed=seed,
                                        progress=False)
                q = record["quality"]
                rows.append({"prompt": prompt, "seed": seed, "guidance": kind, "iou": q["mean_iou"],
                             "iou_raw": q["mean_iou_raw"], "colour_accuracy": q["colour_accuracy"],
                             "colours": [v["colour"] for v in q["views"]],
                             "seconds": record["total_seconds"], "out": out})
                print(json.dumps(rows[-1]), flush=True)

    summary = {}
    for kind in ("mvdream", "dreamfusion", "init (blob, 0 steps)"):
        mine = [r for r in rows if r["guidance"] == kind]
        summary[kind] = {"runs": len(mine), "mean_iou": statistics.mean(r["iou"] for r in mine),
                         "mean_iou_raw": statistics.mean(r["iou_raw"] for r in mine),
                         "colour_accuracy": statistics.mean(r["colour_accuracy"] for r in mine),
                         "seconds_per_run": statistics.median(r["seconds"] for r in mine)}
    print("\n| prompt | seed | guidance | silhouette IoU (aligned / raw) | colour correct |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['prompt']} | {r['seed']} | {r['guidance']} | {r['iou']:.3f} / {r['iou_raw']:.3f} | "
              f"{r['colour_accuracy']:.0%} |")
    for kind, s in summary.items():
        print(f"| **mean** | | **{kind}** | **{s['mean_iou']:.3f}** / {s['mean_iou_raw']:.3f} | "
              f"**{s['colour_accuracy']:.0%}** |")
    record = {"benchmark": "sds_quality", "date": time.strftime("%Y-%m-%d"),
              "machine": describe(threads=args.threads),
              "settings": {"steps": args.steps, "seeds": args.seeds, "sds_config": "conf/sds/tiny.yaml",
                           "model": "checkpoints/tiny", "views_scored": 8},
              "targets": {"iou": 0.6, "colour_accuracy": 0.9}, "summary": summary, "runs": rows}
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
