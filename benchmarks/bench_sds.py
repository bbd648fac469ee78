"""Text-to-3D SDS iteration cost: the per-phase breakdown, and nerfacc against plain-torch compositing.

Two measurements in ONE process, with interleaved repetitions so drifts in machine load hit
every variant alike (a global warm-up of ``--warmup`` iterations per variant first):

1. **SDS iterations** of the real code (``build_scene``, ``VolumeRenderer.render``,
   ``MultiViewGuidance``, ``build_optimizer``'s AdamW; the tiny sds config and the shipped
   tiny model as the prior; one group of 4 views) at each ``--resolutions`` render size, with
   albedo steps (no normals, as the warm-up steps) and lit steps (diffuse with a point
   light: analytic normals, i.e. a double backward, plus the orientation loss). Each
   iteration is the library's ``train_step`` itself, its phases timed with
   ``time.perf_counter`` through its ``on_phase`` hook:

   * setup: camera, shading and background draws;
   * render fwd: ``renderer.render`` (rays, stratified samples, field, nerfacc compositing);
   * guidance fwd: ``guidance(...)`` (resize/encode the renders, the UNet's CFG forward over
     2N images, the x0-reconstruction loss) plus the orientation loss term; "of which UNet"
     is ``predict_eps`` alone (text embeddings are cached after the first step);
   * backward: ``loss.backward()`` through the resize and the renderer into the field;
   * optimizer: ``optimizer.step()`` and ``update_occupancy`` (a no-op on CPU).

2. **Render forward+backward, nerfacc against plain torch** (CPU only): the same renderer's
   rays, stratified samples (same generator seed) and field evaluation, composited once by
   ``VolumeRenderer.render`` (nerfacc's batched ``render_weight_from_density`` and
   ``accumulate_along_rays``) and once by :func:`plain_torch_render` (alpha = 1 - exp(-sigma
   delta), transmittance by an exclusive cumprod of 1 - alpha, weights, sums). The script
   asserts that both give the same image, opacity and depth (max abs diff < 1e-4) before
   timing. Also times the compositing step alone on fixed inputs. Albedo, no normals
   (normals would add the same field cost to both sides).

On ``--device cuda`` (when CUDA is available; otherwise the script says so and exits 0) it
measures part 1 on the occupancy-grid path (nerfacc's ``OccGridEstimator``, packed samples)
at 64 and 256 px, with ``torch.cuda.synchronize()`` around each phase; the grid is updated a
few times before timing so it reflects the initial blob. Part 2 is skipped there (the CUDA
path's samples are not the CPU path's). Results go to ``results/sds_cuda.json`` by default.

Needs an otherwise idle machine (the load average at start is recorded). The default settings
(3 repeats x 5 SDS iterations per variant after 2 warm-up ones, 3 render pairs per repeat) were
sized for about 4-5 minutes on 2 idle cores, 64 px lit steps being most of it; the script
prints its wall time.

    .venv/bin/python benchmarks/bench_sds.py [--repeats 3] [--iters 5] [--baseline-iters 3]
        [--warmup 2] [--threads 2] [--resolutions 32 64] [--shadings albedo diffuse]
        [--device cpu|cuda] [--out results/sds.json]

Smoke test: ``.venv/bin/python benchmarks/bench_sds.py --repeats 1 --iters 2 --baseline-iters 1
--warmup 1 --out /tmp/sds.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mvdream_platform.cameras import get_rays, sample_camera_groups
from mvdream_platform.pipelines import MVDreamPipeline
from mvdream_platform.sds.config import SDSConfig
from mvdream_platform.sds.guidance import MultiViewGuidance
from mvdream_platform.sds.optimize import build_optimizer, build_scene, step_generator, train_step
from mvdream_platform.sds.render import ray_sphere_intersect

from machine_info import describe

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("setup", "render_fwd", "guidance_fwd", "unet", "backward", "optimizer")
SEED = 0
TOLERANCE = 1e-4


# ----------------------------------------------------------------------------- timing helpers


def synchronizer(device: torch.device):
    """A function that waits for the device (CUDA kernels are asynchronous), or a no-op."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class TimedCall:
    """Wraps a callable and adds up the seconds spent in it (synchronised at both ends)."""

    def __init__(self, fn, sync):
        self.fn, self.sync, self.seconds = fn, sync, 0.0

    def __call__(self, *args, **kwargs):
        self.sync()
        start = time.perf_counter()
        result = self.fn(*args, **kwargs)
        self.sync()
        self.seconds += time.perf_counter() - start
        return result


