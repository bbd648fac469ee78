"""Evaluation: a tool the jobs, benchmarks and Tune trials use, never the production path.

* :mod:`.metrics`: palette colours, foreground masks, silhouette IoU;
* :mod:`.models`: a multi-view model against ground truth on held-out procedural captions;
* :mod:`.consistency`: the multi-view consistency benchmark (colour-open, layout-open and
  marked captions), each against the model's own chance level;
* :mod:`.text_to_3d`: a text-to-3D result against the procedural ground truth (views, 3D
  geometry, the Janus verdict), as a scorer that :func:`mvdream_platform.sds.run_text_to_3d`
  takes from its caller.
"""

from ..data.shapes import HELD_OUT_START
from .metrics import (
    aligned_iou,
    classify_colour,
    foreground_mask,
    object_present,
    raw_iou,
    shaded_palette,
)
from .models import (
    EvalReport,
    EvalSettings,
    evaluate,
    held_out_objects,
    render_ground_truth,
)

__all__ = [
    "HELD_OUT_START", "EvalReport", "EvalSettings", "aligned_iou", "classify_colour", "evaluate",
    "foreground_mask", "held_out_objects", "object_present", "raw_iou", "render_ground_truth",
    "shaded_palette",
]
