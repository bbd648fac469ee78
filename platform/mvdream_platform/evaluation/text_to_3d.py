"""Ground-truth quality of a text-to-3D result for prompts of the procedural vocabulary.

A prompt such as "a red cube", "a tall blue cylinder" or "a red cube with a yellow front"
names exactly one procedural object (a single primitive; "tall"/"flat"/"wide" get the middle
of their sampled aspect range; the front marker faces MVDream azimuth 0), so our renderer can
draw the truth at any camera and :mod:`mvdream_platform.data.shapes` gives its mesh.
:class:`ProceduralScorer` is the scorer that ``jobs/text_to_3d.py``, the benchmarks and the Tune
trials inject into :func:`mvdream_platform.sds.pipeline.run_text_to_3d`. It scores:

* **views** (held out: the SDS cameras are random; :func:`evaluation_orbit`), like the model
  evaluation (:mod:`mvdream_platform.evaluation.models`): silhouette IoU of the NeRF's opacity
  > 0.5 against the true alpha > 0.5, raw and aligned (both cropped to their bounding boxes:
  the prior does not fix the object's size); the dominant palette colour of the NeRF's albedo
  inside its silhouette against the truth's in that view (the prompt's colour, or for a marked
  object whichever of body and marker dominates the true view);
* **3D** (:mod:`.geometry`): the exported mesh against the true mesh after translation and
  scale alignment: volume IoU, Chamfer distance (truth radii), genus of the largest component
  against the truth's;
* **Janus** (:mod:`.janus`, marked prompts only): a 16-view orbit of the NeRF's albedo; on how
  many sides is the marker, and is it at the front? The truth's own verdict at the same
  cameras is reported beside it (``truth_verdict``, "single" when the metric works).

Prompts outside the vocabulary (anything else) have no ground truth: :func:`object_for_prompt`
returns None, the scorer returns None, and the run reports no quality numbers rather than
made-up ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..cameras import mvdream_to_orbit_azimuth, orbit
from ..data import shapes
from .metrics import aligned_iou, classify_colour, raw_iou, shaded_palette

if TYPE_CHECKING:
    from ..sds.pipeline import FinishedRun

_PROMPT = re.compile(r"^an? (?:(?P<adjective>\w+) )?(?P<colour>\w+) (?P<shape>\w+)"
                     r"(?: with an? (?P<front>\w+) front)?$")


def object_for_prompt(prompt: str) -> shapes.ProceduralObject | None:
    """The procedural object a single-primitive prompt describes, or None.

    Accepts "a red cube", "an orange cone", "a tall green cylinder", "a red cube with a yellow
    front", "a tall red cube with an orange front" (case and surrounding spaces ignored; a
    trailing suffix such as ", 3d asset" is not part of the object). A marker of the body's own
    colour, or one whose colour is left open ("with a front mark"), has no definite truth.
    """
    match = _PROMPT.match(prompt.strip().lower().split(",")[0].strip())
    if match is None:
        return None
    adjective, colour, shape, front = (match.group(k) for k in ("adjective", "colour", "shape", "front"))
    if colour not in shapes.COLOURS or shape not in shapes.SHAPES:
        return None
    if front is not None and (front not in shapes.COLOURS or front == colour):
        return None
    aspect = None
    if adjective is not None:
        if adjective not in shapes.SHAPE_ADJECTIVES[shape]:
            return None
        lo, hi = shapes._ASPECT_OVERRIDES.get((shape, adjective), shapes._ASPECT_RANGES[adjective])
        aspect = (lo + hi) / 2
    part = {"shape": shape, "colour": colour, "rgb": list(shapes.COLOURS[colour]),
            "adjective": adjective, "aspect": aspect, "size": 1.0,
            "front": front, "front_rgb": list(shapes.COLOURS[front]) if front else None}
    mesh, attributes = shapes.build_mesh({"parts": [part], "relation": None})
    return shapes.ProceduralObject(object_id=f"prompt-{shape}", caption=shapes.caption_for(attributes),
                                   attributes=attributes, mesh=mesh, seed=0)


def evaluation_orbit(num_views: int = 8, elevation_deg: float = 15.0, distance: float = 3.0,
                     azimuth_offset_deg: float = 22.5) -> torch.Tensor:
    """(V, 4, 4) c2w of the held-out orbit: orbit-convention azimuths ``offset + 360 k / V``,
    off the 4-view grid the model was asked for, at the reference distance 3.0."""
    return orbit(num_views, elevation_deg, distance,
                 azimuth_start_deg=azimuth_offset_deg - mvdream_to_orbit_azimuth(0.0))


def render_truth(obj: shapes.ProceduralObject, c2w: torch.Tensor, fovy_deg: float,
                 resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth at ``c2w``: (V, H, W, 3) lit colours in [0, 1], (V, H, W) bool mask."""
    from ..data import render

    rgba = render.render_views(obj.mesh, c2w, fovy_deg, resolution, antialias=2)
    alpha = rgba[..., 3].astype(np.float64) / 255
    return rgba[..., :3] / 255, alpha > 0.5


