"""Evaluate a multi-view model against ground truth on held-out procedural objects.

For each held-out object (indices the training set never used), the model samples F views
from the object's caption at MVDream's orbit cameras, and our renderer draws the true object
at the same azimuths and elevation. Per view we score:

* **colour**: the dominant foreground colour, classified against the procedural palette as it
  looks under the renderer's lighting (albedo x [ambient, ambient + diffuse]), correct or not;
* **silhouette IoU**, two ways: ``iou_raw`` at the same pixels, and ``iou`` after cropping each
  silhouette to its bounding box and resizing to a common square. The model's camera embedding
  sees normalised (rotation-only) cameras and training renders vary fov and distance, so the
  object's size in frame is not determined by the camera; the aligned IoU measures shape.

The same colour classifier and mask extraction are applied to the ground truth as a check of
the metric itself (``gt_colour_accuracy`` should be ~1).

Cross-view consistency has a benchmark of its own: :mod:`.consistency`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..data.shapes import HELD_OUT_START
from .metrics import (
    aligned_iou,
    classify_colour,
    foreground_mask,
    raw_iou,
    shaded_palette,
)


@dataclass
class EvalSettings:
    num_objects: int = 40
    single_primitive_only: bool = True
    seed: int = 0
    shape_seed: int = 0  # the procedural set's seed
    num_views: int = 4
    elevation: float = 15.0
    steps: int = 30
    guidance_scale: float = 7.5
    resolution: int | None = None  # default: the model's
    gt_fovy_deg: float = 37.5  # middle of the training range 15..60
    gt_fill: float = 1.075  # middle of the training range 1..1.15
    foreground_threshold: float = 0.12  # colour distance from the background, in [0, 1]
    batch_prompts: int = 8


@dataclass
class EvalReport:
    objects: int = 0
    views: int = 0
    colour_accuracy: float = 0.0
    mean_iou: float = 0.0
    mean_iou_raw: float = 0.0
    gt_colour_accuracy: float = 0.0
    per_object: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def held_out_objects(settings: EvalSettings) -> list:
    """Held-out procedural objects (single primitives only, unless asked otherwise)."""
    from ..data.shapes import make_object

    objects, index = [], HELD_OUT_START
    while len(objects) < settings.num_objects:
        p_composite = 0.0 if settings.single_primitive_only else 0.5
        # Captions that name everything (the colour is what is scored): no open attributes,
        # no front markers (those have benchmarks of their own).
        objects.append(make_object(index, seed=settings.shape_seed, p_composite=p_composite,
                                   p_front=0.0, p_open=0.0))
        index += 1
    return objects


def render_ground_truth_rgba(obj, settings: EvalSettings, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """(F, H, W, 3) colours and (F, H, W) alpha, both float64 in [0, 1]: the true object at the
    evaluation cameras, before any background."""
    from ..cameras import mvdream_to_orbit_azimuth, orbit_camera_to_world
    from ..data import render

    azimuths = np.arange(settings.num_views) * 360.0 / settings.num_views
    distance = settings.gt_fill / math.sin(math.radians(settings.gt_fovy_deg) / 2)
    c2w = orbit_camera_to_world(settings.elevation, mvdream_to_orbit_azimuth(azimuths), distance)
    rgba = render.render_views(obj.mesh, c2w, settings.gt_fovy_deg, resolution, antialias=2)
    return rgba[..., :3] / 255, rgba[..., 3].astype(np.float64) / 255


def render_ground_truth(obj, settings: EvalSettings, resolution: int) -> np.ndarray:
    """(F, H, W, 3) in [0, 1]: the true object at the evaluation cameras on mid-grey."""
    rgb, alpha = render_ground_truth_rgba(obj, settings, resolution)
    alpha = alpha[..., None]
    return rgb * alpha + 0.5 * (1 - alpha)


def evaluate(pipe, settings: EvalSettings, progress: bool = True) -> tuple[EvalReport, np.ndarray]:
    """Score ``pipe`` on held-out objects; returns the report and a (2*N*H, F*W, 3) uint8 grid
    with each object's generated views above its ground truth."""
    from tqdm import tqdm

    objects = held_out_objects(settings)
    resolution = settings.resolution or pipe.default_size
    palette = shaded_palette()
    report, rows = EvalReport(objects=len(objects)), []
    correct = gt_correct = 0
    ious, raw_ious = [], []
    chunks = range(0, len(objects), settings.batch_prompts)
    for start in tqdm(chunks, desc="evaluate", disable=not progress):
        chunk = objects[start:start + settings.batch_prompts]
        generator = torch.Generator().manual_seed(settings.seed + start)
        generated = pipe([o.caption for o in chunk], num_views=settings.num_views,
                         elevation=settings.elevation, num_inference_steps=settings.steps,
                         guidance_scale=settings.guidance_scale, height=resolution, width=resolution,
                         generator=generator, output_type="np").images  # (B, F, H, W, 3)
        for obj, views in zip(chunk, generated):
            truth = render_ground_truth(obj, settings, resolution)
            expected = obj.attributes["parts"][0]["colour"]
            record = {"object_id": obj.object_id, "caption": obj.caption, "colour": expected,
                      "views": []}
            for view, gt in zip(views, truth):
                mask = foreground_mask(view, settings.foreground_threshold)
                gt_mask = foreground_mask(gt, settings.foreground_threshold)
                colour = classify_colour(view[mask], palette)
                gt_colour = classify_colour(gt[gt_mask], palette)
                iou, raw = aligned_iou(mask, gt_mask), raw_iou(mask, gt_mask)
                correct += colour == expected
                gt_correct += gt_colour == expected
                ious.append(iou)
                raw_ious.append(raw)
                record["views"].append({"colour": colour, "gt_colour": gt_colour,
                                        "iou": round(iou, 4), "iou_raw": round(raw, 4)})
            report.per_object.append(record)
            rows.append(np.concatenate([np.concatenate(list(views), 1),
                                        np.concatenate(list(truth), 1)], 0))
    report.views = len(ious)
    report.colour_accuracy = correct / max(report.views, 1)
    report.gt_colour_accuracy = gt_correct / max(report.views, 1)
    report.mean_iou = float(np.mean(ious)) if ious else 0.0
    report.mean_iou_raw = float(np.mean(raw_ious)) if raw_ious else 0.0
    grid = (np.concatenate(rows, 0) * 255).round().clip(0, 255).astype(np.uint8)
    return report, grid
