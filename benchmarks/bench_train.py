"""Training throughput on Ray Train: 1 against 2 CPU workers, with the step-time breakdown.

Runs the real job (``run_training``: TorchTrainer, gloo, the tiny model, the 70/30 mixture of
real prepared renders and text-image shards) with ``num_workers`` 1 and 2, one torch thread and
one CPU per worker, per-worker batches fixed (8 objects x 4 views or 32 images), so 2 workers
process twice the images per step. Runs alternate (1, 2, 1, 2, ...) in one process so drift
hits both alike. The first ``--warmup`` steps of each run are discarded; the rest are read
back from rank 0's ``tracking/metrics.jsonl``: images/s over all workers and the per-step
breakdown data / forward / backward / optimizer, plus the summed wall time of DDP's bucket
all-reduces (it overlaps backward, so it is not added to the total; backward contains what
was not hidden). Target: 2 workers at least 1.6x the images/s of one. Needs an idle machine
with at least 2 cores. Writes results/train.json.

    .venv/bin/python benchmarks/bench_train.py [--steps 30] [--warmup 10] [--repeats 2]
        [--data-uri data/shapes_mv --image-uri data/shapes_2d]

Without ``--data-uri`` a small set (64 objects x 8 views, 64 text-image rows, 32 px) is
prepared in a temporary folder first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from mvdream_platform.cluster import ensure_ray
from mvdream_platform.data import prepare
from mvdream_platform.pipelines.loading import ModelConfig
from mvdream_platform.tracking import read_metrics
from mvdream_platform.training.config import (
    ClusterConfig,
    DataConfig,
    LoggerConfig,
    RunSettings,
    TrainerConfig,
    TrainJobConfig,
)
from mvdream_platform.training.samples import SampleConfig
from mvdream_platform.training.trainer import run_training

from machine_info import describe

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("data", "forward", "backward", "optimizer", "allreduce")


def prepare_small_set(root: Path) -> tuple[str, str]:
    """64 procedural objects x 8 views and 64 builtin text-image rows, 32 px."""
    mv, img = root / "mv", root / "2d"
    settings = prepare.RenderSettings(views=8, resolution=32)
    prepare.prepare_multiview(prepare.plan_shapes(64), str(mv), settings, backend="serial")
    prepare.prepare_text_images(prepare.builtin_pairs(64, resolution=32), str(img))
    return str(mv), str(img)


def tiny_model() -> ModelConfig:
    """The embedded default's architecture (conf/model/tiny_init.yaml), freshly initialised."""
    import yaml

    values = yaml.safe_load((REPO / "conf" / "model" / "tiny_init.yaml").read_text())
    return ModelConfig(**values)


def job(workers: int, steps: int, log_every: int, mv: str, img: str, storage: str, name: str) -> TrainJobConfig:
    return TrainJobConfig(
        model=tiny_model(),
        data=DataConfig(uri=mv, image_uri=img, resolution=32, multiview_batch=8, image_batch=32,
                        num_workers=0),
        trainer=TrainerConfig(max_steps=steps, warmup_steps=0, lr=1e-4, checkpoint_every=steps,
                              log_every=log_every),
        cluster=ClusterConfig(num_workers=workers, cpus_per_worker=1, torch_threads=1),
        run=RunSettings(name=name, storage_path=storage, num_to_keep=1),
        logger=LoggerConfig(mode="disabled"),
        samples=SampleConfig(every=0),
    )


def measure(workers: int, args: argparse.Namespace, mv: str, img: str, storage: str, tag: str) -> dict:
    """One run; the windows after the warm-up, averaged."""
    steps = args.warmup + args.steps
    cfg = job(workers, steps, args.log_every, mv, img, storage, f"bench-{tag}")
    start = time.perf_counter()
    run_training(cfg)
    wall = time.perf_counter() - start
    windows = [m for m in read_metrics(Path(storage) / f"bench-{tag}" / "tracking") if m["step"] > args.warmup]
    if not windows:
        raise RuntimeError(f"no metrics after step {args.warmup}: raise --steps")
    row = {"workers": workers, "images_per_s": statistics.mean(m["images_per_s"] for m in windows),
           "step_time_s": statistics.mean(m["step_time_s"] for m in windows), "run_wall_s": wall}
    for phase in PHASES:
        row[f"{phase}_s"] = statistics.mean(m[f"{phase}_time_s"] for m in windows)
    serial = sum(row[f"{phase}_s"] for phase in PHASES if phase != "allreduce")
    row["other_s"] = row["step_time_s"] - serial  # reporting to Ray Train, loop overhead
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="discarded steps per run")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data-uri")
    parser.add_argument("--image-uri")
    parser.add_argument("--out", default=str(RESULTS / "train.json"))
    args = parser.parse_args()
    if args.warmup % args.log_every or args.steps % args.log_every:
        parser.error("--warmup and --steps must be multiples of --log-every")

    ensure_ray(num_cpus=2)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        if args.data_uri:
            mv, img = os.path.abspath(args.data_uri), args.image_uri and os.path.abspath(args.image_uri)
        else:
            mv, img = prepare_small_set(Path(tmp) / "data")
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for repeat in range(args.repeats):
            for workers in (1, 2):
                row = measure(workers, args, mv, img, str(Path(tmp) / "runs"), f"w{workers}-r{repeat}")
                runs[workers].append(row)
                print(f"workers={workers} repeat={repeat}: {row['images_per_s']:.1f} images/s, "
                      f"{row['step_time_s']:.3f} s/step", flush=True)

    summary = []
    for workers, rows in runs.items():
        merged = {key: round(statistics.median(r[key] for r in rows), 4) for key in rows[0] if key != "workers"}
        merged["workers"] = workers
        merged["samples_images_per_s"] = [round(r["images_per_s"], 1) for r in rows]
        summary.append(merged)
    ratio = summary[1]["images_per_s"] / summary[0]["images_per_s"]
    record = {"benchmark": "train", "date": time.strftime("%Y-%m-%d"), "machine": describe(("torch", "ray")),
              "settings": {"model": "tiny_init (4.6M params, 32 px pixel space)", "views": 4,
                           "per_worker_batch": "8 objects x 4 views or 32 images (p_multiview 0.7)",
                           "torch_threads_per_worker": 1, "measured_steps": args.steps,
                           "warmup_steps": args.warmup, "repeats": args.repeats},
              "runs": summary, "speedup_2_vs_1": round(ratio, 3), "target": 1.6}

    print("\n| workers | images/s | s/step | data | forward | backward | optimizer | other | allreduce (overlapped) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in summary:
        print(f"| {r['workers']} | {r['images_per_s']:.1f} | {r['step_time_s']:.3f} | {r['data_s']:.3f} | "
              f"{r['forward_s']:.3f} | {r['backward_s']:.3f} | {r['optimizer_s']:.3f} | {r['other_s']:.3f} | "
              f"{r['allreduce_s']:.3f} |")
    print(f"\n2 workers / 1 worker: {ratio:.2f}x (target 1.6x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
