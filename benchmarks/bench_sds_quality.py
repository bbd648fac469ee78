"""Text-to-3D quality on the embedded default: multi-view SDS against the DreamFusion baseline.

For single-primitive prompts of the procedural vocabulary, runs the real text-to-3D code
(``mvdream_platform.sds.pipeline.run_text_to_3d``, conf/sds/tiny.yaml) with the shipped tiny
model twice per prompt and seed, same budget: ``guidance_kind=mvdream`` (4 views 90 degrees apart
through the model's 3D attention and camera conditioning) and ``guidance_kind=dreamfusion`` (the
same model one view at a time, 2D attention, no camera, view-dependent prompt suffixes). Each
NeRF is scored by the procedural scorer the job uses
(:class:`mvdream_platform.evaluation.text_to_3d.ProceduralScorer`, injected into the run): at 8
held-out orbit views against ground-truth renders of the prompt's object, aligned silhouette
IoU and dominant-colour accuracy; in 3D, the exported mesh's volume IoU, Chamfer distance and
genus against the true mesh; and for marked prompts ("a red cube with a yellow front") the
Janus verdict (is the marker on one side, at the front?). Targets (multi-view): IoU >= 0.6,
colour right in >= 90% of views. The untrained field (the density "blob") is scored too, as
the floor every number should be read against: a compact blob already overlaps a compact
object well once both are cropped to their boxes (aligned IoU), so the raw IoU (same cameras,
same pixels) and the volume IoU are the stricter shape measures. Writes
results/sds_quality.json and prints a table; every run's assets stay under --out.

Settings arms (``--arms``), each a set of overrides of conf/sds/tiny.yaml run on the same
prompts and seeds: ``fast`` is the shipped default (tiny.yaml with the job's ``steps`` from
conf/text_to_3d.yaml: empty-space skipping, schedules stretched to the run); ``today`` is the
2026-12-04 default it replaced (400 steps, dense sampling, schedules fixed at 400 steps, an
8-level hash grid).
Each run's wall time (optimise + export + scoring) is recorded: compare seconds only between
runs of one invocation on an otherwise idle machine (the load average is recorded).

    .venv/bin/python benchmarks/bench_sds_quality.py [--arms fast] [--steps N] [--seeds 0] [--prompts ...]
    .venv/bin/python benchmarks/bench_sds_quality.py --prompts "a red cube with a yellow front" \
        "a blue sphere with a white front" --seeds 0 1 2       # the Janus rate, per guidance
    .venv/bin/python benchmarks/bench_sds_quality.py --arms today fast --guidance mvdream \
        --no-floor --json benchmarks/results/sds_speed_quality.json   # the speed issue's table
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mvdream_platform.evaluation.consistency import bootstrap_interval
from mvdream_platform.evaluation.janus import VERDICTS
from mvdream_platform.evaluation.text_to_3d import ProceduralScorer, headline, object_for_prompt
from mvdream_platform.pipelines import MVDreamPipeline
from mvdream_platform.sds.config import SDSConfig
from mvdream_platform.sds.export import extract_mesh
from mvdream_platform.sds.optimize import build_scene
from mvdream_platform.sds.pipeline import FinishedRun, run_text_to_3d

from machine_info import describe

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["a red cube", "a blue sphere", "a green cylinder", "a yellow cone", "a purple torus",
           "an orange pyramid"]


# The settings arms: overrides of conf/sds/tiny.yaml (None: the job's default run length).
ARMS: dict[str, dict] = {
    "fast": {"steps": None},
    "today": {"steps": 400, "schedule_steps": None, "render": {"skip_empty_space": False},
              "field": {"n_levels": 8}},
}


def default_steps() -> int:
    """The text-to-3D job's default run length (conf/text_to_3d.yaml)."""
    return int(OmegaConf.load(REPO / "conf" / "text_to_3d.yaml")["steps"])