# ----------------------------------------------------------------------------- part 1: SDS


# Arms: ``today`` is the 2026-12-04 CPU path (every stratified sample reaches the field, an
# 8-level grid), ``fast`` the shipped one (only samples in occupied cells of the occupancy
# grid, the config's levels: 6 in tiny.yaml).
ARMS = {"today": {"skip_empty_space": False, "n_levels": 8},
        "fast": {"skip_empty_space": True, "n_levels": None}}


@dataclasses.dataclass
class Variant:
    """One (arm, resolution, shading, normals) setting with its own scene and optimizer state."""

    arm: str
    resolution: int
    shading: str
    normal_type: str
    cfg: SDSConfig
    scene: object
    optimizer: torch.optim.Optimizer
    step: int = 0

    @property
    def name(self) -> str:
        normals = "" if self.shading == "albedo" else f" {self.normal_type}"
        return f"{self.arm} {self.resolution}px {self.shading}{normals}"


def variant_config(cfg: SDSConfig, arm: str, normal_type: str, resolution: int,
                   shading: str) -> SDSConfig:
    """The arm's field/render settings, a fixed render size, and one shading mode on every
    step (albedo: the warm-up never ends; diffuse: lit from step 0, never textureless)."""
    levels = ARMS.get(arm, {}).get("n_levels") or cfg.field.n_levels
    skip = ARMS[arm]["skip_empty_space"] if arm in ARMS else cfg.render.skip_empty_space
    if shading == "albedo":
        shade = dataclasses.replace(cfg.shading, ambient_only_steps=10**9)
    else:
        shade = dataclasses.replace(cfg.shading, ambient_only_steps=0, diffuse_prob=1.0,
                                    textureless_prob=0.0)
    out = dataclasses.replace(
        cfg, render=dataclasses.replace(cfg.render, skip_empty_space=skip),
        field=dataclasses.replace(cfg.field, normal_type=normal_type, n_levels=levels),
        cameras=dataclasses.replace(cfg.cameras, resolution=resolution, schedule=[]),
        shading=shade)
    out.validate()
    return out


def sds_iteration(v: Variant, guidance, unet_timer: TimedCall, prompt: str,
                  device: torch.device, sync) -> dict[str, float]:
    """One library ``train_step`` of ``v``, its phases timed through ``on_phase``."""
    step = v.step
    v.step += 1
    unet_timer.seconds = 0.0
    times: dict[str, float] = {}
    sync()
    start = last = time.perf_counter()

    def on_phase(name: str) -> None:
        nonlocal last
        sync()
        now = time.perf_counter()
        times[name], last = now - last, now

    train_step(v.scene, guidance, v.optimizer, prompt, v.cfg, step, step_generator(SEED, step),
               device, on_phase=on_phase)
    return times | {"unet": unet_timer.seconds, "total": last - start}


def warm_occupancy_grid(scene, cfg: SDSConfig) -> None:
    """A few grid updates so the timed steps skip the empty space around the initial blob
    (the CUDA path, and the CPU path with ``render.skip_empty_space``)."""
    renderer = scene.renderer
    if not renderer.skips_empty_space:
        return
    renderer.train()
    for k in range(0, 4):
        renderer.update_occupancy(k * cfg.render.occ_update_interval)


