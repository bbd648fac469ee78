"""The multi-view consistency benchmark: does a model draw one object in all its views?

Three kinds of held-out caption, each of which leaves the model a free choice that every view
must make the same way (grammar 2 of :mod:`mvdream_platform.data.shapes`):

* ``colour``: colour-open single parts ("a cube"). A set agrees when every view shows an
  object and all views get the same palette colour.
* ``layout``: "next to" pairs whose side is open ("a red cube next to a blue sphere"). Each
  view says on which side (left / right / behind / front, seen from MVDream azimuth 0) the
  first part stands, from the offset between the two parts' pixel centroids compared with the
  offset each side would project to through that view's known camera. A set agrees when
  every view names the same side.
* ``marker``: marked single parts ("a red cube with a yellow front"). The marker must appear
  in the views that face it and in no other: per view, the share of object pixels in the
  marker's colour, against the same share on our renderer's ground truth at the same camera
  (views facing it: truth share >= ``marker_min_share``; views that cannot see it: truth
  share < 0.01; views in between are not judged). Here the answer is not open (the front is
  at azimuth 0), so the score is a correctness rate.

Every kind is scored twice on the same captions and cameras: **joint** (the model samples the
F views together, as MVDream does) and **independent** (each view sampled on its own, F = 1
with that view's camera, different noise): the independent rate is the model's own chance
level. A model that collapses every "a cube" to red agrees in both, so only the margin
``joint - independent`` measures consistency. Rates come with 95% bootstrap intervals (sets
resampled with replacement), the margin's interval from resampling both arms.

The metric is checked on the ground truth itself (``truth_check``): the layout inferred from
true renders must match the true side, and the marker must be found in the true front view.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..cameras import mvdream_to_orbit_azimuth, orbit_camera_to_world
from ..data.shapes import HELD_OUT_START, SHAPES, SIDES, caption_for, make_object
from .metrics import foreground_mask, object_present, shaded_palette
from .models import render_ground_truth

KINDS = ("colour", "layout", "marker")
ARMS = ("joint", "independent")
# Offsets of each kind's held-out objects from HELD_OUT_START (apart from evaluate()'s).
_INDEX_OFFSETS = {"colour": 100_000, "layout": 200_000, "marker": 300_000}
# World direction from the second part to the first, per side (z up; azimuth 0 looks along +y).
_SIDE_VECTORS = {"left": (-1.0, 0.0, 0.0), "right": (1.0, 0.0, 0.0),
                 "behind": (0.0, 1.0, 0.0), "front": (0.0, -1.0, 0.0)}


@dataclass
class ConsistencySettings:
    sets: int = 200                 # 4-view sets per kind and arm
    kinds: tuple[str, ...] = KINDS
    num_views: int = 4
    elevation: float = 15.0
    steps: int = 30
    guidance_scale: float = 2.0
    resolution: int | None = None   # default: the model's
    batch_prompts: int = 16
    seed: int = 0
    shape_seed: int = 0
    gt_fovy_deg: float = 37.5       # ground truth cameras: the middle of the training ranges
    gt_fill: float = 1.075
    foreground_threshold: float = 0.12
    min_part_pixels: int = 3        # layout: fewer pixels of a part's colour = part not seen
    marker_min_share: float = 0.05  # marker visible: >= this share of object pixels
    bootstrap: int = 2000

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"consistency kinds {unknown} unknown; allowed: {', '.join(KINDS)}")
        if self.sets < 1 or self.num_views < 2:
            raise ValueError(f"consistency needs sets >= 1 and num_views >= 2, got "
                             f"sets={self.sets}, num_views={self.num_views}")


@dataclass
class KindReport:
    kind: str
    sets: int
    rates: dict[str, float]                  # arm -> share of sets that agree / are correct
    intervals: dict[str, tuple[float, float]]
    margin: float                            # joint - independent
    margin_interval: tuple[float, float]
    object_views: dict[str, float]           # arm -> share of views that show an object
    truth_check: float | None = None         # the metric on ground truth renders
    per_set: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass
class ConsistencyReport:
    settings: dict[str, Any]
    kinds: dict[str, KindReport]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """Markdown rows: kind | sets | joint | independent (chance) | margin."""
        rows = ["| kind | sets | joint | independent (chance) | joint - chance |",
                "| --- | --- | --- | --- | --- |"]
        for report in self.kinds.values():
            cells = [f"{report.rates[a]:.1%} [{report.intervals[a][0]:.1%}, {report.intervals[a][1]:.1%}]"
                     for a in ARMS]
            lo, hi = report.margin_interval
            rows.append(f"| {report.kind} | {report.sets} | {cells[0]} | {cells[1]} | "
                        f"{report.margin:+.1%} [{lo:+.1%}, {hi:+.1%}] |")
        return "\n".join(rows)


# ------------------------------------------------------------------------------ held-out sets
def consistency_objects(kind: str, count: int, shape_seed: int = 0) -> list:
    """``count`` held-out procedural objects of one kind, captioned for it (deterministic)."""
    start = HELD_OUT_START + _INDEX_OFFSETS[kind]
    objects = []
    for i in range(count):
        if kind == "colour":
            obj = make_object(start + i, shape_seed, shapes=[SHAPES[i % len(SHAPES)]], p_composite=0.0,
                              p_adjective=0.0, p_front=0.0, p_open=0.0)
            obj.attributes["open"] = ["colour:0"]
        elif kind == "layout":
            obj = make_object(start + i, shape_seed, p_composite=1.0, relations=["next to"],
                              p_adjective=0.0, p_front=0.0, p_open=0.0)
            obj.attributes["open"] = ["side"]
        else:
            obj = make_object(start + i, shape_seed, p_composite=0.0, p_adjective=0.0, p_front=1.0,
                              p_open=0.0)
        obj.caption = caption_for(obj.attributes)
        objects.append(obj)
    return objects


def view_cameras(num_views: int, elevation: float, distance: float = 1.0) -> torch.Tensor:
    """(F, 4, 4) c2w of the benchmark's views: MVDream azimuths 0, 360/F, ... (z-up world)."""
    azimuths = np.arange(num_views) * 360.0 / num_views
    return orbit_camera_to_world(elevation, mvdream_to_orbit_azimuth(azimuths), distance)


