"""Training ingest: today's loader against Ray Data on the same shards, behind a slow store.

Both loaders read the same parquet shards (multi-view: 16 objects x 8 views of 256 px PNGs per
shard; text-image: 256 px rows, row groups of 64) through ``slow://``, a simulated object store
(``latency_fs.py``: every metadata call and every block GET waits ``--latency-ms``, 20 ms by
default). Per Ray Train worker, the loaders are the ones the job builds (``loop.make_loader``):

- ``mixture``: a map-style DataLoader per worker (``--dataloader-workers`` processes each,
  the job's default 2) over this rank's rows, row groups cached per process;
- ``ray_data``: Ray Data streams (read tasks, decode tasks on any CPU of the cluster, +2
  logical CPUs on this 2-core machine as the job gives a local cluster) split across workers.

Two measurements, each at 1 and 2 Ray Train workers, runs alternating in one process:

1. **Ingest capacity** (32 and 256 px): a Ray Train loop that only draws batches of the 70/30
   mixture (8 objects x 4 views, or 32 images, per worker and step) as fast as the loader
   gives them: images/s over all workers. No model competes for the CPUs, so this is what one
   node's loader can feed; 256 px is the paper's training resolution.
2. **In the training job** (32 px, the embedded default's tiny model): the real job
   (``run_training``) with each loader: images/s, and the data time's share of a step (the
   loop's own ``data_time_s`` / ``step_time_s``). Targets (issue 21): data < 5% of the step;
   2 workers >= 1.8x one.

Needs an idle machine. Writes results/ingest.json.

    .venv/bin/python benchmarks/bench_ingest.py [--objects 64] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mvdream_platform.data import prepare
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

import latency_fs
from bench_train import tiny_model
from machine_info import describe

RESULTS = Path(__file__).resolve().parent / "results"
LOADERS = ("mixture", "ray_data")


def prepare_shards(root: Path, objects: int) -> tuple[str, str]:
    """``objects`` procedural objects x 8 views and 2 x ``objects`` text-image rows, 256 px."""
    mv, img = root / "mv", root / "2d"
    settings = prepare.RenderSettings(views=8, resolution=256)
    prepare.prepare_multiview(prepare.plan_shapes(objects), str(mv), settings, backend="serial",
                              objects_per_shard=16)
    prepare.prepare_text_images(prepare.builtin_pairs(2 * objects, resolution=256), str(img),
                                rows_per_shard=objects, progress=False)
    return latency_fs.to_slow(mv), latency_fs.to_slow(img)


def job(loader: str, workers: int, resolution: int, steps: int, mv: str, img: str, runs: str, name: str,
        dataloader_workers: int) -> TrainJobConfig:
    return TrainJobConfig(
        model=tiny_model(),
        data=DataConfig(uri=mv, image_uri=img, resolution=resolution, multiview_batch=8, image_batch=32,
                        num_workers=dataloader_workers, loader=loader),
        trainer=TrainerConfig(max_steps=steps, warmup_steps=0, lr=1e-4, checkpoint_every=steps, log_every=5),
        cluster=ClusterConfig(num_workers=workers, cpus_per_worker=1, torch_threads=1),
        run=RunSettings(name=name, storage_path=runs, num_to_keep=1),
        logger=LoggerConfig(mode="disabled"),
        samples=SampleConfig(every=0),
    )


def _drain(config: dict) -> None:
    """A Ray Train loop without a model: draw ``steps`` batches from the job's own loader."""
    import ray.train
    import torch

    from mvdream_platform.training.loop import make_loader

    cfg = TrainJobConfig.from_dict(config["job"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(1)
    batches = iter(make_loader(cfg, rank, world, start_micro_step=0))
    for _ in range(config["warmup"]):
        next(batches)
    images, start = 0, time.perf_counter()
    for _ in range(config["steps"]):
        images += next(batches).images.shape[0]
    seconds = time.perf_counter() - start
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"images": images, "seconds": seconds}))
    ray.train.report({"images": images, "seconds": seconds})


