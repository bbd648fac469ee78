"""Ground-truth quality of a text-to-3D result for prompts of the procedural vocabulary.

A prompt such as "a red cube" or "a tall blue cylinder" names exactly one procedural object
(a single primitive; "tall"/"flat"/"wide" get the middle of their sampled aspect range), so
our renderer can draw the truth at any camera. The optimised NeRF is rendered at the same
orbit cameras (held out: the SDS cameras are random) and scored per view like the model
evaluation (:mod:`mvdream_platform.evaluation`):

* silhouette IoU: the NeRF's opacity > 0.5 against the true alpha > 0.5, raw and aligned
  (both cropped to their bounding boxes: the prior does not fix the object's size);
* colour: the dominant palette colour of the NeRF's albedo inside its silhouette.

Prompts outside the vocabulary (anything else) have no ground truth: :func:`object_for_prompt`
returns None and the job reports no quality numbers rather than made-up ones.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from ..cameras import orbit_camera_to_world
from ..data import shapes
from .metrics import aligned_iou, classify_colour, raw_iou, shaded_palette

_PROMPT = re.compile(r"^an? (?:(?P<adjective>\w+) )?(?P<colour>\w+) (?P<shape>\w+)$")


def object_for_prompt(prompt: str) -> shapes.ProceduralObject | None:
    """The procedural object a single-primitive prompt describes, or None.

    Accepts "a red cube", "an orange cone", "a tall green cylinder" (case and surrounding
    spaces ignored; a trailing suffix such as ", 3d asset" is not part of the object).
    """
    match = _PROMPT.match(prompt.strip().lower().split(",")[0].strip())
    if match is None:
        return None
    adjective, colour, shape = match.group("adjective"), match.group("colour"), match.group("shape")
    if colour not in shapes.COLOURS or shape not in shapes.SHAPES:
        return None
    aspect = None
    if adjective is not None:
        if adjective not in shapes.SHAPE_ADJECTIVES[shape]:
            return None
        lo, hi = shapes._ASPECT_OVERRIDES.get((shape, adjective), shapes._ASPECT_RANGES[adjective])
        aspect = (lo + hi) / 2
    part = {"shape": shape, "colour": colour, "rgb": list(shapes.COLOURS[colour]),
            "adjective": adjective, "aspect": aspect, "size": 1.0}
    mesh, attributes = shapes.build_mesh({"parts": [part], "relation": None})
    return shapes.ProceduralObject(object_id=f"prompt-{shape}", caption=shapes.caption_for(attributes),
                                   attributes=attributes, mesh=mesh, seed=0)


def evaluation_orbit(num_views: int = 8, elevation_deg: float = 15.0, distance: float = 3.0,
                     azimuth_offset_deg: float = 22.5) -> torch.Tensor:
    """(V, 4, 4) c2w of the held-out orbit: azimuths offset from the 4-view grid, reference
    distance 3.0 (orbit convention of :func:`mvdream_platform.cameras.orbit_camera_to_world`)."""
    azimuths = azimuth_offset_deg + torch.arange(num_views, dtype=torch.float64) * 360.0 / num_views
    return orbit_camera_to_world(torch.full((num_views,), elevation_deg), azimuths.float(),
                                 torch.full((num_views,), distance))


def render_truth(obj: shapes.ProceduralObject, c2w: torch.Tensor, fovy_deg: float,
                 resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth at ``c2w``: (V, H, W, 3) albedo-lit colours in [0, 1], (V, H, W) bool mask."""
    from ..data import render

    rgba = render.render_views(obj.mesh, c2w, fovy_deg, resolution, antialias=2)
    alpha = rgba[..., 3].astype(np.float64) / 255
    return rgba[..., :3] / 255, alpha > 0.5


def score_views(albedo: np.ndarray, opacity: np.ndarray, truth_mask: np.ndarray,
                expected_colour: str) -> dict[str, Any]:
    """Per-view and mean scores.

    Args:
        albedo: (V, H, W, 3) the NeRF's albedo render in [0, 1] (no lighting, no background).
        opacity: (V, H, W) in [0, 1].
        truth_mask: (V, H, W) bool, the true silhouettes.
        expected_colour: palette name of the prompt's colour.
    """
    if not (albedo.shape[:3] == opacity.shape == truth_mask.shape):
        raise ValueError(f"shape mismatch: albedo {albedo.shape}, opacity {opacity.shape}, "
                         f"truth {truth_mask.shape}")
    palette = shaded_palette()
    views = []
    for rgb, alpha, truth in zip(albedo, opacity, truth_mask):
        mask = alpha > 0.5
        colour = classify_colour(rgb[mask], palette)
        views.append({"iou": round(aligned_iou(mask, truth), 4), "iou_raw": round(raw_iou(mask, truth), 4),
                      "colour": colour, "colour_correct": colour == expected_colour})
    return {
        "views": views,
        "mean_iou": float(np.mean([v["iou"] for v in views])),
        "mean_iou_raw": float(np.mean([v["iou_raw"] for v in views])),
        "colour_accuracy": float(np.mean([v["colour_correct"] for v in views])),
        "expected_colour": expected_colour,
    }

