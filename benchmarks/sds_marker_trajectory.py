"""When does a text-to-3D run gain or lose the front marker? The marker around the orbit, step by step.

A diagnostic for issue 16's Janus runs (most end with verdict ``none``: no marker anywhere).
It runs the shipped text-to-3D optimisation (:func:`mvdream_platform.sds.optimize.optimise`,
``conf/sds/tiny.yaml``, the job's run length) and, after every logged window of steps, renders
the field's albedo on the Janus orbit (16 views at elevation 15, 32 px, as the procedural
scorer does) and reads the marker colour's share of the object per view
(:func:`mvdream_platform.evaluation.janus.colour_shares`) and the verdict
(:func:`~mvdream_platform.evaluation.janus.janus_verdict`). Rendering does not change the
run: the field, the optimiser and every random draw are the same as without it.

    .venv/bin/python benchmarks/sds_marker_trajectory.py [--prompts "a red cube with a yellow front" ...]
        [--guidance mvdream dreamfusion] [--seed 0] [--every 10] [--steps N]
        [--set shading.ambient_only_steps=400 ...] [--out results/sds_marker_trajectory.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from bench_sds_quality import sds_config
from mvdream_platform.evaluation.janus import colour_shares, janus_orbit, janus_verdict
from mvdream_platform.evaluation.text_to_3d import object_for_prompt
from mvdream_platform.pipelines import MVDreamPipeline
from mvdream_platform.sds.config import SDSConfig
from mvdream_platform.sds.optimize import build_scene, optimise, render_orbit

from machine_info import describe

ROOT = Path(__file__).resolve().parent
PROMPTS = ["a red cube with a yellow front", "a green sphere with a red front",
           "a black cylinder with a pink front"]


def trajectory(pipe, prompt: str, guidance: str, seed: int, every: int,
               steps: int | None = None, overrides: list[str] | None = None) -> list[dict]:
    """Per logged window: the step, the timestep range, the marker share per orbit view and the
    verdict. ``steps``: the run length (None: the job's; the schedules stretch to it);
    ``overrides``: dotted ``key=value`` settings of the SDS config, e.g.
    ``shading.ambient_only_steps=400``."""
    cfg = sds_config(guidance, steps)
    if overrides:
        merged = OmegaConf.merge(OmegaConf.create(cfg.to_dict()), OmegaConf.from_dotlist(overrides))
        cfg = SDSConfig.from_dict(OmegaConf.to_container(merged, resolve=True))
    cfg.log_every = every
    marker = object_for_prompt(prompt).attributes["parts"][0]["front"]
    azimuths, c2w = janus_orbit(16)
    scene = build_scene(cfg, seed=seed)
    rows = []

    def read(metrics: dict, _folder) -> None:
        views = render_orbit(scene, cfg, num_views=16, resolution=32, c2w=c2w)
        shares = colour_shares(views.albedo, views.opacity, marker)
        verdict = janus_verdict(shares, azimuths)
        rows.append({"step": int(metrics["step"]), "t_min": metrics["min_step"],
                     "t_max": metrics["max_step"], "shares": shares.round(3).tolist(),
                     "front": float(shares[0]), "back": float(shares[8]),
                     "verdict": verdict["verdict"]})
        print(f"  step {rows[-1]['step']:4d}  t in [{metrics['min_step']:.0f}, {metrics['max_step']:.0f}]"
              f"  marker front {shares[0]:.2f}  side {shares[4]:.2f}/{shares[12]:.2f}  back {shares[8]:.2f}"
              f"  max {shares.max():.2f}  {verdict['verdict']}", flush=True)

    with tempfile.TemporaryDirectory() as out:
        optimise(scene, pipe, prompt, cfg, out, seed=seed, progress=False, on_log=read)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT.parent / "checkpoints" / "tiny"))
    parser.add_argument("--prompts", nargs="+", default=PROMPTS)
    parser.add_argument("--guidance", nargs="+", default=["mvdream", "dreamfusion"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=10, help="steps between readings")
    parser.add_argument("--steps", type=int, default=None, help="run length (default: the job's)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="SDS config overrides, e.g. shading.ambient_only_steps=400")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "sds_marker_trajectory.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = MVDreamPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    runs = []
    for prompt in args.prompts:
        for guidance in args.guidance:
            print(f"{prompt} / {guidance} / seed {args.seed}", flush=True)
            rows = trajectory(pipe, prompt, guidance, args.seed, args.every, args.steps, args.set)
            runs.append({"prompt": prompt, "guidance": guidance, "seed": args.seed, "steps": rows[-1]["step"],
                         "peak_front": max(r["front"] for r in rows),
                         "peak_front_step": max(rows, key=lambda r: r["front"])["step"],
                         "final_verdict": rows[-1]["verdict"], "readings": rows})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "sds_marker_trajectory", "date": time.strftime("%Y-%m-%d"),
        "machine": describe(), "settings": {"model": args.model, "sds_config": "conf/sds/tiny.yaml",
                                            "every": args.every, "overrides": args.set, "orbit": "16 views, elevation 15, 32 px, albedo"},
        "runs": runs, "mean_peak_front": float(np.mean([r["peak_front"] for r in runs])),
        "seconds": round(time.perf_counter() - start, 1)}, indent=1) + "\n")
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
