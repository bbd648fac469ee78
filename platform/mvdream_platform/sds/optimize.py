"""The text-to-3D optimisation loop: multi-view score distillation into a NeRF.

Read top to bottom, each step is the paper's §3.2 recipe:

1. cameras: ``groups`` groups of 4 views 90 degrees apart with a random azimuth offset, one
   elevation / fovy / distance per group (:func:`mvdream_platform.cameras.sample_camera_groups`);
2. shading: albedo only during the warm-up, then diffuse with a random point light, soft
   shading and textureless steps (:func:`.shading.sample_shading`); background learned, or a
   random solid colour for the whole batch half of the time;
3. render with nerfacc (:class:`.render.VolumeRenderer`: occupancy grid on CUDA, stratified
   samples on CPU);
4. guidance: the multi-view model's x0-reconstruction loss at one annealed timestep
   (:mod:`.guidance`), plus the orientation loss on lit steps;
5. AdamW with per-group learning rates; the occupancy grid update; log, render, checkpoint.

All randomness of step ``s`` comes from a generator seeded by (seed, s), so a resumed run
draws exactly what an uninterrupted one would, and the same seed gives the same field on CPU.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import storage
from ..cameras import orbit, sample_camera_groups
from .checkpoint import load_checkpoint, save_checkpoint
from .config import SDSConfig
from .field import NeRFField
from .guidance import DreamFusionGuidance, MultiViewGuidance
from .render import VolumeRenderer
from .shading import EnvironmentBackground, Shading, random_background_color, sample_shading

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


def step_generator(seed: int, step: int) -> torch.Generator:
    """Every random draw of step ``step`` (cameras, shading, background, timestep, noise)."""
    return torch.Generator().manual_seed(zlib.crc32(f"sds:{seed}:{step}".encode()))


@dataclass
class Scene:
    """The optimised parts: field, background and the renderer that combines them."""

    field: NeRFField
    background: EnvironmentBackground
    renderer: VolumeRenderer

    def modules(self) -> dict[str, torch.nn.Module]:
        """What a checkpoint holds: the weights and the occupancy grid (CUDA path state)."""
        return {"field": self.field, "background": self.background,
                "occupancy": self.renderer.estimator}


def build_scene(cfg: SDSConfig, seed: int, device: torch.device | str = "cpu") -> Scene:
    """Fresh field/background weights from ``seed`` (the renderer's grid state included)."""
    torch.manual_seed(seed)
    nerf = NeRFField(cfg.field).to(device)
    background = EnvironmentBackground().to(device)
    return Scene(nerf, background, VolumeRenderer(nerf, background, cfg.render))


def build_optimizer(scene: Scene, cfg: SDSConfig) -> torch.optim.Optimizer:
    """AdamW with the reference's per-group learning rates (grid, MLPs, background)."""
    lrs = {"encoding": cfg.optim.lr_encoding, "mlp": cfg.optim.lr_mlp,
           "background": cfg.optim.lr_background}
    groups = {**scene.field.parameter_groups(), **scene.background.parameter_groups()}
    unknown = set(groups) - set(lrs)
    if unknown:
        raise ValueError(f"parameter groups without a learning rate: {sorted(unknown)}")
    return torch.optim.AdamW([{"params": params, "lr": lrs[name], "name": name}
                              for name, params in groups.items() if params],
                             betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                             weight_decay=cfg.optim.weight_decay)


@dataclass
class RunResult:
    steps: int
    seconds: float
    resumed_from: int
    history: list[dict[str, Any]] = field(default_factory=list)


def optimise(scene: Scene, pipe, prompt: str, cfg: SDSConfig, out: str, *, seed: int = 0,
             tracker=None, progress: bool = True,
             on_log: Callable[[dict[str, float], str | None], None] | None = None) -> RunResult:
    """Run (or resume) the SDS optimisation of ``scene`` for ``prompt`` into ``out``.

    Args:
        scene: from :func:`build_scene` (its weights are overwritten by a checkpoint if
            ``out/checkpoints`` has one).
        pipe: any MVDreamPipeline (pixel or latent; the prior, frozen).
        out: the run's output folder (path or fsspec URI).
        tracker: a :class:`mvdream_platform.tracking.Tracker` or None.
        on_log: called after every logged window as ``on_log(metrics, checkpoint_folder)``;
            ``checkpoint_folder`` is ``out/checkpoints`` when this step also committed a
            checkpoint, else None (Ray Tune trials report through it).
    """
    from tqdm import tqdm

    cfg = cfg.scheduled()  # step-counted schedules stretched to this run's length
    device = next(scene.field.parameters()).device
    guidance_cls = MultiViewGuidance if cfg.guidance_kind == "mvdream" else DreamFusionGuidance
    guidance = guidance_cls(pipe, cfg.guidance)
    optimizer = build_optimizer(scene, cfg)
    folder = storage.join(out, CHECKPOINTS)
    start = load_checkpoint(folder, scene.modules(), optimizer)
    if start:
        log.info("resumed %s from step %d", out, start)
    scene.renderer.train()
    if start == 0:
        scene.renderer.update_occupancy(0)  # the grid of the initial blob: skip from step 0

    history: list[dict[str, Any]] = []
    window: list[dict[str, float]] = []
    began = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="text-to-3d",
               disable=not progress)
    for step in bar:
        generator = step_generator(seed, step)
        t0 = time.perf_counter()
        record = train_step(scene, guidance, optimizer, prompt, cfg, step, generator, device)
        record["step_time_s"] = time.perf_counter() - t0
        window.append(record)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            metrics = _mean(window) | {"step": done}
            window = []
            history.append(metrics)
            if tracker is not None:
                tracker.log(metrics, step=done)
            bar.set_postfix(loss=f"{metrics['loss']:.4g}", t=f"{metrics['t']:.0f}")
        if tracker is not None and (done % cfg.render_every == 0 or done == cfg.steps):
            views = render_orbit(scene, cfg, num_views=4, resolution=cfg.cameras.resolution)
            tracker.log_images("renders", views.rgb, step=done, ncols=4)
        saved = done % cfg.checkpoint_every == 0 or done == cfg.steps
        if saved:
            save_checkpoint(folder, done, scene.modules(), optimizer)
        if on_log is not None and history and history[-1]["step"] == done:
            on_log(history[-1], folder if saved else None)
    return RunResult(steps=cfg.steps, seconds=time.perf_counter() - began, resumed_from=start,
                     history=history)