def render_truth(obj, settings: ConsistencySettings, resolution: int) -> np.ndarray:
    """(F, H, W, 3) in [0, 1]: the object at the benchmark's cameras, on mid-grey (the held-out
    evaluation's renderer: :func:`.models.render_ground_truth` reads the same settings fields)."""
    return render_ground_truth(obj, settings, resolution)


# ------------------------------------------------------------------------------ sampling
def set_noise(pipe, count: int, num_views: int, resolution: int, seed: int) -> torch.Tensor:
    """(count, F, C, h, w) initial noise, set i view k drawn from its own seed, so a set's
    views start from the same noise in both arms."""
    factor, channels = pipe.codec.downscale_factor, pipe.codec.latent_channels
    shape = (channels, resolution // factor, resolution // factor)
    return torch.stack([torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
        seed + i * num_views + k)) for k in range(num_views)]) for i in range(count)])


def sample_sets(pipe, captions: list[str], settings: ConsistencySettings, arm: str,
                seed: int, progress: bool = False) -> np.ndarray:
    """(N, F, H, W, 3) in [0, 1]: one F-view set per caption, ``arm`` = joint | independent.

    ``independent`` samples each view alone (F = 1, that view's MVDream camera). Both arms
    start every view of set i from the same noise (:func:`set_noise`; DDIM with eta 0 adds
    none), so they differ only in whether the views are denoised together: a model whose
    views ignore each other gives the same images in both arms.
    """
    from tqdm import tqdm

    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    resolution = settings.resolution or pipe.default_size
    noise = set_noise(pipe, len(captions), settings.num_views, resolution, seed)
    common = dict(elevation=settings.elevation, num_inference_steps=settings.steps,
                  guidance_scale=settings.guidance_scale, height=resolution, width=resolution,
                  output_type="np", eta=0.0)
    sets = []
    chunks = range(0, len(captions), settings.batch_prompts)
    for start in tqdm(chunks, desc=f"{arm} sets", disable=not progress):
        chunk = captions[start:start + settings.batch_prompts]
        latents = noise[start:start + len(chunk)]  # (B, F, C, h, w)
        if arm == "joint":
            sets.append(pipe(chunk, num_views=settings.num_views, latents=latents.flatten(0, 1),
                             **common).images)
            continue
        views = [pipe(chunk, num_views=1, azimuth_start=k * 360.0 / settings.num_views,
                      latents=latents[:, k], **common).images  # (B, 1, H, W, 3)
                 for k in range(settings.num_views)]
        sets.append(np.concatenate(views, axis=1))
    return np.concatenate(sets, axis=0)