def ingest_capacity(cfg: TrainJobConfig, warmup: int, steps: int, out: Path) -> float:
    """Images/s the loader delivers to all workers together (their batches summed over the
    slowest worker's time)."""
    from ray.train import DataConfig as RayDataConfig
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mvdream_platform.data.ray_ingest import build_datasets

    out.mkdir(parents=True)
    data = {}
    if cfg.data.loader == "ray_data":
        data = {"datasets": build_datasets(cfg.data, seed=0, steps=warmup + steps,
                                           world=cfg.cluster.num_workers,
                                           cpus_per_task=cfg.data.ingest_cpus_per_task),
                "dataset_config": RayDataConfig(datasets_to_split="all")}
    TorchTrainer(_drain, train_loop_config={"job": cfg.to_dict(), "warmup": warmup, "steps": steps, "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=cfg.run.name, storage_path=cfg.run.storage_path), **data).fit()
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return sum(r["images"] for r in ranks) / max(r["seconds"] for r in ranks)


def in_training(cfg: TrainJobConfig, warmup: int) -> dict:
    from mvdream_platform.training.trainer import run_training

    start = time.perf_counter()
    run_training(cfg)
    wall = time.perf_counter() - start
    windows = [m for m in read_metrics(Path(cfg.run.storage_path) / cfg.run.name / "tracking") if m["step"] > warmup]
    step = statistics.mean(m["step_time_s"] for m in windows)
    data = statistics.mean(m["data_time_s"] for m in windows)
    return {"images_per_s": statistics.mean(m["images_per_s"] for m in windows), "step_time_s": step,
            "data_time_s": data, "data_share": data / step, "run_wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=64, help="multi-view objects (8 views each)")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--dataloader-workers", type=int, default=2, help="loader=mixture: processes per worker")
    parser.add_argument("--drain-steps", type=int, default=20)
    parser.add_argument("--train-steps", type=int, default=20, help="measured steps per training run")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "ingest.json"))
    args = parser.parse_args()

    import ray

    os.environ["MVDREAM_STORE_LATENCY_MS"] = str(args.latency_ms)
    latency_fs.register()
    here = str(Path(__file__).resolve().parent)
    # every Ray worker registers slow:// too; the job gives a local cluster 2 logical CPUs more
    # than the machine for Ray Data's tasks (trainer.run_training), the same for both loaders
    ray.init(num_cpus=(os.cpu_count() or 1) + 2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([here, *sys.path]),
                                       "MVDREAM_STORE_LATENCY_MS": str(args.latency_ms)},
                          "worker_process_setup_hook": "latency_fs.register"})
    capacity, training = [], []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        start = time.perf_counter()
        mv, img = prepare_shards(Path(tmp) / "data", args.objects)
        print(f"prepared {args.objects} objects x 8 views + {2 * args.objects} images at 256 px in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        runs = str(Path(tmp) / "runs")
        for resolution in (32, 256):
            for workers in (1, 2):
                for loader in LOADERS:
                    name = f"drain-{loader}-{resolution}-w{workers}"
                    cfg = job(loader, workers, resolution, args.warmup + args.drain_steps, mv, img, runs, name,
                              args.dataloader_workers)
                    rate = ingest_capacity(cfg, args.warmup, args.drain_steps, Path(tmp) / name)
                    capacity.append({"loader": loader, "resolution": resolution, "workers": workers,
                                     "images_per_s": round(rate, 1)})
                    print(json.dumps(capacity[-1]), flush=True)
        if not args.skip_training:
            for workers in (1, 2):
                for loader in LOADERS:
                    name = f"train-{loader}-w{workers}"
                    cfg = job(loader, workers, 32, args.warmup + args.train_steps, mv, img, runs, name,
                              args.dataloader_workers)
                    row = {"loader": loader, "resolution": 32, "workers": workers,
                           **{k: round(v, 4) for k, v in in_training(cfg, args.warmup).items()}}
                    training.append(row)
                    print(json.dumps(row), flush=True)

    def speedup(rows, **where):
        pick = {r["workers"]: r["images_per_s"] for r in rows if all(r[k] == v for k, v in where.items())}
        return round(pick[2] / pick[1], 2) if 1 in pick and 2 in pick else None

    record = {"benchmark": "ingest", "date": time.strftime("%Y-%m-%d"), "machine": describe(("torch", "ray")),
              "settings": {"store": f"slow:// (local disk + {args.latency_ms:g} ms per request)",
                           "objects": args.objects, "views_per_object": 8, "shard_resolution": 256,
                           "objects_per_shard": 16, "image_rows": 2 * args.objects,
                           "per_worker_batch": "8 objects x 4 views or 32 images (p_multiview 0.7)",
                           "dataloader_workers": args.dataloader_workers, "warmup_batches": args.warmup,
                           "drain_batches": args.drain_steps, "train_steps": args.train_steps},
              "ingest_capacity": capacity, "training": training,
              "speedup_2_workers": {
                  "capacity": {f"{loader}_{res}px": speedup(capacity, loader=loader, resolution=res)
                               for loader in LOADERS for res in (32, 256)},
                  "training": {loader: speedup(training, loader=loader) for loader in LOADERS}}}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["speedup_2_workers"]))


if __name__ == "__main__":
    main()