def train_step(scene: Scene, guidance, optimizer, prompt: str, cfg: SDSConfig, step: int,
               generator: torch.Generator, device,
               on_phase: Callable[[str], None] | None = None) -> dict[str, float]:
    """One optimisation step; returns its scalars.

    ``on_phase(name)`` is called as each phase ends, in order: ``setup`` (camera, shading and
    background draws), ``render_fwd``, ``guidance_fwd`` (the distillation loss and the
    orientation term), ``backward``, ``optimizer`` (the step and the occupancy-grid update);
    ``benchmarks/bench_sds.py`` times the phases with it.
    """
    mark = on_phase or (lambda name: None)
    resolution, groups = cfg.cameras.at_step(step)
    cams = sample_camera_groups(
        groups, cfg.cameras.views, generator=generator, elevation_range=tuple(cfg.cameras.elevation_range),
        fovy_range=tuple(cfg.cameras.fovy_range), distance_range=tuple(cfg.cameras.distance_range),
        relative_distance=cfg.cameras.relative_distance,
        sphere_uniform_prob=cfg.cameras.sphere_uniform_prob, device=device)
    c2w = cams.camera_to_world()
    shading = sample_shading(cfg.shading, step, c2w[:, :3, 3], cfg.cameras.views, generator=generator)
    bg_color = random_background_color(generator, prob=0.5, device=device)
    # Normals cost a double backward: only lit steps (and the orientation loss) need them.
    with_normals = shading.needs_normals or cfg.normals_every_step
    mark("setup")
    out = scene.renderer.render(c2w, cams.fovy_deg, resolution, resolution, shading=shading,
                                bg_color=bg_color, generator=generator, with_normals=with_normals)
    mark("render_fwd")
    g = guidance(out.rgb, c2w, prompt, step, generator, angles=(cams.elevation_deg, cams.azimuth_deg))
    loss = g.loss
    orient = out.orientation_loss
    orient_weight = cfg.optim.orientation_weight(step)
    if orient is not None and orient_weight > 0:
        loss = loss + orient_weight * orient
    mark("guidance_fwd")
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss at step {step} (guidance {float(g.loss)}); "
                                 "lower the learning rates or the guidance scale")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    mark("backward")
    if cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for grp in optimizer.param_groups for p in grp["params"]],
                                       cfg.optim.grad_clip)
    optimizer.step()
    scene.renderer.update_occupancy(step + 1)
    mark("optimizer")
    return {"loss": float(loss.detach()), "loss_sds": float(g.loss.detach()),
            "loss_orient": float(orient.detach()) if orient is not None else 0.0,
            "t": float(g.t), "min_step": float(g.min_step), "max_step": float(g.max_step),
            "resolution": float(resolution), "opacity": float(out.opacity.detach().mean())}