# ------------------------------------------------------------------------------ per-view reading
def palette_names(pixels: np.ndarray, palette=None) -> np.ndarray:
    """(P,) palette colour name of each pixel (P, 3) in [0, 1] (nearest shaded palette sample)."""
    samples, names = palette or shaded_palette()
    if len(pixels) == 0:
        return np.zeros(0, dtype="<U8")
    nearest = ((pixels[:, None, :] - samples[None]) ** 2).sum(-1).argmin(1)
    return np.asarray(names)[nearest]


def read_view(view: np.ndarray, settings: ConsistencySettings, palette=None) -> dict[str, Any]:
    """A view's object: ``present``, ``colour`` (dominant), ``names`` (H, W) per pixel (""
    outside the object) and the object ``mask`` (H, W)."""
    mask = foreground_mask(view, settings.foreground_threshold)
    names = np.full(mask.shape, "", dtype="<U8")
    names[mask] = palette_names(view[mask], palette)
    present = bool(object_present(mask))
    colour = None
    if present:
        values, counts = np.unique(names[mask], return_counts=True)
        colour = str(values[counts.argmax()])
    return {"present": present, "colour": colour, "names": names, "mask": mask}


def compatible_sides(names: np.ndarray, first: str, second: str, c2w: torch.Tensor,
                     min_pixels: int = 3, min_offset: float = 0.3) -> set[str]:
    """The sides (of SIDES: where the first part stands relative to the second) that one view
    is compatible with.

    A view tells sides apart only across its image: when the two parts' pixel centroids are at
    least ``min_offset`` x the object's width apart horizontally, the first part is on the
    image-left or image-right of the second, and the sides whose projection through the view's
    camera points that way remain; otherwise (or when one part is hidden: fewer than
    ``min_pixels`` pixels of its colour) the pair lies along the view's axis and the two sides
    along it remain. A side's projection is its world direction dotted with the camera's
    image-right axis.

    Args:
        names: (H, W) palette name per pixel ("" = background).
        first, second: the parts' colours.
        c2w: (4, 4) the view's camera (OpenGL axes: columns right, up, back).
    """
    right = c2w[:3, 0].double().numpy()
    across = {side: float(np.asarray(_SIDE_VECTORS[side]) @ right) for side in SIDES}
    a, b = np.argwhere(names == first), np.argwhere(names == second)  # (n, 2) rows, cols
    if len(a) < min_pixels or len(b) < min_pixels:
        return {side for side, x in across.items() if abs(x) < 0.5}
    cols = np.argwhere(names != "")[:, 1]
    width = max(int(cols.max() - cols.min()) + 1, 1)
    offset = (a[:, 1].mean() - b[:, 1].mean()) / width
    if abs(offset) < min_offset:
        return {side for side, x in across.items() if abs(x) < 0.5}
    return {side for side, x in across.items() if abs(x) >= 0.5 and np.sign(x) == np.sign(offset)}


