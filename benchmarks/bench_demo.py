"""Wall time of `make demo`'s job (jobs/text_to_3d.py on the embedded default), today's settings
against the fast ones, side by side in one invocation.

Each arm runs the real job in a fresh interpreter (``python jobs/text_to_3d.py ...``), as
``make demo`` does, so the time includes interpreter start, imports, loading the model, the offline W&B run,
optimising, exporting the mesh / turntable / views and scoring against the ground truth:

* ``today``: the 2026-12-04 default (400 steps, every stratified sample reaches the field,
  schedules fixed at 400 steps, an 8-level hash grid): ``steps=400 sds.schedule_steps=null
  sds.render.skip_empty_space=false sds.field.n_levels=8``;
* ``fast``: the shipped default (conf/text_to_3d.yaml and conf/sds/tiny.yaml as they are).

Arms alternate over ``--repeats`` rounds (drift in machine load hits both alike). Per run it
records the wall time, the job's own split (``metrics.json``: optimise seconds, total seconds)
and its scores (silhouette IoU, colour, volume IoU, the Janus verdict). Needs an otherwise idle
machine (the load average at start is recorded).

    .venv/bin/python benchmarks/bench_demo.py [--repeats 1] [--arms today fast] [--threads 2]
        [--prompt "a red cube with a yellow front"] [--seed 0] [--out results/demo.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from machine_info import describe

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
ARMS = {
    "today": ["steps=400", "sds.schedule_steps=null", "sds.render.skip_empty_space=false",
              "sds.field.n_levels=8"],
    "fast": [],
}


def run_job(arm: str, prompt: str, seed: int, threads: int, out: Path) -> dict:
    """One job in a fresh interpreter; returns its wall time, split and scores."""
    if out.exists():
        shutil.rmtree(out)  # a leftover checkpoint would make the job resume
    command = [sys.executable, str(REPO / "jobs" / "text_to_3d.py"), f"prompt={prompt}",
               f"seed={seed}", f"threads={threads}", "progress=false",
               f"out={out}", *ARMS[arm]]
    began = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"{arm}: the job failed ({done.returncode}):\n{done.stderr[-3000:]}")
    record = json.loads((out / "metrics.json").read_text())
    quality = record.get("quality") or {}
    janus = quality.get("janus") or {}
    scores = {"iou": quality.get("mean_iou"), "iou_raw": quality.get("mean_iou_raw"),
              "colour_accuracy": quality.get("colour_accuracy")}
    return {"arm": arm, "steps": record["steps"], "wall_s": round(wall, 2),
            "optimise_s": record["optimise_seconds"], "job_total_s": record.get("total_seconds"),
            "outside_job_s": round(wall - (record.get("total_seconds") or 0.0), 2),
            **scores, "volume_iou": quality.get("volume_iou"), "chamfer": quality.get("chamfer"),
            "janus": janus.get("verdict"), "front_correct": janus.get("front_correct"),
            "quality_line": next((line for line in done.stdout.splitlines()
                                  if line.startswith("vs ground truth")), None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--arms", nargs="+", default=["today", "fast"], choices=sorted(ARMS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", default="a red cube with a yellow front")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="outputs/bench_demo")
    parser.add_argument("--out", type=Path, default=RESULTS / "demo.json")
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")

    info = describe(threads=args.threads)
    print(f"bench_demo: {info['cpu']}, {args.threads} threads, load average {info['load_average_at_start']}",
          flush=True)
    runs = []
    for repeat in range(args.repeats):
        for arm in args.arms:
            row = run_job(arm, args.prompt, args.seed, args.threads, REPO / args.work / arm)
            row["repeat"] = repeat
            runs.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for arm in args.arms:
        mine = [r for r in runs if r["arm"] == arm]
        summary[arm] = {key: round(sorted(r[key] for r in mine)[len(mine) // 2], 2)
                        for key in ("wall_s", "optimise_s", "job_total_s", "outside_job_s")}
    if "today" in summary and "fast" in summary:
        summary["speedup_wall"] = round(summary["today"]["wall_s"] / summary["fast"]["wall_s"], 2)
    print("\n| arm | steps | wall s | of which optimise | export + scoring | start, imports, load |")
    print("| --- | --- | --- | --- | --- | --- |")
    for arm in args.arms:
        s, steps = summary[arm], next(r["steps"] for r in runs if r["arm"] == arm)
        print(f"| {arm} | {steps} | {s['wall_s']:.1f} | {s['optimise_s']:.1f} | "
              f"{s['job_total_s'] - s['optimise_s']:.1f} | {s['outside_job_s']:.1f} |")
    record = {"benchmark": "demo_wall_time", "date": time.strftime("%Y-%m-%d"), "machine": info,
              "settings": {"prompt": args.prompt, "seed": args.seed, "threads": args.threads,
                           "repeats": args.repeats, "arms": {a: ARMS[a] for a in args.arms},
                           "statistic": "median over repeats"},
              "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