def score_views(albedo: np.ndarray, opacity: np.ndarray, truth_mask: np.ndarray,
                expected_colour: str | Sequence[str]) -> dict[str, Any]:
    """Per-view and mean scores.

    Args:
        albedo: (V, H, W, 3) the NeRF's albedo render in [0, 1] (no lighting, no background).
        opacity: (V, H, W) in [0, 1].
        truth_mask: (V, H, W) bool, the true silhouettes.
        expected_colour: palette name of the prompt's colour, or (V,) names, one per view
            (then each view's record has its ``expected`` and there is no ``expected_colour``).
    """
    if not (albedo.shape[:3] == opacity.shape == truth_mask.shape):
        raise ValueError(f"shape mismatch: albedo {albedo.shape}, opacity {opacity.shape}, "
                         f"truth {truth_mask.shape}")
    per_view = [expected_colour] * len(albedo) if isinstance(expected_colour, str) else list(expected_colour)
    if len(per_view) != len(albedo):
        raise ValueError(f"expected_colour: {len(per_view)} names for {len(albedo)} views")
    palette = shaded_palette()
    views = []
    for rgb, alpha, truth, expected in zip(albedo, opacity, truth_mask, per_view):
        mask = alpha > 0.5
        colour = classify_colour(rgb[mask], palette)
        view = {"iou": round(aligned_iou(mask, truth), 4), "iou_raw": round(raw_iou(mask, truth), 4),
                "colour": colour, "colour_correct": colour == expected}
        if not isinstance(expected_colour, str):
            view["expected"] = expected
        views.append(view)
    scores = {
        "views": views,
        "mean_iou": float(np.mean([v["iou"] for v in views])),
        "mean_iou_raw": float(np.mean([v["iou_raw"] for v in views])),
        "colour_accuracy": float(np.mean([v["colour_correct"] for v in views])),
    }
    if isinstance(expected_colour, str):  # per-view expectations are in the views
        scores["expected_colour"] = expected_colour
    return scores


