"""The multi-view consistency benchmark (issue 16 §3) on one or more models.

    .venv/bin/python benchmarks/consistency.py                       # the embedded default
    .venv/bin/python benchmarks/consistency.py --models 3d=outputs/runs/ablation-3d/pipeline \
        2d=outputs/runs/ablation-2d/pipeline --out benchmarks/results/consistency_ablation.json

Per model and kind (colour-open "a cube", layout-open "a red cube next to a blue sphere",
marked "a red cube with a yellow front"; see mvdream_platform.evaluation.consistency): the
share of 4-view sets that agree (marked: that put the marker where it belongs) when the views
are sampled jointly, the same when each view is sampled alone from the same noise (the model's
own chance level), the margin between them, all with 95% bootstrap intervals, and the metric's
check on ground-truth renders. Writes the JSON record, prints a markdown table per model and
saves sample grids (first 16 sets, one set per row) under --grids.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mvdream_platform import storage
from mvdream_platform.evaluation.consistency import ConsistencySettings, run_consistency
from mvdream_platform.pipelines import MVDreamPipeline

from machine_info import describe

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[f"tiny={ROOT.parent / 'checkpoints' / 'tiny'}"],
                        help="LABEL=PIPELINE_FOLDER ...")
    parser.add_argument("--sets", type=int, default=200, help="4-view sets per kind and arm")
    parser.add_argument("--kinds", nargs="+", default=list(ConsistencySettings.kinds))
    parser.add_argument("--steps", type=int, default=30, help="DDIM steps")
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grids", default=str(RESULTS / "consistency"))
    parser.add_argument("--out", default=str(RESULTS / "consistency.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    machine = describe()
    settings = ConsistencySettings(sets=args.sets, kinds=tuple(args.kinds), steps=args.steps,
                                   guidance_scale=args.guidance_scale)
    models = {}
    for spec in args.models:
        label, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--models takes LABEL=PIPELINE_FOLDER, got {spec!r}")
        pipe = MVDreamPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        began = time.perf_counter()
        report, grids = run_consistency(pipe, settings)
        seconds = time.perf_counter() - began
        for name, grid in grids.items():
            storage.write_bytes(storage.join(args.grids, label, f"{name}.png"), storage.encode_png(grid))
        record = report.to_json()
        models[label] = {"path": path, "attention_mode": pipe.unet.config.attention_mode,
                         "seconds": round(seconds, 1), "kinds": record["kinds"]}
        print(f"\n## {label} ({path}, {seconds:.0f} s)\n\n{report.table()}")
        for kind, kind_report in report.kinds.items():
            print(f"{kind}: metric on ground truth {kind_report.truth_check}, views showing an "
                  f"object {kind_report.object_views}")
    out = {"benchmark": "consistency", "date": time.strftime("%Y-%m-%d"), "machine": machine,
           "settings": record["settings"], "models": models}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
