"""Does a model place the front marker on objects it was trained on? (issue 16 diagnostic)

The consistency benchmark's marker kind scores held-out objects, so a model at chance there may
fit its training set and fail to generalise, or fail to fit at all. This samples jointly (4
views at MVDream azimuths 0 / 90 / 180 / 270) the first ``--objects`` single-part marked
objects of the training world itself (``make_object(i, seed, p_front=...)``, as
``jobs/prepare_data.py source=shapes front_share=...`` made them, captions that name every
attribute) and scores them with the benchmark's marker metric:

    .venv/bin/python benchmarks/marker_fit.py --models tiny=checkpoints/tiny --front-share 0.6

Reports the share of sets with the marker in the right views and the marker colour's share of
the object per view (the truth is about 80 / 1 / 0 / 1%).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mvdream_platform.data.shapes import make_object
from mvdream_platform.evaluation.consistency import (
    ConsistencySettings,
    render_truth,
    sample_sets,
    score_marker_set,
)
from mvdream_platform.pipelines import MVDreamPipeline

from machine_info import describe

ROOT = Path(__file__).resolve().parent


def training_marked_objects(count: int, seed: int, front_share: float) -> list:
    """The first ``count`` single-part marked objects of the training world, fully captioned."""
    objects, index = [], 0
    while len(objects) < count:
        obj = make_object(index, seed, p_front=front_share)
        index += 1
        attributes = obj.attributes
        if attributes["relation"] is None and attributes["parts"][0]["front"] and not attributes["open"]:
            objects.append(obj)
    return objects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[f"tiny={ROOT.parent / 'checkpoints' / 'tiny'}"])
    parser.add_argument("--objects", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0, help="the training world's shape seed")
    parser.add_argument("--front-share", type=float, default=0.6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "marker_fit.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = ConsistencySettings(sets=args.objects, steps=args.steps)
    objects = training_marked_objects(args.objects, args.seed, args.front_share)
    rows = []
    for spec in args.models:
        label, _, path = spec.partition("=")
        pipe = MVDreamPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        sets = sample_sets(pipe, [o.caption for o in objects], settings, "joint", seed=0)
        scores = [score_marker_set(views, render_truth(o, settings, pipe.default_size), o, settings)
                  for o, views in zip(objects, sets)]
        row = {"label": label, "path": path,
               "marker_placed": float(np.mean([s["ok"] for s in scores])),
               "marker_share_per_view": np.mean([s["shares"] for s in scores], 0).round(4).tolist(),
               "truth_share_per_view": np.mean([s["truth_shares"] for s in scores], 0).round(4).tolist()}
        rows.append(row)
        print(f"{label}: marker in the right views in {row['marker_placed']:.1%} of {len(objects)} "
              f"training objects; marker share per view {row['marker_share_per_view']} "
              f"(truth {row['truth_share_per_view']})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "marker_fit", "date": time.strftime("%Y-%m-%d"), "machine": describe(),
        "settings": {"objects": len(objects), "seed": args.seed, "front_share": args.front_share,
                     "steps": args.steps, "guidance_scale": settings.guidance_scale,
                     "captions": [o.caption for o in objects]}, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