@dataclass
class ProceduralScorer:
    """The procedural ground-truth scorer for :func:`~mvdream_platform.sds.pipeline.run_text_to_3d`.

    ``scorer(run)`` returns None for prompts outside the vocabulary, else the quality dict:
    ``object``, ``views``, ``mean_iou``, ``mean_iou_raw``, ``colour_accuracy``,
    ``expected_colour`` (held-out views, ``run.views`` of them at ``run.resolution``);
    ``volume_iou``, ``chamfer``, ``genus``, ``genus_truth``, ``topology_ok`` and ``geometry``
    (components, alignment, error) from the exported mesh; and for marked prompts ``janus``
    (:func:`mvdream_platform.evaluation.janus.score_janus`'s dict plus ``truth_verdict``).
    With ``run.out``, writes ``quality.png`` (NeRF views above the truth) and, for marked
    prompts, ``janus.png`` (the Janus orbit, NeRF above truth).

    Attributes:
        janus_views: views of the Janus orbit (MVDream azimuths ``360 k / V``).
        janus_resolution: their image side (thresholds are measured at 32 and 64 px).
        voxels: grid side of the volume IoU.
        chamfer_samples: surface samples per mesh for the Chamfer distance.
    """

    janus_views: int = 16
    janus_resolution: int = 32
    voxels: int = 64
    chamfer_samples: int = 8192

    def __call__(self, run: FinishedRun) -> dict[str, Any] | None:
        from .geometry import compare_geometry

        obj = object_for_prompt(run.prompt)
        if obj is None:
            return None
        part = obj.attributes["parts"][0]
        marker = part.get("front")
        c2w = evaluation_orbit(run.views, run.elevation_deg, run.distance)
        views = run.render(c2w, run.resolution)
        truth_rgb, truth = render_truth(obj, c2w, run.fovy_deg, run.resolution)
        expected: str | list[str] = part["colour"]
        if marker is not None:  # the true view decides which of body and marker dominates
            palette = shaded_palette()
            expected = [classify_colour(rgb[mask], palette) or part["colour"] for rgb, mask in zip(truth_rgb, truth)]
        quality: dict[str, Any] = {"object": obj.caption,
                                   **score_views(views.albedo, views.opacity, truth, expected)}
        quality["expected_colour"] = part["colour"]
        geometry = compare_geometry(run.mesh, obj.mesh, resolution=self.voxels, samples=self.chamfer_samples)
        for key in ("volume_iou", "chamfer", "genus", "genus_truth", "topology_ok"):
            quality[key] = geometry.pop(key)
        quality["geometry"] = geometry
        if run.out is not None:
            _write_pair(run.out, "quality.png", views.rgb, truth_rgb, truth)
        if marker is not None:
            quality["janus"] = self.janus(run, obj)
        return quality

    def janus(self, run: FinishedRun, obj: shapes.ProceduralObject) -> dict[str, Any]:
        """The Janus verdict of the run's field for a marked object (and the truth's)."""
        from .janus import janus_orbit, score_janus

        part = obj.attributes["parts"][0]
        azimuths, c2w = janus_orbit(self.janus_views, run.elevation_deg, run.distance)
        views = run.render(c2w, self.janus_resolution)
        result = score_janus(views.albedo, views.opacity, azimuths, part["front"], body=part["colour"])
        truth_rgb, truth = render_truth(obj, c2w, run.fovy_deg, self.janus_resolution)
        result["truth_verdict"] = score_janus(truth_rgb, truth.astype(np.float32), azimuths, part["front"])["verdict"]
        result["resolution"] = self.janus_resolution
        if run.out is not None:
            _write_pair(run.out, "janus.png", views.rgb, truth_rgb, truth)
        return result


def headline(quality: dict[str, Any] | None) -> dict[str, Any]:
    """The flat numbers of a quality dict (for trackers, tables and logs): ``iou``, ``iou_raw``,
    ``colour_accuracy``, ``volume_iou``, ``chamfer``, ``topology_ok`` and, for marked prompts,
    ``janus`` (the verdict) and ``janus_free`` (one marker, at the front). Empty without one."""
    if not quality:
        return {}
    numbers = {"iou": quality.get("mean_iou"), "iou_raw": quality.get("mean_iou_raw"),
               "colour_accuracy": quality.get("colour_accuracy"), "volume_iou": quality.get("volume_iou"),
               "chamfer": quality.get("chamfer"), "topology_ok": quality.get("topology_ok")}
    janus = quality.get("janus")
    if janus is not None:
        numbers["janus"] = janus["verdict"]
        numbers["janus_free"] = janus["verdict"] == "single" and bool(janus["front_correct"])
    return numbers


def _write_pair(out: str, name: str, rendered: np.ndarray, truth_rgb: np.ndarray, truth: np.ndarray) -> None:
    """``out/name``: the NeRF's (V, H, W, 3) uint8 views in a row above the truth on white."""
    from .. import storage

    truth_on_white = truth_rgb * truth[..., None] + (1 - truth[..., None])
    grid = np.concatenate([np.concatenate(list(rendered), 1),
                           np.concatenate(list((truth_on_white * 255).round().astype(np.uint8)), 1)], 0)
    storage.write_bytes(storage.join(out, name), storage.encode_png(grid))
