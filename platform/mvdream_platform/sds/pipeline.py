"""Prompt in, 3D asset out: optimisation, exports and (optionally) scores of one text-to-3D run.

``run_text_to_3d`` is what ``jobs/text_to_3d.py``, the Tune trials and the Serve workers call.
Everything lands in ``out`` (path or fsspec URI):

* ``mesh.glb`` / ``mesh.obj`` / ``mesh.ply``: marching cubes on the density, vertex colours
  from the albedo;
* ``turntable.gif`` / ``turntable.mp4``: a 360-degree orbit (reference eval cameras);
* ``multiview.png``: 4 views 90 degrees apart;
* ``metrics.json``: :meth:`TextTo3DResult.to_json` (prompt, steps, seconds, final losses,
  assets and, when a scorer was given and knows the prompt, its ``quality`` block);
* ``checkpoints/``: the field, resumable (rerun with the same ``out``).

Scoring is not part of the SDS core: the caller injects a :data:`Scorer` (the job, benchmarks
and Tune trials inject the procedural ground-truth scorer of
:mod:`mvdream_platform.evaluation.text_to_3d`; Serve injects none). This module imports nothing
from :mod:`mvdream_platform.evaluation`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import storage
from ..cameras import orbit
from .config import SDSConfig
from .export import extract_mesh, write_mesh, write_multiview_png, write_turntable
from .optimize import OrbitRenders, Scene, build_scene, optimise, render_orbit

log = logging.getLogger(__name__)

METRICS = "metrics.json"


@dataclass(frozen=True)
class FinishedRun:
    """What a scorer may look at once a run has optimised and exported its field.

    Attributes:
        prompt: the run's prompt.
        out: the run's output folder (a scorer may write pictures there), or None.
        seed: the run's seed.
        mesh: the exported mesh (``trimesh.Trimesh``, marching cubes in the field's
            coordinates: z up, inside ``[-radius, radius]^3``), or None when the field was empty.
        render: ``render(c2w, resolution)`` draws the field's albedo (no lighting) at cameras
            ``c2w`` (V, 4, 4) camera-to-world (torch or numpy; z-up world, OpenGL axes, as
            :func:`mvdream_platform.cameras.orbit_camera_to_world` builds them) with vertical
            field of view ``fovy_deg``, square images of side ``resolution``; returns numpy
            ``{"rgb": (V, H, W, 3) uint8 over white, "albedo": (V, H, W, 3) float32 in [0, 1],
            "opacity": (V, H, W) float32 in [0, 1]}``.
        fovy_deg, elevation_deg, distance: the run's evaluation cameras (the turntable's).
        resolution: the run's evaluation image side (the turntable's).
        views: how many held-out views a scorer should use for per-view scores.
    """

    prompt: str
    out: str | None
    seed: int
    mesh: Any
    render: Callable[[Any, int], OrbitRenders]
    fovy_deg: float
    elevation_deg: float
    distance: float
    resolution: int
    views: int

    @classmethod
    def of_scene(cls, scene: Scene, cfg: SDSConfig, prompt: str, out: str | None = None, *,
                 seed: int = 0, mesh=None) -> FinishedRun:
        """A scorer's view of ``scene`` (any field: a finished run's, a reloaded checkpoint's,
        the untrained blob) under ``cfg``'s evaluation cameras."""
        device = next(scene.field.parameters()).device

        def render(c2w, resolution: int) -> OrbitRenders:
            c2w = torch.as_tensor(np.asarray(c2w) if not isinstance(c2w, torch.Tensor) else c2w,
                                  dtype=torch.float32, device=device)
            return render_orbit(scene, cfg, len(c2w), int(resolution), shading="albedo", c2w=c2w)

        return cls(prompt=prompt, out=out, seed=seed, mesh=mesh, render=render,
                   fovy_deg=float(cfg.cameras.eval_fovy), elevation_deg=float(cfg.cameras.eval_elevation),
                   distance=float(cfg.cameras.eval_distance), resolution=int(cfg.export.turntable_resolution),
                   views=int(cfg.export.quality_views))


# A scorer: the finished run -> a JSON-able dict (written as metrics.json's "quality"), or None
# when it has nothing to say about this prompt (no ground truth).
Scorer = Callable[[FinishedRun], "dict[str, Any] | None"]


