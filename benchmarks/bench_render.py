"""CPU mesh renderer throughput (views per second), one core and all cores.

For a ~1k-face and a ~100k-face mesh (vertex-coloured icospheres) and, when the shared data
is present, the textured Duck.glb, renders MVDream-style orbit views at 64x64 and 256x256
(and 256x256 with 2x2 supersampling, what data preparation uses) in ONE process with
interleaved repetitions, in two modes:

* one core: the process pinned to one CPU (``sched_setaffinity``), torch at 1 thread and the
  renderer's ray casting at 1 thread;
* all cores: every CPU allowed, ``num_threads`` = cores for the Embree ray casting (Embree
  releases the GIL), torch at that many threads.

BVH build (``prepare_mesh``) is timed separately: a job renders many views per mesh.
Prints a table and writes benchmarks/results/render.json with the machine described.

    .venv/bin/python benchmarks/bench_render.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import trimesh

from mvdream_platform.cameras import orbit_camera_to_world
from mvdream_platform.data import render

from machine_info import describe

RESULTS = Path(__file__).resolve().parent / "results"
MESHES = Path(__file__).resolve().parents[1] / "tests" / "data" / "meshes"
FOVY = 40.0
TARGET = 50.0  # views/s at 64x64, ~1k faces, one core
# (resolution, antialias) settings measured for every mesh.
SETTINGS = ((64, 1), (256, 1), (256, 2))
# Rays per timed call: enough views that per-call overhead is amortised as in a real job,
# few enough that the slowest setting stays under a second.
RAYS_PER_CALL = 1 << 21


def coloured_icosphere(subdivisions: int) -> trimesh.Trimesh:
    """Unit icosphere with random vertex colours (20 * 4**s faces), exercising barycentrics."""
    mesh = trimesh.creation.icosphere(subdivisions)
    rng = np.random.default_rng(0)
    mesh.visual.vertex_colors = rng.integers(0, 256, (len(mesh.vertices), 4), dtype=np.uint8)
    return mesh


def bench_meshes() -> dict[str, object]:
    meshes = {"icosphere-1k": coloured_icosphere(3), "icosphere-100k": coloured_icosphere(6)}
    duck = MESHES / "Duck.glb"
    if duck.is_file():
        meshes["Duck.glb (textured)"] = render.load_normalized_mesh(duck)[0]
    return meshes


def cameras(num_views: int) -> torch.Tensor:
    """(N, 4, 4) orbit cameras 360/N apart at elevation 15, the unit sphere filling the frame."""
    azimuth = torch.arange(num_views, dtype=torch.float32) * 360.0 / num_views
    return orbit_camera_to_world(torch.full((num_views,), 15.0), azimuth,
                                 render.distance_to_fit(FOVY, 1.1))


def set_mode(mode: str, all_cpus: set[int]) -> int:
    """Pin the process for ``mode`` ('one core' or 'all cores'); returns the thread count."""
    if mode == "one core":
        os.sched_setaffinity(0, {min(all_cpus)})
        threads = 1
    else:
        os.sched_setaffinity(0, all_cpus)
        threads = len(all_cpus)
    torch.set_num_threads(threads)
    return threads


def time_render(mesh, c2w: torch.Tensor, resolution: int, antialias: int, threads: int) -> float:
    """Seconds of one ``render_views`` call."""
    start = time.perf_counter()
    render.render_views(mesh, c2w, FOVY, resolution, antialias=antialias, num_threads=threads)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 64 px only (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS / "render.json")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    settings = SETTINGS[:1] if args.quick else SETTINGS
    all_cpus = set(os.sched_getaffinity(0))
    modes = ("one core", "all cores") if len(all_cpus) > 1 else ("one core",)

    meshes = bench_meshes()
    set_mode("one core", all_cpus)
    prepared, prepare_s = {}, {}
    for name, mesh in meshes.items():
        start = time.perf_counter()
        prepared[name] = render.prepare_mesh(mesh)
        render.render_views(prepared[name], cameras(1), FOVY, 8)  # Embree builds its BVH lazily
        prepare_s[name] = time.perf_counter() - start

    samples: dict[tuple[str, int, int, str], list[float]] = {}
    for _ in range(repeats):  # interleaved: drifts in machine load hit every variant alike
        for name, mesh in prepared.items():
            for resolution, antialias in settings:
                views = int(np.clip(RAYS_PER_CALL // (resolution * antialias) ** 2, 8, 512))
                c2w = cameras(views)
                for mode in modes:
                    threads = set_mode(mode, all_cpus)
                    seconds = time_render(mesh, c2w, resolution, antialias, threads)
                    samples.setdefault((name, resolution, antialias, mode), []).append(
                        views / seconds)
    set_mode("all cores", all_cpus)

    rows = []
    for (name, resolution, antialias, mode), rates in samples.items():
        rows.append({"mesh": name, "faces": prepared[name].num_faces, "resolution": resolution,
                     "antialias": antialias, "mode": mode,
                     "views_per_s": round(statistics.median(rates), 2),
                     "samples": [round(r, 2) for r in rates]})

    header = ("| mesh | faces | resolution | antialias | BVH build s | one core views/s | "
              f"all {len(all_cpus)} cores views/s | all / one |")
    print(header)
    print("|" + " --- |" * 8)
    for name in prepared:
        for resolution, antialias in settings:
            one = next(r for r in rows if r["mesh"] == name and r["resolution"] == resolution
                       and r["antialias"] == antialias and r["mode"] == "one core")
            every = next((r for r in rows if r["mesh"] == name and r["resolution"] == resolution
                          and r["antialias"] == antialias and r["mode"] == "all cores"), one)
            print(f"| {name} | {one['faces']} | {resolution}x{resolution} | {antialias} | "
                  f"{prepare_s[name]:.3f} | {one['views_per_s']:.1f} | "
                  f"{every['views_per_s']:.1f} | {every['views_per_s'] / one['views_per_s']:.2f} |")
    small = next(r for r in rows if r["mesh"] == "icosphere-1k" and r["resolution"] == 64
                 and r["antialias"] == 1 and r["mode"] == "one core")
    verdict = "met" if small["views_per_s"] >= TARGET else "NOT met"
    print(f"target >= {TARGET:.0f} views/s at 64x64, ~1k faces, one core: "
          f"{small['views_per_s']:.0f} views/s ({verdict})")

    machine = describe(("numpy", "torch", "trimesh", "embreex"), cores=len(all_cpus))
    result = {"benchmark": "render", "machine": machine, "fovy_deg": FOVY,
              "repeats": repeats, "statistic": "median over repeats of views / seconds",
              "bvh_build_s": {k: round(v, 4) for k, v in prepare_s.items()},
              "target": {"views_per_s": TARGET, "setting": "64x64, icosphere-1k, one core",
                         "measured": small["views_per_s"], "met": verdict == "met"},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
