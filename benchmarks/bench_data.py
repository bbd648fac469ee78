"""Data loading throughput against the tiny model's training consumption.

On synthetic fixtures in the prepared layout (render-like 32-view RGBA objects and photo-like
JPEG text-image pairs in parquet, 64-row row groups), written to a temporary folder at 32x32
and 256x256: items/s of MultiViewDataset and TextImageDataset (one process) and batches/s of
the mixture loader (8 objects x 4 views or 32 images per step, p_multiview 0.7) with
num_workers 0 and 2, in ONE process with interleaved repetitions. The loader must outpace
training: the ratio loader images/s / training images/s must exceed 1. Training consumption
is the tiny model's measured rate (results/unet.json, config tiny, mode 3d) and the faster
end of its range (8 images per 0.15 s step). Prints a table, writes results/data.json.

    .venv/bin/python benchmarks/bench_data.py [--sizes 32 256] [--repeats 3] [--steps 30]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mvdream_platform.data.datasets import MultiViewDataset, TextImageDataset
from mvdream_platform.data.mixture import MULTIVIEW, MixtureLoader

from machine_info import describe

RESULTS = Path(__file__).resolve().parent / "results"
# One writer of the fixture layout, shared with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_datasets import write_multiview_fixture, write_parquet  # noqa: E402

VIEWS, FRAMES, OBJECTS_PER_STEP, IMAGES_PER_STEP, P_MULTIVIEW = 32, 4, 8, 32, 0.7
FAST_TRAINING_IMAGES_PER_S = 8 / 0.15  # the faster end of the tiny model's 0.15-0.2 s/step


# ----------------------------------------------------------------------------- fixtures


def render_like_view(view: int, size: int) -> bytes:
    """A shaded, antialiased blob on transparency (compresses like our renders do)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size * 2 - 1
    turn = 2 * np.pi * view / VIEWS
    half_width = 0.5 + 0.2 * abs(np.cos(turn))  # the silhouette changes with azimuth
    r = np.sqrt((x / half_width) ** 2 + (y / 0.7) ** 2)
    alpha = np.clip((1 - r) * size / 2, 0, 1)
    shade = 0.55 + 0.45 * np.clip(np.cos(turn) * x - 0.5 * y, -1, 1)
    colour = np.array([0.9, 0.4, 0.2], np.float32) * shade[..., None]
    rgba = np.concatenate([colour, alpha[..., None]], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray((rgba * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def photo_like_row(i: int, size: int) -> dict:
    """A (1.25 size x size) JPEG with smooth structure plus grain, like a downsized photo."""
    rng = np.random.default_rng(i)
    w, h = size * 5 // 4, size
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), np.float32)
    pixels = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return {"key": f"{i:06d}", "image": buffer.getvalue(), "caption": f"a photo number {i}",
            "width": w, "height": h}


def write_fixture(root: Path, size: int, objects: int, rows: int) -> tuple[str, str]:
    mv, img = str(root / f"mv{size}"), str(root / f"img{size}")
    write_multiview_fixture(mv, num_objects=objects, num_rendered=VIEWS, resolution=size,
                            view_bytes=render_like_view)
    write_parquet(f"{img}/shard-00000.parquet", [photo_like_row(i, size) for i in range(rows)],
                  row_group_size=64)
    return mv, img


# ----------------------------------------------------------------------------- measurements


def time_dataset(dataset, count: int) -> float:
    """Items per second loading ``count`` items in a shuffled order (epoch 1, warm cache)."""
    order = np.random.default_rng(0).permutation(len(dataset))
    order = np.resize(order, count)
    dataset.load(int(order[0]), 0)  # warm-up: imports, first file handles
    start = time.perf_counter()
    for index in order:
        dataset.load(int(index), 1)
    return count / (time.perf_counter() - start)


def time_mixture(mv: str, img: str, size: int, workers: int, steps: int) -> dict:
    """Batches and images per second of the mixture, excluding worker start-up."""
    loader = MixtureLoader.from_uris(mv, img, resolution=size, num_workers=workers,
                                     multiview_batch=OBJECTS_PER_STEP,
                                     image_batch=IMAGES_PER_STEP, p_multiview=P_MULTIVIEW,
                                     num_steps=steps + 1)
    started = time.perf_counter()
    iterator = iter(loader)
    next(iterator)  # the first batch pays for forking workers and filling the pipeline
    first = time.perf_counter()
    images = sum(batch.images.shape[0] for batch in iterator)
    elapsed = time.perf_counter() - first
    return {"batches_per_s": steps / elapsed, "images_per_s": images / elapsed,
            "startup_s": first - started}


def training_images_per_s() -> dict:
    """The tiny model's consumption: measured (results/unet.json) and the fast end."""
    out = {"fast_end_images_per_s": round(FAST_TRAINING_IMAGES_PER_S, 1)}
    unet = RESULTS / "unet.json"
    if unet.exists():
        for row in json.loads(unet.read_text())["rows"]:
            if row["config"] == "tiny" and row["mode"] == "3d":
                out["measured_tiny_3d_images_per_s"] = row["images_per_s"]
    return out


def bench_size(size: int, args: argparse.Namespace, root: Path) -> list[dict]:
    t0 = time.perf_counter()
    mv_uri, img_uri = write_fixture(root, size, args.objects, args.rows)
    print(f"fixture {size}x{size}: {args.objects} objects x {VIEWS} views, {args.rows} rows "
          f"({time.perf_counter() - t0:.1f} s to write)", flush=True)
    mv = MultiViewDataset(mv_uri, resolution=size)
    img = TextImageDataset(img_uri, resolution=size)
    samples: dict[str, list[float]] = {}
    startup: dict[int, list[float]] = {0: [], 2: []}
    for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
        samples.setdefault("MultiViewDataset", []).append(
            time_dataset(mv, args.items) * FRAMES)
        samples.setdefault("TextImageDataset", []).append(time_dataset(img, args.items))
        for workers in (0, 2):
            result = time_mixture(mv_uri, img_uri, size, workers, args.steps)
            samples.setdefault(f"mixture workers={workers}", []).append(result["images_per_s"])
            startup[workers].append(result["startup_s"])
    rows = []
    for name, values in samples.items():
        images_per_s = statistics.median(values)
        per_item = FRAMES if name == "MultiViewDataset" else 1
        row = {"fixture": f"{size}x{size}", "loader": name,
               "images_per_s": round(images_per_s, 1),
               "samples_images_per_s": [round(v, 1) for v in values],
               "ratio_vs_training": round(images_per_s / FAST_TRAINING_IMAGES_PER_S, 1)}
        if not name.startswith("mixture"):
            row["items_per_s"] = round(images_per_s / per_item, 1)
        else:
            mean_batch = P_MULTIVIEW * OBJECTS_PER_STEP * FRAMES + (1 - P_MULTIVIEW) * IMAGES_PER_STEP
            row["batches_per_s"] = round(images_per_s / mean_batch, 2)
            row["startup_s"] = round(statistics.median(startup[int(name[-1])]), 2)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--objects", type=int, default=48, help="objects in the fixture")
    parser.add_argument("--rows", type=int, default=256, help="text-image rows in the fixture")
    parser.add_argument("--items", type=int, default=96, help="items per dataset timing")
    parser.add_argument("--steps", type=int, default=30, help="mixture steps per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "data.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        rows = [row for size in args.sizes for row in bench_size(size, args, Path(tmp))]
    training = training_images_per_s()
    print(f"\ntraining consumption: {training} images/s; ratio = loader images/s / "
          f"{FAST_TRAINING_IMAGES_PER_S:.1f}")
    print(f"{'fixture':8} {'loader':20} {'items/s':>9} {'images/s':>9} {'batches/s':>10} "
          f"{'ratio':>7} {'start s':>8}")
    for r in rows:
        print(f"{r['fixture']:8} {r['loader']:20} {r.get('items_per_s', float('nan')):9.1f} "
              f"{r['images_per_s']:9.1f} {r.get('batches_per_s', float('nan')):10.2f} "
              f"{r['ratio_vs_training']:7.1f} {r.get('startup_s', float('nan')):8.2f}")
    record = {"benchmark": "data_loading", "machine": describe(), "training": training,
              "batch": {MULTIVIEW: f"{OBJECTS_PER_STEP} objects x {FRAMES} views",
                        "image": IMAGES_PER_STEP, "p_multiview": P_MULTIVIEW},
              "fixture": {"objects": args.objects, "views": VIEWS, "rows": args.rows,
                          "row_group_size": 64},
              "repeats": args.repeats, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
