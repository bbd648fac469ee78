"""Text-to-3D quality on the embedded default: multi-view SDS against the DreamFusion baseline.

For single-primitive prompts of the procedural vocabulary, runs the real text-to-3D code
(``mvdream_platform.sds.pipeline.run_text_to_3d``, conf/sds/tiny.yaml) with the shipped tiny
model twice per prompt and seed, same budget: ``guidance=mvdream`` (4 views 90 degrees apart
through the model's 3D attention and camera conditioning) and ``guidance=dreamfusion`` (the
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

    .venv/bin/python benchmarks/bench_sds_quality.py [--steps 400] [--seeds 0] [--prompts ...]
    .venv/bin/python benchmarks/bench_sds_quality.py --prompts "a red cube with a yellow front" \
        "a blue sphere with a white front" --seeds 0 1 2       # the Janus rate, per guidance
"""

from __future__ import annotations

import argparse
import json
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


def sds_config(kind: str, steps: int, scale_schedules: bool = False) -> SDSConfig:
    """conf/sds/tiny.yaml for ``steps`` steps; ``scale_schedules`` stretches its step-counted
    schedules (timestep annealing, albedo warm-up, orientation weight: written for 400 steps)
    to the run's length, so a shorter run still anneals fully."""
    values = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "sds" / "tiny.yaml"), resolve=True)
    values["steps"], values["guidance_kind"] = steps, kind
    if scale_schedules:
        ratio = steps / values["guidance"]["anneal_steps"]
        values["guidance"]["anneal_steps"] = steps
        values["shading"]["ambient_only_steps"] = round(values["shading"]["ambient_only_steps"] * ratio)
        values["optim"]["orient_end_step"] = round(values["optim"]["orient_end_step"] * ratio)
    return SDSConfig.from_dict(values)


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


def row_of(prompt: str, seed: int, guidance: str, quality: dict, seconds: float, out: str | None) -> dict:
    scores = headline(quality)
    return {"prompt": prompt, "seed": seed, "guidance": guidance, "iou": scores["iou"],
            "iou_raw": scores["iou_raw"], "colour_accuracy": scores["colour_accuracy"],
            "volume_iou": scores["volume_iou"], "chamfer": scores["chamfer"],
            "topology_ok": scores["topology_ok"], "janus": scores.get("janus"),
            "janus_free": scores.get("janus_free"),
            "front_correct": (quality.get("janus") or {}).get("front_correct"),
            "colours": [v["colour"] for v in quality["views"]], "seconds": seconds, "out": out}


def mean_of(rows: list[dict], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return statistics.mean(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--scale-schedules", action="store_true",
                        help="stretch tiny.yaml's 400-step schedules to --steps")
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
            for kind in ("mvdream", "dreamfusion"):  # interleaved: drift hits both alike
                pipe = MVDreamPipeline.from_pretrained(args.model)  # fresh: guidance freezes it
                pipe.set_progress_bar_config(disable=True)
                out = str(Path(args.out) / f"{kind}-{prompt.replace(' ', '_')}-s{seed}")
                result = run_text_to_3d(prompt, pipe, sds_config(kind, args.steps, args.scale_schedules),
                                        out, seed=seed, progress=False, scorer=scorer)
                rows.append(row_of(prompt, seed, kind, result.quality, result.total_seconds, out))
                print(json.dumps(rows[-1]), flush=True)

    summary = {}
    for kind in ("mvdream", "dreamfusion", "init (blob, 0 steps)"):
        mine = [r for r in rows if r["guidance"] == kind]
        if not mine:
            continue
        marked = [r for r in mine if r["janus"] is not None]
        at_front = [float(r["janus"] == "single" and r["front_correct"]) for r in marked]
        summary[kind] = {"runs": len(mine), "mean_iou": mean_of(mine, "iou"),
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
                         "seconds_per_run": statistics.median(r["seconds"] for r in mine)}

    def cell(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print("\n| prompt | seed | guidance | silhouette IoU (aligned / raw) | colour correct | volume IoU | "
          "Chamfer | genus ok | Janus |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['prompt']} | {r['seed']} | {r['guidance']} | {r['iou']:.3f} / {r['iou_raw']:.3f} | "
              f"{r['colour_accuracy']:.0%} | {r['volume_iou']:.3f} | {cell(r['chamfer'], '.3f')} | "
              f"{'yes' if r['topology_ok'] else 'no'} | {r['janus'] or '-'} |")
    for kind, s in summary.items():
        janus = "-" if s["janus_free"] is None else f"{s['janus_free']:.0%} Janus-free of {s['marked_runs']}"
        print(f"| **mean** | | **{kind}** | **{s['mean_iou']:.3f}** / {s['mean_iou_raw']:.3f} | "
              f"**{s['colour_accuracy']:.0%}** | {s['volume_iou']:.3f} | {cell(s['chamfer'], '.3f')} | "
              f"{s['topology_ok']:.0%} | {janus} |")
    record = {"benchmark": "sds_quality", "date": time.strftime("%Y-%m-%d"),
              "machine": describe(threads=args.threads),
              "settings": {"steps": args.steps, "seeds": args.seeds, "sds_config": "conf/sds/tiny.yaml",
                           "model": args.model, "views_scored": 8,
                           "scale_schedules": args.scale_schedules,
                           "scorer": asdict(scorer)},
              "targets": {"iou": 0.6, "colour_accuracy": 0.9}, "summary": summary, "runs": rows}
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