def bench_sds(cfg: SDSConfig, pipe, args, device: torch.device) -> list[dict]:
    sync = synchronizer(device)
    guidance = MultiViewGuidance(pipe, cfg.guidance)
    unet_timer = TimedCall(guidance.predict_eps, sync)
    guidance.predict_eps = unet_timer  # instance attribute: __call__ goes through the timer
    variants = []
    arms = ["cuda"] if device.type == "cuda" else args.arms
    for arm in arms:
        for resolution in args.resolutions:
            for shading in args.shadings:
                for normal_type in (["analytic"] if shading == "albedo" else args.normal_types):
                    vcfg = variant_config(cfg, arm, normal_type, resolution, shading)
                    scene = build_scene(vcfg, seed=SEED, device=device)
                    scene.renderer.train()
                    warm_occupancy_grid(scene, vcfg)
                    variants.append(Variant(arm, resolution, shading, normal_type, vcfg, scene,
                                            build_optimizer(scene, vcfg)))
    for v in variants:
        for _ in range(args.warmup):
            sds_iteration(v, guidance, unet_timer, args.prompt, device, sync)
    per_repeat: dict[str, list[dict[str, float]]] = {v.name: [] for v in variants}
    for repeat in range(args.repeats):  # interleaved: each repeat runs every variant once
        for v in variants:
            its = [sds_iteration(v, guidance, unet_timer, args.prompt, device, sync)
                   for _ in range(args.iters)]
            summary = {k: statistics.median(it[k] for it in its) for k in its[0]}
            per_repeat[v.name].append(summary)
            print(f"repeat {repeat} {v.name:>14}: {summary['total']:.3f} s/it "
                  f"(render {summary['render_fwd']:.3f}, guidance {summary['guidance_fwd']:.3f}, "
                  f"backward {summary['backward']:.3f})", flush=True)
    rows = []
    for v in variants:
        reps = per_repeat[v.name]
        occupied = float(v.scene.renderer.estimator.binaries.float().mean()) \
            if v.scene.renderer.skips_empty_space else 1.0
        row = {"arm": v.arm, "resolution": v.resolution, "shading": v.shading,
               "normal_type": v.normal_type if v.shading != "albedo" else None,
               "with_normals": v.shading != "albedo" or cfg.normals_every_step,
               "occupied_cells": round(occupied, 4)}
        for key in ("total",) + PHASES:
            row[f"{key}_s"] = round(statistics.median(r[key] for r in reps), 5)
        # What the phases do not cover: Python between them (should be ~0).
        other = row["total_s"] - sum(row[f"{p}_s"] for p in PHASES if p != "unet")
        row["other_s"] = round(other, 5) + 0.0  # + 0.0: no "-0.0" in the JSON
        row["iters_per_s"] = round(1.0 / row["total_s"], 3)
        row["repeat_totals_s"] = [round(r["total"], 4) for r in reps]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- part 2: baseline


def plain_composite(t_starts: torch.Tensor, t_ends: torch.Tensor, density: torch.Tensor,
                    values: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """Volume-rendering compositing of batched samples in plain torch (the baseline).

    t_starts, t_ends, density: (M, S); values: name -> (M, S, C), or None for the opacity.
    Returns name -> (M, C): sum_i w_i v_i, w_i = T_i alpha_i, alpha_i = 1 - exp(-sigma_i
    delta_i), T_i = prod_{j<i} (1 - alpha_j).
    """
    alpha = 1.0 - torch.exp(-density * (t_ends - t_starts))
    survive = torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha[:, :-1]], dim=1)
    weights = torch.cumprod(survive, dim=1) * alpha  # exclusive cumprod = transmittance
    return {name: weights.sum(dim=1, keepdim=True) if v is None else (weights[..., None] * v).sum(dim=1)
            for name, v in values.items()}


