"""Ray Tune sweeps of text-to-3D: completed trials per hour at 1 and 2 concurrent trials, and
Tune's overhead against running the very same trials directly in one process.

Variants, each running the same ``--trials`` trials (a fixed grid: prompts x seeds, FIFO, no
early stopping, so every variant does identical work) on the tiny sds config and the shipped
tiny model, ``--steps`` SDS steps each, the objective scored at every checkpoint:

* ``direct``: :func:`mvdream_platform.tune.trial.execute_trial` for each trial, one after
  another, in this process, ``torch.set_num_threads(1)`` (what one Tune trial with 1 CPU gets);
* ``direct_2threads``: the same with 2 torch threads (the other way to use 2 cores);
* ``tune_1``: :func:`mvdream_platform.tune.sweep.run_sweep`, 1 CPU per trial, 1 trial at a time;
* ``tune_2``: the same, 2 trials at a time (2 cores).

One local Ray cluster (``--cpus`` CPUs) is started once, before timing (its start-up is reported
separately); each Tune variant writes a fresh sweep folder, so nothing is resumed. Repetitions
are interleaved (direct, tune_1, tune_2, ... per repeat) so that drifts in machine load hit every
variant alike. Reported per variant: wall seconds (median over repeats), completed trials per
hour, and the overhead ``tune_1 / direct - 1`` (actor start-up, result and checkpoint
persistence, experiment snapshots, the driver loop).

Needs an otherwise idle machine (the load average at start is recorded in the JSON). The
defaults (4 trials x 100 steps, 2 repeats, after one untimed warm-up trial) take roughly 20
minutes on 2 idle cores.

    .venv/bin/python benchmarks/bench_tune.py [--trials 4] [--steps 100] [--repeats 2] [--cpus 2]
        [--variants direct direct_2threads tune_1 tune_2] [--out results/tune.json]

Smoke test: ``.venv/bin/python benchmarks/bench_tune.py --trials 2 --steps 4 --repeats 1 --small
--out /tmp/tune.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from machine_info import describe

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("direct", "direct_2threads", "tune_1", "tune_2")
PROMPTS = ("a red cube", "a blue sphere", "a green cylinder", "a yellow cone")
# --small: toy sizes (the test suite's), for a smoke test of the script itself
SMALL = ["sds.field.n_levels=4", "sds.field.log2_hashmap_size=10", "sds.field.hidden_dim=16",
         "sds.render.num_samples_per_ray=16", "sds.cameras.resolution=16", "sds.shading.ambient_only_steps=2",
         "sds.guidance.anneal_steps=4", "sds.optim.orient_end_step=4", "sds.export.mesh_resolution=32",
         "sds.export.turntable_frames=4", "sds.export.turntable_resolution=16", "sds.export.quality_views=4",
         "sds.checkpoint_every=2", "sds.log_every=1"]


def sweep_config(args, storage_path: str, name: str, concurrent: int):
    """The SweepConfig of the jobs/tune_sds.py composition, with a fixed grid of trials."""
    from hydra import compose, initialize_config_dir

    from mvdream_platform.tune.space import SearchSpace

    sys.path.insert(0, str(REPO / "jobs"))  # jobs/ is a folder of scripts
    tune_sds = __import__("tune_sds")

    overrides = ["logger=disabled", "progress=false", f"steps={args.steps}", f"storage_path={storage_path}",
                 f"name={name}", "tune.scheduler.kind=fifo", "tune.verbose=0",
                 f"tune.search.max_concurrent_trials={concurrent}", "tune.search.num_samples=1",
                 "tune.resources.cpu=1", *(SMALL if args.small else [])]
    if not args.small:  # score at every checkpoint of the run, as a real sweep does
        overrides.append(f"sds.checkpoint_every={max(args.steps // 40 * 10, 10)}")  # a multiple of log_every
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="tune_sds", overrides=overrides)
    config = tune_sds.sweep_config_from(cfg)
    seeds = list(range((args.trials + len(PROMPTS) - 1) // len(PROMPTS)))
    prompts = list(PROMPTS[:min(args.trials, len(PROMPTS))])
    config.space = SearchSpace.from_dict({"prompts": prompts, "params": {"seed": {"type": "grid", "values": seeds}}})
    return config


def grid(config, trials: int) -> list[dict]:
    prompts = config.space.prompts
    seeds = config.space.params["seed"].values
    return [{"prompt": p, "seed": s} for s in seeds for p in prompts][:trials]


def run_direct(args, threads: int, root: str, name: str) -> float:
    from mvdream_platform.tune.trial import execute_trial

    config = sweep_config(args, root, name, 1)
    spec = config.trial_spec()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        began = time.perf_counter()
        for i, sampled in enumerate(grid(config, args.trials)):
            execute_trial(spec, sampled, f"direct_{i:05d}", lambda metrics, checkpoint: None)
        return time.perf_counter() - began
    finally:
        torch.set_num_threads(previous)


def run_tune(args, concurrent: int, root: str, name: str) -> tuple[float, dict]:
    from mvdream_platform.tune.sweep import run_sweep

    config = sweep_config(args, root, name, concurrent)
    n_grid = len(config.space.prompts) * len(config.space.params["seed"].values)
    if n_grid != args.trials:
        raise SystemExit(f"--trials must be a multiple of {len(PROMPTS)} or at most {len(PROMPTS)} "
                         f"(the grid has {n_grid} trials)")
    began = time.perf_counter()
    summary = run_sweep(config)
    seconds = time.perf_counter() - began
    if summary["counts"].get("TERMINATED") != args.trials:
        raise RuntimeError(f"{name}: not every trial finished: {summary['counts']}")
    return seconds, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--small", action="store_true", help="toy field/render sizes (smoke test)")
    parser.add_argument("--out", default=str(RESULTS / "tune.json"))
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    info = describe(("torch", "ray"))
    wall_began = time.perf_counter()

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0

    root = tempfile.mkdtemp(prefix="bench_tune_")
    seconds: dict[str, list[float]] = {v: [] for v in args.variants}
    try:
        # Untimed: load the model and warm up this process (each Tune sweep's actors warm
        # themselves up, which is part of what Tune costs).
        warm = time.perf_counter()
        run_direct(argparse.Namespace(**{**vars(args), "trials": 1}), 1, root, "warmup")
        print(f"warm-up (1 direct trial): {time.perf_counter() - warm:.1f} s", flush=True)
        for repeat in range(args.repeats):
            for variant in args.variants:
                name = f"{variant}-r{repeat}"
                if variant.startswith("direct"):
                    wall = run_direct(args, 2 if variant == "direct_2threads" else 1, root, name)
                else:
                    wall, _ = run_tune(args, int(variant.split("_")[1]), root, name)
                seconds[variant].append(wall)
                print(f"repeat {repeat} {variant:>16}: {wall:7.1f} s for {args.trials} trials", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    rows = {}
    for variant, walls in seconds.items():
        median = statistics.median(walls)
        rows[variant] = {"seconds": [round(w, 2) for w in walls], "median_s": round(median, 2),
                         "trials_per_hour": round(args.trials / median * 3600, 1)}
    if "direct" in rows:
        for variant in rows:
            rows[variant]["vs_direct"] = round(rows[variant]["median_s"] / rows["direct"]["median_s"], 3)
    report = {"benchmark": "tune", "machine": info, "trials": args.trials, "steps": args.steps,
              "small": args.small, "repeats": args.repeats, "ray_cluster_start_s": round(ray_start, 2),
              "variants": rows,
              "tune_overhead": (round(rows["tune_1"]["median_s"] / rows["direct"]["median_s"] - 1, 3)
                                if {"tune_1", "direct"} <= set(rows) else None),
              "wall_s": round(time.perf_counter() - wall_began, 1)}
    print(f"\n{args.trials} trials x {args.steps} steps, median of {args.repeats}; Ray start {ray_start:.1f} s")
    print("| variant | wall s | trials/hour | vs direct |\n| --- | --- | --- | --- |")
    for variant, row in rows.items():
        print(f"| {variant} | {row['median_s']} | {row['trials_per_hour']} | {row.get('vs_direct', '')} |")
    if report["tune_overhead"] is not None:
        print(f"Tune overhead (tune_1 vs direct): {100 * report['tune_overhead']:+.1f}%")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