def marker_share(reading: dict[str, Any], marker: str) -> float:
    """Share of a view's inner object pixels in the marker's colour (0 without an object).

    The silhouette's one-pixel rim is left out: there the object's colour blends with the
    background's grey (red and grey read as pink, dark colours as white), which would put a
    marker's colour on every outline.
    """
    from scipy import ndimage

    mask = ndimage.binary_erosion(reading["mask"])
    return float((reading["names"][mask] == marker).mean()) if mask.any() else 0.0


# ------------------------------------------------------------------------------ per-set scores
def score_colour_set(views: np.ndarray, settings: ConsistencySettings, palette=None) -> dict[str, Any]:
    readings = [read_view(v, settings, palette) for v in views]
    colours = [r["colour"] for r in readings]
    agree = None not in colours and len(set(colours)) == 1
    return {"ok": agree, "colours": colours, "present": [r["present"] for r in readings]}


def score_layout_set(views: np.ndarray, obj, cameras: torch.Tensor, settings: ConsistencySettings,
                     palette=None) -> dict[str, Any]:
    first, second = (p["colour"] for p in obj.attributes["parts"])
    readings = [read_view(v, settings, palette) for v in views]
    views_sides = [compatible_sides(r["names"], first, second, c2w, settings.min_part_pixels)
                   for r, c2w in zip(readings, cameras)]
    # One layout explains every view: the views' compatible sides meet (in exactly one side
    # with 4 views 90 degrees apart), and every view shows an object.
    common = set(SIDES).intersection(*views_sides)
    agree = all(r["present"] for r in readings) and len(common) == 1
    return {"ok": agree, "side": next(iter(common)) if agree else None,
            "views": [sorted(v) for v in views_sides], "present": [r["present"] for r in readings],
            "true_side": obj.attributes["side"]}


def score_marker_set(views: np.ndarray, truth: np.ndarray, obj, settings: ConsistencySettings,
                     palette=None) -> dict[str, Any]:
    marker = obj.attributes["parts"][0]["front"]
    readings = [read_view(v, settings, palette) for v in views]
    shares = [marker_share(r, marker) for r in readings]
    truth_shares = [marker_share(read_view(t, settings, palette), marker) for t in truth]
    ok = all(r["present"] for r in readings)
    for share, true_share in zip(shares, truth_shares):
        if true_share >= settings.marker_min_share:
            ok &= share >= settings.marker_min_share  # a view facing the marker must show it
        elif true_share < 0.01:
            ok &= share < settings.marker_min_share  # a view that cannot see it must not
    return {"ok": bool(ok), "shares": [round(s, 3) for s in shares],
            "truth_shares": [round(s, 3) for s in truth_shares],
            "present": [r["present"] for r in readings]}