@dataclass
class TextTo3DResult:
    """The record of one run (``metrics.json`` is :meth:`to_json`)."""

    prompt: str
    seed: int
    guidance: str  # "mvdream" | "dreamfusion"
    steps: int
    resumed_from: int  # the step the run resumed from (0: a fresh run)
    optimise_seconds: float
    final: dict[str, float] | None  # the last logged window's scalars (loss, t, ...)
    assets: dict[str, str] = field(default_factory=dict)  # file name -> URI; "mesh_error" if none
    quality: dict[str, Any] | None = None  # the scorer's result; None without scorer or truth
    total_seconds: float = 0.0

    @property
    def final_loss(self) -> float | None:
        return (self.final or {}).get("loss")

    def files(self) -> list[str]:
        """The asset file names (``mesh.glb``, ``turntable.gif``, ...), sorted."""
        return sorted(name for name in self.assets if "." in name and not name.endswith("_error"))

    def to_json(self) -> dict[str, Any]:
        """metrics.json's content (``quality`` only when there is one). Asset files are named
        relative to the run folder (metrics.json's own folder), so the record never shows where
        the run lives (a server's storage path) and stays true when the folder is moved."""
        assets = {name: name if name in self.files() else value for name, value in self.assets.items()}
        record = {"prompt": self.prompt, "seed": self.seed, "guidance": self.guidance,
                  "steps": self.steps, "resumed_from": self.resumed_from,
                  "optimise_seconds": self.optimise_seconds, "final": self.final,
                  "assets": assets}
        if self.quality is not None:
            record["quality"] = self.quality
        record["total_seconds"] = self.total_seconds
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any], folder: str) -> TextTo3DResult:
        """Read back a metrics.json record found in ``folder`` (asset URIs resolve against it)."""
        result = cls(prompt=record["prompt"], seed=record["seed"], guidance=record["guidance"],
                     steps=record["steps"], resumed_from=record["resumed_from"],
                     optimise_seconds=record["optimise_seconds"], final=record.get("final"),
                     assets=dict(record.get("assets") or {}), quality=record.get("quality"),
                     total_seconds=record.get("total_seconds", 0.0))
        result.assets = {name: storage.join(folder, name) if name in result.files() else value
                         for name, value in result.assets.items()}
        return result


def run_text_to_3d(prompt: str, pipe, cfg: SDSConfig, out: str, *, seed: int = 0,
                   device: torch.device | str = "cpu", tracker=None, progress: bool = True,
                   on_log=None, scorer: Scorer | None = None) -> TextTo3DResult:
    """Optimise, export and (with ``scorer``) score; returns the record, also written to
    ``out/metrics.json``.

    ``on_log(metrics, checkpoint_folder_or_None)`` is passed to :func:`.optimize.optimise`.
    ``scorer(FinishedRun) -> dict | None`` runs after the exports; its dict becomes
    ``result.quality``. metrics.json is written before scoring too, so a scorer that raises
    leaves the run's record (without quality) behind and its error propagates.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    began = time.perf_counter()
    scene = build_scene(cfg, seed=seed, device=device)
    run = optimise(scene, pipe, prompt, cfg, out, seed=seed, tracker=tracker, progress=progress,
                   on_log=on_log)
    assets, mesh = export_assets(scene, cfg, out)
    result = TextTo3DResult(prompt=prompt, seed=seed, guidance=cfg.guidance_kind, steps=run.steps,
                            resumed_from=run.resumed_from, optimise_seconds=round(run.seconds, 2),
                            final=run.history[-1] if run.history else None, assets=assets)
    if scorer is not None:
        result.total_seconds = round(time.perf_counter() - began, 2)
        storage.write_json(storage.join(out, METRICS), result.to_json())
        result.quality = scorer(FinishedRun.of_scene(scene, cfg, prompt, out, seed=seed, mesh=mesh))
    result.total_seconds = round(time.perf_counter() - began, 2)
    storage.write_json(storage.join(out, METRICS), result.to_json())
    if tracker is not None:
        tracker.summary({"final_loss": result.final_loss})
    return result


def export_assets(scene: Scene, cfg: SDSConfig, out: str) -> tuple[dict[str, str], Any]:
    """Mesh files, turntable videos and the multi-view PNG; returns (name -> URI, the mesh or
    None when the field is empty)."""
    ex = cfg.export
    assets: dict[str, str] = {}
    nerf = scene.field
    mesh = None
    try:
        mesh = extract_mesh(nerf.density, lambda p: nerf(p).albedo, radius=cfg.field.radius,
                            resolution=ex.mesh_resolution, threshold=ex.mesh_threshold,
                            device=next(nerf.parameters()).device)
        assets |= {f"mesh.{k}": v for k, v in write_mesh(mesh, out, "mesh", tuple(ex.mesh_formats)).items()}
    except ValueError as error:  # an empty field: report it, keep the other assets
        log.warning("no mesh: %s", error)
        assets["mesh_error"] = str(error)
    c2w = orbit(ex.turntable_frames, cfg.cameras.eval_elevation, cfg.cameras.eval_distance)
    frames = render_orbit(scene, cfg, ex.turntable_frames, ex.turntable_resolution, shading="albedo", c2w=c2w)
    assets |= {f"turntable.{k}": v for k, v in
               write_turntable(frames.rgb, out, "turntable", fps=ex.turntable_fps).items()}
    views = render_orbit(scene, cfg, 4, ex.turntable_resolution, shading="albedo")
    assets["multiview.png"] = write_multiview_png(views.rgb, out, "multiview.png")
    return assets, mesh