def plain_torch_render(renderer, c2w: torch.Tensor, fovy_deg: torch.Tensor, resolution: int,
                       bg_color: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Albedo render of ``renderer``'s field with the renderer's own rays, stratified samples
    and field query, composited by :func:`plain_composite` instead of nerfacc."""
    n = c2w.shape[0]
    origins, directions = get_rays(c2w, fovy_deg, resolution, resolution)
    origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
    n_rays = origins.shape[0]
    t_near, t_far, hit = ray_sphere_intersect(origins, directions, renderer.config.radius,
                                              renderer.config.near_plane)
    samples = renderer._samples_stratified(t_near, t_far, hit, generator)
    t_mid = samples.t_mid.reshape(-1, 1)
    points = samples.per_sample(origins) + t_mid * samples.per_sample(directions)
    out = renderer.field(points, with_normals=False)
    m, s = samples.t_starts.shape
    sums = plain_composite(samples.t_starts, samples.t_ends, out.density.reshape(m, s),
                           {"rgb": out.albedo.reshape(m, s, 3), "opacity": None,
                            "depth": t_mid.reshape(m, s, 1)})
    full = {k: v.new_zeros(n_rays, v.shape[-1]).index_copy(0, samples.ray_ids, v) for k, v in sums.items()}
    image = full["rgb"] + (1.0 - full["opacity"]) * bg_color.expand(n_rays, 3)
    return {"rgb": image.reshape(n, resolution, resolution, 3),
            "opacity": full["opacity"].reshape(n, resolution, resolution, 1),
            "depth": full["depth"].reshape(n, resolution, resolution, 1),
            "samples": m * s, "hit_rays": m}


def fixed_views(cfg: SDSConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    cams = sample_camera_groups(cfg.cameras.groups, cfg.cameras.views,
                                generator=torch.Generator().manual_seed(SEED), device=device,
                                elevation_range=tuple(cfg.cameras.elevation_range),
                                fovy_range=tuple(cfg.cameras.fovy_range),
                                distance_range=tuple(cfg.cameras.distance_range))
    return cams.camera_to_world(), cams.fovy_deg


def nerfacc_render(renderer, c2w, fovy, resolution: int, bg, seed: int) -> dict:
    """The real renderer (nerfacc's batched compositing), albedo, no normals; as the plain
    side's dict."""
    out = renderer.render(c2w, fovy, resolution, resolution, shading="albedo", bg_color=bg,
                          generator=torch.Generator().manual_seed(seed), with_normals=False)
    return {"rgb": out.rgb, "opacity": out.opacity, "depth": out.depth}


def plain_render(renderer, c2w, fovy, resolution: int, bg, seed: int) -> dict:
    return plain_torch_render(renderer, c2w, fovy, resolution, bg, torch.Generator().manual_seed(seed))


SIDES = {"nerfacc": nerfacc_render, "plain": plain_render}


def timed_fwd_bwd(render_fn, render_args: tuple, upstream: torch.Tensor, params) -> tuple[float, float]:
    """(forward s, backward s) of ``render_fn(*render_args)`` then
    ``(rgb * upstream).sum().backward()``."""
    for p in params:
        p.grad = None
    start = time.perf_counter()
    rgb = render_fn(*render_args)["rgb"]
    middle = time.perf_counter()
    (rgb * upstream).sum().backward()
    return middle - start, time.perf_counter() - middle


def check_same_image(scene, c2w, fovy, resolution: int, bg: torch.Tensor) -> dict:
    """Assert the nerfacc and plain renders agree (image, opacity, depth, and report grads)."""
    renderer, params = scene.renderer, list(scene.field.parameters())
    results = {}
    for name, render_fn in SIDES.items():
        for p in params:
            p.grad = None
        out = render_fn(renderer, c2w, fovy, resolution, bg, 1234)
        out["rgb"].square().sum().backward()
        results[name] = (out, [p.grad.clone() for p in params])
    (a, grads_a), (b, grads_b) = results["nerfacc"], results["plain"]
    diffs = {k: float((a[k] - b[k]).detach().abs().max()) for k in ("rgb", "opacity", "depth")}
    for key, diff in diffs.items():
        assert diff < TOLERANCE, f"{resolution}px: plain-torch {key} differs from nerfacc's by {diff:.3g}"
    grad_rel = max(float((ga - gb).abs().max() / ga.abs().max().clamp_min(1e-12))
                   for ga, gb in zip(grads_a, grads_b))
    for p in params:
        p.grad = None
    return {"max_abs_diff": diffs, "max_rel_grad_diff": grad_rel, "samples": b["samples"],
            "hit_rays": b["hit_rays"], "rays": c2w.shape[0] * resolution * resolution}


def bench_baseline(cfg: SDSConfig, args, device: torch.device) -> list[dict]:
    cfg = variant_config(cfg, "today", cfg.field.normal_type, cfg.cameras.resolution, "albedo")  # dense samples
    scene = build_scene(cfg, seed=SEED, device=device)
    renderer = scene.renderer.train()  # stratified jitter on, as in training
    params = list(scene.field.parameters())
    c2w, fovy = fixed_views(cfg, device)
    bg = torch.tensor([0.5, 0.5, 0.5], device=device)
    setups, rows = {}, []
    for resolution in args.resolutions:
        check = check_same_image(scene, c2w, fovy, resolution, bg)
        print(f"{resolution}px: plain torch == nerfacc (max abs diff rgb "
              f"{check['max_abs_diff']['rgb']:.2e}, opacity {check['max_abs_diff']['opacity']:.2e}, "
              f"depth {check['max_abs_diff']['depth']:.2e}; grads rel {check['max_rel_grad_diff']:.1e})",
              flush=True)
        upstream = torch.randn(c2w.shape[0], resolution, resolution, 3,
                               generator=torch.Generator().manual_seed(7)).to(device)
        # Fixed inputs for the compositing-only timing: one stratified draw, the field's density.
        gen = torch.Generator().manual_seed(99)
        o, d = get_rays(c2w, fovy, resolution, resolution)
        o, d = o.reshape(-1, 3), d.reshape(-1, 3)
        t_near, t_far, hit = ray_sphere_intersect(o, d, renderer.config.radius, renderer.config.near_plane)
        samples = renderer._samples_stratified(t_near, t_far, hit, gen)
        points = samples.per_sample(o) + samples.t_mid.reshape(-1, 1) * samples.per_sample(d)
        with torch.no_grad():
            field_out = scene.field(points)
        setups[resolution] = (check, upstream, samples, field_out, o.shape[0])
    keys = ("nerfacc_fwd", "nerfacc_bwd", "plain_fwd", "plain_bwd", "nerfacc_comp", "plain_comp")
    times = {r: {k: [] for k in keys} for r in args.resolutions}
    for it in range(args.warmup + args.repeats * args.baseline_iters):  # interleaved per iteration
        for resolution in args.resolutions:
            check, upstream, samples, field_out, n_rays = setups[resolution]
            seed = 10_000 + it  # both sides draw the same stratified samples
            # Alternate which side goes first (allocator and cache state).
            order = ("plain", "nerfacc") if it % 2 else ("nerfacc", "plain")
            measured = {side: timed_fwd_bwd(SIDES[side], (renderer, c2w, fovy, resolution, bg, seed),
                                            upstream, params) for side in order}
            (fwd_a, bwd_a), (fwd_b, bwd_b) = measured["nerfacc"], measured["plain"]
            comp_a, comp_b = time_composite_only(renderer, samples, field_out, n_rays)
            if it >= args.warmup:
                for key, value in zip(keys, (fwd_a, bwd_a, fwd_b, bwd_b, comp_a, comp_b)):
                    times[resolution][key].append(value)
    for resolution in args.resolutions:
        check = setups[resolution][0]
        med = {k: statistics.median(v) for k, v in times[resolution].items()}
        nerfacc_total = med["nerfacc_fwd"] + med["nerfacc_bwd"]
        plain_total = med["plain_fwd"] + med["plain_bwd"]
        rows.append({
            "resolution": resolution, "rays": check["rays"], "hit_rays": check["hit_rays"],
            "samples": check["samples"],
            **{f"{k}_s": round(v, 5) for k, v in med.items()},
            "nerfacc_fwd_bwd_s": round(nerfacc_total, 5), "plain_fwd_bwd_s": round(plain_total, 5),
            "plain_over_nerfacc": round(plain_total / nerfacc_total, 3),
            "composite_plain_over_nerfacc": round(med["plain_comp"] / med["nerfacc_comp"], 3),
            "max_abs_diff": {k: float(f"{v:.3g}") for k, v in check["max_abs_diff"].items()},
            "max_rel_grad_diff": float(f"{check['max_rel_grad_diff']:.3g}"),
        })
    return rows


def time_composite_only(renderer, samples, field_out, n_rays: int) -> tuple[float, float]:
    """Forward+backward seconds of the compositing step alone: the renderer's (nerfacc) and
    :func:`plain_composite` (+ the same scatter into all rays), on the same fixed inputs."""
    m, s = samples.t_starts.shape
    timings = []
    for which in ("nerfacc", "plain"):
        density = field_out.density.detach().clone().requires_grad_(True)
        albedo = field_out.albedo.detach().clone().requires_grad_(True)
        depth = samples.t_mid.reshape(-1, 1)
        start = time.perf_counter()
        if which == "nerfacc":
            _, sums = renderer._composite(samples, density, {"rgb": albedo, "opacity": None,
                                                             "depth": depth}, n_rays)
        else:
            per_ray = plain_composite(samples.t_starts, samples.t_ends, density.reshape(m, s),
                                      {"rgb": albedo.reshape(m, s, 3), "opacity": None,
                                       "depth": depth.reshape(m, s, 1)})
            sums = {k: v.new_zeros(n_rays, v.shape[-1]).index_copy(0, samples.ray_ids, v)
                    for k, v in per_ray.items()}
        (sums["rgb"].sum() + sums["opacity"].sum()).backward()
        timings.append(time.perf_counter() - start)
    return timings[0], timings[1]


# ----------------------------------------------------------------------------- report


def load_config(path: Path) -> SDSConfig:
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    cfg = SDSConfig.from_dict(values)
    cfg.validate()
    return cfg


def print_sds_table(rows: list[dict], device: torch.device, cfg: SDSConfig) -> None:
    print(f"\nSDS iteration on {device.type}, {cfg.cameras.groups}x{cfg.cameras.views} views, "
          f"{cfg.render.num_samples_per_ray} samples/ray (CPU path), medians in seconds")
    print("| arm | px | shading | normals | occupied cells | s/it | it/s | setup | render fwd | "
          "guidance fwd | of which UNet | backward | optimizer |")
    print("|" + " --- |" * 13)
    for r in rows:
        print(f"| {r['arm']} | {r['resolution']} | {r['shading']} | {r['normal_type'] or '-'} | "
              f"{r['occupied_cells']:.0%} | {r['total_s']:.3f} | {r['iters_per_s']:.2f} | "
              f"{r['setup_s']:.4f} | {r['render_fwd_s']:.3f} | {r['guidance_fwd_s']:.3f} | "
              f"{r['unet_s']:.3f} | {r['backward_s']:.3f} | {r['optimizer_s']:.4f} |")


def print_baseline_table(rows: list[dict]) -> None:
    print("\nRender forward+backward (albedo, no normals), nerfacc batched vs plain torch, medians in s")
    print("| px | rays hit / all | samples | nerfacc fwd | nerfacc bwd | nerfacc fwd+bwd | plain fwd | "
          "plain bwd | plain fwd+bwd | plain / nerfacc | compositing only: nerfacc | plain | "
          "plain / nerfacc | max abs diff rgb |")
    print("|" + " --- |" * 14)
    for r in rows:
        print(f"| {r['resolution']} | {r['hit_rays']} / {r['rays']} | {r['samples']} | "
              f"{r['nerfacc_fwd_s']:.3f} | {r['nerfacc_bwd_s']:.3f} | {r['nerfacc_fwd_bwd_s']:.3f} | "
              f"{r['plain_fwd_s']:.3f} | {r['plain_bwd_s']:.3f} | {r['plain_fwd_bwd_s']:.3f} | "
              f"**{r['plain_over_nerfacc']:.2f}** | {r['nerfacc_comp_s']:.4f} | {r['plain_comp_s']:.4f} | "
              f"{r['composite_plain_over_nerfacc']:.2f} | {r['max_abs_diff']['rgb']:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--iters", type=int, default=5, help="timed SDS iterations per variant and repeat")
    parser.add_argument("--baseline-iters", type=int, default=3,
                        help="timed nerfacc/plain render pairs per resolution and repeat")
    parser.add_argument("--warmup", type=int, default=2, help="discarded iterations per variant")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the occupancy-grid path (skipped cleanly without CUDA)")
    parser.add_argument("--resolutions", type=int, nargs="+",
                        help="render sizes (default: 32 64 on cpu, 64 256 on cuda)")
    parser.add_argument("--shadings", nargs="+", default=["albedo", "diffuse"],
                        choices=["albedo", "diffuse", "textureless"])
    parser.add_argument("--arms", nargs="+", default=["today", "fast"], choices=sorted(ARMS),
                        help="CPU sampling arms: today (dense) and fast (empty-space skipping)")
    parser.add_argument("--normal-types", nargs="+", default=["analytic", "finite_difference"],
                        choices=["analytic", "finite_difference"], help="normals of the lit variants")
    parser.add_argument("--sds-config", type=Path, default=REPO / "conf" / "sds" / "tiny.yaml")
    parser.add_argument("--model", type=Path, default=REPO / "checkpoints" / "tiny",
                        help="MVDreamPipeline folder used as the prior")
    parser.add_argument("--prompt", default="a red cube")
    parser.add_argument("--skip-baseline", action="store_true", help="only the SDS breakdown")
    parser.add_argument("--out", type=Path, help="default: results/sds.json (cpu), results/sds_cuda.json (cuda)")
    args = parser.parse_args()
    if min(args.repeats, args.iters, args.baseline_iters) < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats, --iters and --baseline-iters must be >= 1, --warmup >= 0, --threads >= 1")

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_sds: --device cuda asked for, but CUDA is not available to this torch "
              f"({torch.__version__}); skipping the occupancy-grid measurements, nothing written.")
        sys.exit(0)
    device = torch.device(args.device)
    if args.resolutions is None:
        args.resolutions = [64, 256] if device.type == "cuda" else [32, 64]
    if args.out is None:
        args.out = RESULTS / ("sds_cuda.json" if device.type == "cuda" else "sds.json")
    torch.set_num_threads(args.threads)
    info = describe(("torch", "nerfacc"))  # before the work, so the load average is the machine's own
    began = time.perf_counter()

    cfg = load_config(args.sds_config)
    pipe = MVDreamPipeline.from_pretrained(str(args.model)).to(device)
    pipe.set_progress_bar_config(disable=True)
    print(f"bench_sds on {device.type}: {info['cpu']}, {info['torch_threads']} torch threads, "
          f"load average {info['load_average_at_start']}", flush=True)

    sds_rows = bench_sds(cfg, pipe, args, device)
    baseline_rows = []
    if device.type == "cpu" and not args.skip_baseline:
        print(flush=True)
        baseline_rows = bench_baseline(cfg, args, device)
    elif device.type == "cuda":
        print("(nerfacc vs plain-torch comparison skipped on cuda: the occupancy-grid path's "
              "packed samples are not the CPU path's stratified ones)")

    print_sds_table(sds_rows, device, cfg)
    if baseline_rows:
        print_baseline_table(baseline_rows)
    wall = time.perf_counter() - began
    print(f"\nwall time {wall:.0f} s")
    record = {
        "benchmark": "sds_iteration", "date": time.strftime("%Y-%m-%d"), "device": device.type,
        "machine": info,
        "settings": {"sds_config": str(args.sds_config.relative_to(REPO)
                                       if args.sds_config.is_relative_to(REPO) else args.sds_config),
                     "model": str(args.model.relative_to(REPO) if args.model.is_relative_to(REPO) else args.model),
                     "prompt": args.prompt, "groups": cfg.cameras.groups, "views": cfg.cameras.views,
                     "arms": {a: ARMS[a] for a in args.arms}, "normal_types": args.normal_types,
                     "occ_threshold": cfg.render.occ_threshold,
                     "samples_per_ray_cpu": cfg.render.num_samples_per_ray,
                     "resolutions": args.resolutions, "shadings": args.shadings,
                     "guidance_scale": cfg.guidance.guidance_scale, "repeats": args.repeats,
                     "iters": args.iters, "baseline_iters": args.baseline_iters, "warmup": args.warmup, "threads": args.threads,
                     "statistic": "median over iterations within a repeat, then median over repeats "
                                  "(SDS); median over all timed iterations (baseline)"},
        "sds": sds_rows, "render_baseline": baseline_rows, "wall_s": round(wall, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