@dataclass
class OrbitRenders:
    """Views of a scene as pictures (:func:`render_orbit`), numpy on the CPU.

    Attributes:
        rgb: (V, H, W, 3) uint8 over a solid grey background.
        opacity: (V, H, W) float32 in [0, 1].
        albedo: (V, H, W, 3) float32, the colour without background (the render over black
            divided by the opacity).
    """

    rgb: np.ndarray
    opacity: np.ndarray
    albedo: np.ndarray


@torch.no_grad()
def render_orbit(scene: Scene, cfg: SDSConfig, num_views: int, resolution: int,
                 shading: str = "albedo", c2w: torch.Tensor | None = None,
                 bg: float = 1.0, chunk: int = 8) -> OrbitRenders:
    """Render the evaluation orbit (or the given (V, 4, 4) cameras) in ``shading`` mode."""
    device = next(scene.field.parameters()).device
    if c2w is None:
        c2w = orbit(num_views, cfg.cameras.eval_elevation, cfg.cameras.eval_distance)
    fovy = torch.full((len(c2w),), float(cfg.cameras.eval_fovy))
    c2w, fovy = c2w.to(device), fovy.to(device)
    mode = Shading(mode=shading)
    over_black, opacities = [], []
    was_training = scene.renderer.training
    scene.renderer.eval()  # bin centres, no jitter: the same field renders the same pictures
    try:
        for i in range(0, len(c2w), chunk):
            out = scene.renderer.render(c2w[i:i + chunk], fovy[i:i + chunk], resolution, resolution,
                                        shading=mode, bg_color=torch.zeros(3, device=device),
                                        with_normals=mode.needs_normals)
            over_black.append(out.rgb.detach().clamp(0, 1))
            opacities.append(out.opacity.detach().clamp(0, 1))
    finally:
        scene.renderer.train(was_training)
    black, opacity = torch.cat(over_black), torch.cat(opacities)  # (V,H,W,3), (V,H,W,1)
    rgb = black + (1 - opacity) * bg
    return OrbitRenders(rgb=(rgb * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy(),
                        opacity=opacity[..., 0].cpu().numpy(),
                        albedo=(black / opacity.clamp_min(1e-4)).clamp(0, 1).cpu().numpy())


def _mean(records: list[dict[str, float]]) -> dict[str, float]:
    keys = records[0].keys()
    return {k: float(np.mean([r[k] for r in records if not math.isnan(r[k])] or [math.nan])) for k in keys}