def sds_config(kind: str, steps: int | None = None, arm: str = "fast") -> SDSConfig:
    """conf/sds/tiny.yaml with ``arm``'s overrides for guidance ``kind``; ``steps`` (when
    given) replaces the arm's run length (tiny.yaml's schedules stretch to it)."""
    values = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "sds" / "tiny.yaml"), resolve=True)
    overrides = ARMS[arm]
    merged = OmegaConf.to_container(OmegaConf.merge(
        values, {k: v for k, v in overrides.items() if k != "steps"}), resolve=True)
    merged["steps"] = steps or overrides["steps"] or default_steps()
    merged["guidance_kind"] = kind
    return SDSConfig.from_dict(merged)


def floor_quality(prompt: str, seed: int, scorer: ProceduralScorer) -> dict | None:
    """The untrained field's scores (its mesh too, when the blob crosses the threshold)."""
    cfg = sds_config("mvdream", 1)
    scene = build_scene(cfg, seed=seed)
    nerf = scene.field
    try:
        mesh = extract_mesh(nerf.density, lambda p: nerf(p).albedo, radius=cfg.field.radius,
                            resolution=cfg.export.mesh_resolution, threshold=cfg.export.mesh_threshold)
    except ValueError:
        mesh = None
    return scorer(FinishedRun.of_scene(scene, cfg, prompt, None, seed=seed, mesh=mesh))


def row_of(prompt: str, seed: int, guidance: str, quality: dict, seconds: float, out: str | None,
           arm: str | None = None, steps: int = 0, optimise_seconds: float | None = None) -> dict:
    scores = headline(quality)
    return {"prompt": prompt, "seed": seed, "guidance": guidance, "arm": arm, "steps": steps,
            "optimise_seconds": optimise_seconds, "iou": scores["iou"],
            "iou_raw": scores["iou_raw"], "colour_accuracy": scores["colour_accuracy"],
            "volume_iou": scores["volume_iou"], "chamfer": scores["chamfer"],
            "topology_ok": scores["topology_ok"], "janus": scores.get("janus"),
            "janus_free": scores.get("janus_free"),
            "front_correct": (quality.get("janus") or {}).get("front_correct"),
            # the marker's share per Janus-orbit view, for janus_front.py's front excess
            "marker_shares": (quality.get("janus") or {}).get("shares"),
            "colours": [v["colour"] for v in quality["views"]], "seconds": seconds, "out": out}