# ------------------------------------------------------------------------------ statistics
def bootstrap_interval(values: np.ndarray, resamples: int = 2000, seed: int = 0,
                       other: np.ndarray | None = None) -> tuple[float, float]:
    """95% percentile-bootstrap interval of ``mean(values)`` (or of ``mean(values) -
    mean(other)``, both resampled independently)."""
    rng = np.random.default_rng(seed)
    values = np.asarray(values, dtype=np.float64)
    means = values[rng.integers(len(values), size=(resamples, len(values)))].mean(1)
    if other is not None:
        other = np.asarray(other, dtype=np.float64)
        means = means - other[rng.integers(len(other), size=(resamples, len(other)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return round(float(lo), 4), round(float(hi), 4)


def summarise(kind: str, per_set: dict[str, list[dict[str, Any]]], resamples: int,
              truth_check: float | None = None) -> KindReport:
    """A kind's rates, intervals and margin from its per-set scores (``ok`` per set)."""
    oks = {arm: np.array([s["ok"] for s in sets], dtype=np.float64) for arm, sets in per_set.items()}
    rates = {arm: round(float(v.mean()), 4) for arm, v in oks.items()}
    intervals = {arm: bootstrap_interval(v, resamples, seed=i) for i, (arm, v) in enumerate(oks.items())}
    margin_interval = bootstrap_interval(oks["joint"], resamples, seed=7, other=oks["independent"])
    present = {arm: round(float(np.mean([p for s in sets for p in s["present"]])), 4)
               for arm, sets in per_set.items()}
    return KindReport(kind=kind, sets=len(oks["joint"]), rates=rates, intervals=intervals,
                      margin=round(rates["joint"] - rates["independent"], 4),
                      margin_interval=margin_interval, object_views=present,
                      truth_check=truth_check, per_set=per_set)


# ------------------------------------------------------------------------------ the benchmark
def score_sets(kind: str, objects: list, sets: np.ndarray, settings: ConsistencySettings,
               truths: list[np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Per-set scores of one kind (``truths``: the marker kind's ground truth per object)."""
    palette = shaded_palette()
    cameras = view_cameras(settings.num_views, settings.elevation)
    scores = []
    for i, (obj, views) in enumerate(zip(objects, sets)):
        if kind == "colour":
            record = score_colour_set(views, settings, palette)
        elif kind == "layout":
            record = score_layout_set(views, obj, cameras, settings, palette)
        else:
            record = score_marker_set(views, truths[i], obj, settings, palette)
        scores.append({"caption": obj.caption, **record})
    return scores


def truth_check(kind: str, objects: list, truths: list[np.ndarray], settings: ConsistencySettings) -> float | None:
    """The metric on ground truth: layout = share of sets that agree on the true side; marker = share of objects whose truth passes its own marker test (front view shows
    it); colour = share of views classified as the true colour."""
    palette = shaded_palette()
    if kind == "layout":
        cameras = view_cameras(settings.num_views, settings.elevation)
        scores = [score_layout_set(truth, obj, cameras, settings, palette) for obj, truth in zip(objects, truths)]
        hits = [s["side"] == s["true_side"] for s in scores]
    elif kind == "marker":
        scores = [score_marker_set(truth, truth, obj, settings, palette) for obj, truth in zip(objects, truths)]
        hits = [s["ok"] and s["truth_shares"][0] >= settings.marker_min_share for s in scores]
    else:
        hits = [c == obj.attributes["parts"][0]["colour"] for obj, truth in zip(objects, truths)
                for c in score_colour_set(truth, settings, palette)["colours"]]
    return round(float(np.mean(hits)), 4) if hits else None


def run_consistency(pipe, settings: ConsistencySettings, progress: bool = True
                    ) -> tuple[ConsistencyReport, dict[str, np.ndarray]]:
    """Sample and score every kind in both arms; returns the report and, per kind and arm, a
    (N*H, F*W, 3) uint8 grid of the first 16 sets (one set per row)."""
    resolution = settings.resolution or pipe.default_size
    kinds, grids = {}, {}
    for k, kind in enumerate(settings.kinds):
        objects = consistency_objects(kind, settings.sets, settings.shape_seed)
        captions = [o.caption for o in objects]
        truths = [render_truth(o, settings, resolution) for o in objects]
        per_set = {}
        for arm in ARMS:
            sets = sample_sets(pipe, captions, settings, arm, seed=settings.seed + 1_000_000 * (k + 1),
                               progress=progress)
            per_set[arm] = score_sets(kind, objects, sets, settings, truths)
            rows = [np.concatenate(list(views), 1) for views in sets[:16]]
            grids[f"{kind}_{arm}"] = (np.concatenate(rows, 0) * 255).round().clip(0, 255).astype(np.uint8)
        kinds[kind] = summarise(kind, per_set, settings.bootstrap,
                                truth_check(kind, objects, truths, settings))
    settings_json = asdict(settings) | {"kinds": list(settings.kinds)}
    return ConsistencyReport(settings=settings_json, kinds=kinds), grids


__all__ = [
    "ARMS", "KINDS", "ConsistencyReport", "ConsistencySettings", "KindReport",
    "bootstrap_interval", "compatible_sides", "set_noise", "consistency_objects", "marker_share", "palette_names",
    "read_view", "render_truth", "run_consistency", "sample_sets", "score_colour_set",
    "score_layout_set", "score_marker_set", "score_sets", "summarise", "truth_check",
    "view_cameras",
]
