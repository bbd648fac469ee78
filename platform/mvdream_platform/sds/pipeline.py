"""Prompt in, 3D asset out: optimisation, exports and metrics of one text-to-3D run.

``run_text_to_3d`` is what ``jobs/text_to_3d.py`` (and later the Tune trials and the Serve
workers) call. Everything lands in ``out`` (path or fsspec URI):

* ``mesh.glb`` / ``mesh.obj`` / ``mesh.ply``: marching cubes on the density, vertex colours
  from the albedo;
* ``turntable.gif`` / ``turntable.mp4``: a 360-degree orbit (reference eval cameras);
* ``multiview.png``: 4 views 90 degrees apart;
* ``metrics.json``: prompt, steps, seconds, final losses and, for prompts of the procedural
  vocabulary, silhouette IoU and colour accuracy against ground truth at held-out views;
* ``checkpoints/``: the field, resumable (rerun with the same ``out``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from .. import storage
from ..evaluation.text_to_3d import evaluation_orbit, object_for_prompt, render_truth, score_views
from .config import SDSConfig
from .export import extract_mesh, orbit_cameras, write_mesh, write_multiview_png, write_turntable
from .optimize import Scene, build_scene, optimise, render_orbit

log = logging.getLogger(__name__)


def run_text_to_3d(prompt: str, pipe, cfg: SDSConfig, out: str, *, seed: int = 0,
                   device: torch.device | str = "cpu", tracker=None, progress: bool = True,
                   on_log=None) -> dict[str, Any]:
    """Optimise, export and score; returns the metrics record (also written to metrics.json).

    ``on_log(metrics, checkpoint_folder_or_None)`` is passed to :func:`.optimize.optimise`.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    cfg.validate()
    began = time.perf_counter()
    scene = build_scene(cfg, seed=seed, device=device)
    result = optimise(scene, pipe, prompt, cfg, out, seed=seed, tracker=tracker, progress=progress,
                      on_log=on_log)
    assets = export_assets(scene, cfg, out)
    record: dict[str, Any] = {
        "prompt": prompt, "seed": seed, "guidance": cfg.guidance_kind, "steps": result.steps,
        "resumed_from": result.resumed_from, "optimise_seconds": round(result.seconds, 2),
        "final": result.history[-1] if result.history else None, "assets": assets,
    }
    quality = score_against_truth(scene, cfg, prompt, out)
    if quality is not None:
        record["quality"] = quality
    record["total_seconds"] = round(time.perf_counter() - began, 2)
    storage.write_json(storage.join(out, "metrics.json"), record)
    if tracker is not None:
        summary = {"final_loss": (record["final"] or {}).get("loss")}
        if quality is not None:
            summary |= {"iou": quality["mean_iou"], "colour_accuracy": quality["colour_accuracy"]}
        tracker.summary(summary)
    return record


def export_assets(scene: Scene, cfg: SDSConfig, out: str) -> dict[str, str]:
    """Mesh files, turntable videos and the multi-view PNG; returns name -> URI."""
    ex = cfg.export
    assets: dict[str, str] = {}
    nerf = scene.field
    try:
        mesh = extract_mesh(nerf.density, lambda p: nerf(p).albedo, radius=cfg.field.radius,
                            resolution=ex.mesh_resolution, threshold=ex.mesh_threshold,
                            device=next(nerf.parameters()).device)
        assets |= {f"mesh.{k}": v for k, v in write_mesh(mesh, out, "mesh", tuple(ex.mesh_formats)).items()}
    except ValueError as error:  # an empty field: report it, keep the other assets
        log.warning("no mesh: %s", error)
        assets["mesh_error"] = str(error)
    c2w, _ = orbit_cameras(ex.turntable_frames, cfg.cameras.eval_elevation, cfg.cameras.eval_distance,
                           cfg.cameras.eval_fovy)
    frames = render_orbit(scene, cfg, ex.turntable_frames, ex.turntable_resolution, shading="albedo", c2w=c2w)
    assets |= {f"turntable.{k}": v for k, v in
               write_turntable(frames["rgb"], out, "turntable", fps=ex.turntable_fps).items()}
    views = render_orbit(scene, cfg, 4, ex.turntable_resolution, shading="albedo")
    assets["multiview.png"] = write_multiview_png(views["rgb"], out, "multiview.png")
    return assets


def score_against_truth(scene: Scene, cfg: SDSConfig, prompt: str, out: str | None = None) -> dict[str, Any] | None:
    """Ground-truth scores at held-out orbit views, or None for prompts outside the vocabulary.

    With ``out``, also writes ``quality.png``: the NeRF's views (top) above the truth (bottom).
    """
    obj = object_for_prompt(prompt)
    if obj is None:
        return None
    resolution = cfg.export.turntable_resolution
    c2w = evaluation_orbit(cfg.export.quality_views, cfg.cameras.eval_elevation, cfg.cameras.eval_distance)
    views = render_orbit(scene, cfg, len(c2w), resolution, shading="albedo", c2w=c2w)
    truth_rgb, truth = render_truth(obj, c2w, cfg.cameras.eval_fovy, resolution)
    scores = score_views(views["albedo"], views["opacity"], truth, obj.attributes["parts"][0]["colour"])
    scores["object"] = obj.caption
    if out is not None:
        truth_on_white = truth_rgb * truth[..., None] + (1 - truth[..., None])
        grid = np.concatenate([np.concatenate(list(views["rgb"]), 1),
                               np.concatenate(list((truth_on_white * 255).round().astype(np.uint8)), 1)], 0)
        storage.write_bytes(storage.join(out, "quality.png"), storage.encode_png(grid))
    return scores