def mean_of(rows: list[dict], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return statistics.mean(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="run length for every arm (default: each arm's own)")
    parser.add_argument("--arms", nargs="+", default=["fast"], choices=sorted(ARMS))
    parser.add_argument("--guidance", nargs="+", default=["mvdream", "dreamfusion"],
                        choices=["mvdream", "dreamfusion"])
    parser.add_argument("--no-floor", action="store_true", help="skip scoring the untrained field")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--prompts", nargs="+", default=PROMPTS)
    parser.add_argument("--model", default=str(REPO / "checkpoints" / "tiny"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="outputs/bench_sds_quality")
    parser.add_argument("--json", default=str(RESULTS / "sds_quality.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    scorer = ProceduralScorer()
    rows = []
    for prompt in args.prompts:
        for seed in args.seeds:
            if object_for_prompt(prompt) is None:
                parser.error(f"{prompt!r} is not a prompt of the procedural vocabulary (no ground truth)")
            if not args.no_floor:
                rows.append(row_of(prompt, seed, "init (blob, 0 steps)", floor_quality(prompt, seed, scorer), 0.0, None))
            for arm in args.arms:  # interleaved: drift hits every arm and guidance alike
                for kind in args.guidance:
                    pipe = MVDreamPipeline.from_pretrained(args.model)  # fresh: guidance freezes it
                    pipe.set_progress_bar_config(disable=True)
                    cfg = sds_config(kind, args.steps, arm)
                    out = str(Path(args.out) / f"{arm}-{kind}-{prompt.replace(' ', '_')}-s{seed}")
                    if Path(out).exists():
                        shutil.rmtree(out)  # a fresh run (a leftover checkpoint would resume)
                    result = run_text_to_3d(prompt, pipe, cfg, out, seed=seed, progress=False, scorer=scorer)
                    rows.append(row_of(prompt, seed, kind, result.quality, result.total_seconds, out,
                                       arm=arm, steps=cfg.steps, optimise_seconds=result.optimise_seconds))
                    print(json.dumps(rows[-1]), flush=True)

    summary = {}
    groups = [(arm, kind) for arm in args.arms for kind in args.guidance] + [(None, "init (blob, 0 steps)")]
    for arm, kind in groups:
        mine = [r for r in rows if r["guidance"] == kind and r["arm"] == arm]
        if not mine:
            continue
        marked = [r for r in mine if r["janus"] is not None]
        at_front = [float(r["janus"] == "single" and r["front_correct"]) for r in marked]
        name = kind if arm is None or len(args.arms) == 1 else f"{arm} {kind}"
        summary[name] = {"arm": arm, "steps": mine[0]["steps"], "runs": len(mine), "mean_iou": mean_of(mine, "iou"),
                         "mean_iou_raw": mean_of(mine, "iou_raw"),
                         "colour_accuracy": mean_of(mine, "colour_accuracy"),
                         "volume_iou": mean_of(mine, "volume_iou"), "chamfer": mean_of(mine, "chamfer"),
                         "topology_ok": mean_of(mine, "topology_ok"),
                         "marked_runs": len(marked), "janus_free": mean_of(marked, "janus_free"),
                         "janus_free_interval": bootstrap_interval([float(r["janus_free"]) for r in marked])
                         if marked else None,
                         "single_at_front": statistics.mean(at_front) if at_front else None,
                         "single_at_front_interval": bootstrap_interval(at_front) if at_front else None,
                         "verdicts": {v: sum(r["janus"] == v for r in marked) for v in VERDICTS} if marked else None,
                         "seconds_per_run": statistics.median(r["seconds"] for r in mine),
                         "optimise_seconds_per_run": mean_of(mine, "optimise_seconds")}

    def cell(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print("\n| prompt | seed | arm | steps | guidance | silhouette IoU (aligned / raw) | colour correct | "
          "volume IoU | Chamfer | genus ok | Janus | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['prompt']} | {r['seed']} | {r['arm'] or '-'} | {r['steps']} | {r['guidance']} | "
              f"{r['iou']:.3f} / {r['iou_raw']:.3f} | "
              f"{r['colour_accuracy']:.0%} | {r['volume_iou']:.3f} | {cell(r['chamfer'], '.3f')} | "
              f"{'yes' if r['topology_ok'] else 'no'} | {r['janus'] or '-'} | {r['seconds']:.0f} |")
    for kind, s in summary.items():
        janus = "-" if s["janus_free"] is None else f"{s['janus_free']:.0%} Janus-free of {s['marked_runs']}"
        print(f"| **mean** | | {s['arm'] or '-'} | {s['steps']} | **{kind}** | **{s['mean_iou']:.3f}** / {s['mean_iou_raw']:.3f} | "
              f"**{s['colour_accuracy']:.0%}** | {s['volume_iou']:.3f} | {cell(s['chamfer'], '.3f')} | "
              f"{s['topology_ok']:.0%} | {janus} | {s['seconds_per_run']:.0f} |")
    record = {"benchmark": "sds_quality", "date": time.strftime("%Y-%m-%d"),
              "machine": describe(threads=args.threads),
              "settings": {"steps": args.steps, "seeds": args.seeds, "sds_config": "conf/sds/tiny.yaml",
                           "arms": {arm: ARMS[arm] for arm in args.arms}, "guidance": args.guidance,
                           "model": args.model, "views_scored": 8,
                           "scorer": asdict(scorer)},
              "targets": {"iou": 0.6, "colour_accuracy": 0.9}, "summary": summary, "runs": rows}
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
