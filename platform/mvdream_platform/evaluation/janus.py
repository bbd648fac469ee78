"""The multi-face Janus problem, measured: on how many sides of the object is its front marker?

A marked prompt ("a red cube with a yellow front") asks for one front, facing MVDream azimuth
0 (the camera on world -y; :data:`mvdream_platform.data.shapes.FRONT_DIRECTION`). A 2D prior
that does not know where its camera is tends to draw the front in every view, and score
distillation then paints it on several sides: the Janus problem. We look at the object all
around and find where the marker is:

1. **per view**, the share of object pixels (opacity > 0.5) whose nearest palette colour
   (:func:`mvdream_platform.evaluation.metrics.shaded_palette`, the palette under our
   renderer's shading levels) is the marker's (:func:`colour_shares`);
2. a view **shows the marker** when that share is at least ``visible_share``;
3. the **arcs**: maximal runs of neighbouring views (circularly) that show it, each split
   again at a deep valley (:func:`split_at_valleys`): seen from the side (azimuth 90), a round
   object shows the edges of a front and of a back marker at once, so two faces are joined by
   views of small shares; a view whose share is below ``valley_ratio`` times the smaller of
   the peaks on its two sides separates them. An arc whose largest share stays below
   ``arc_min_peak`` is a smudge, not a face, and is dropped;
4. the **verdict**: ``"single"`` (one arc), ``"multiple"`` (two or more separate arcs: the
   Janus problem), ``"none"`` (never seen) or ``"everywhere"`` (seen from every view with no
   valley: the marker colour has leaked over the object, which is not a front either). A
   single arc is on the **correct side** (``front_correct``) when its centre, the
   share-weighted circular mean of its azimuths, is within ``front_tolerance_deg`` of azimuth 0.

Azimuths are MVDream's (0: camera on -y, 90: camera on +x); :func:`janus_orbit` builds the
cameras of such an orbit for our renderers (the orbit convention is ``mvdream - 90``).

Thresholds, measured on ground-truth renders of every procedural shape with a front marker
(16 views at elevation 15, distance 3, fovy 40, at 32 and 64 px): the view facing the marker
shows it on 38% (torus) to 100% (prism) of the object pixels, the views 67.5 degrees away
still on 6-50%, the views at 90 degrees on 0-9% (round shapes show the marker's edge), and
every view from 112.5 to 247.5 degrees on at most 1%. So ``visible_share`` 0.05,
``arc_min_peak`` 0.15 and ``valley_ratio`` 0.5 find one arc centred on 0 for every shape at
both sizes, and two arcs when the back carries a marker too (tests/test_text_to_3d_scoring.py).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

VISIBLE_SHARE = 0.05
ARC_MIN_PEAK = 0.15
VALLEY_RATIO = 0.5
FRONT_TOLERANCE_DEG = 45.0
VERDICTS = ("single", "multiple", "none", "everywhere")


def janus_orbit(num_views: int = 16, elevation_deg: float = 15.0,
                distance: float = 3.0) -> tuple[np.ndarray, torch.Tensor]:
    """A 360-degree orbit starting at the front: ((V,) MVDream azimuths ``360 k / V`` in
    degrees, (V, 4, 4) float32 c2w looking at the origin)."""
    from ..cameras import orbit

    return np.arange(num_views, dtype=np.float64) * 360.0 / num_views, orbit(num_views, elevation_deg, distance)


def colour_shares(rgb: np.ndarray, opacity: np.ndarray, colour: str, palette=None) -> np.ndarray:
    """(V,) share of each view's object pixels whose nearest palette colour is ``colour``.

    Args:
        rgb: (V, H, W, 3) colours in [0, 1] (a NeRF's albedo, or lit renders).
        opacity: (V, H, W) in [0, 1]; object pixels have opacity > 0.5.
        colour: a palette name (:data:`mvdream_platform.data.shapes.COLOURS`).
        palette: ``shaded_palette()`` (default).
    A view without object pixels has share 0.
    """
    from .metrics import shaded_palette

    samples, names = palette if palette is not None else shaded_palette()
    if colour not in names:
        raise ValueError(f"unknown colour {colour!r}; allowed: {', '.join(dict.fromkeys(names))}")
    if rgb.shape[:3] != opacity.shape:
        raise ValueError(f"shape mismatch: rgb {rgb.shape}, opacity {opacity.shape}")
    is_colour = np.asarray(names) == colour
    shares = np.zeros(len(rgb))
    for v, (image, alpha) in enumerate(zip(rgb, opacity)):
        pixels = np.asarray(image, dtype=np.float64)[alpha > 0.5]
        if len(pixels):
            nearest = ((pixels[:, None, :] - samples[None]) ** 2).sum(-1).argmin(1)  # (P,)
            shares[v] = is_colour[nearest].mean()
    return shares


def circular_arcs(visible: np.ndarray) -> list[list[int]]:
    """Maximal runs of True in a (V,) bool array read as a circle, as lists of indices in
    order (a run may wrap: ``[14, 15, 0, 1]``); all True is one run ``[0, ..., V - 1]``."""
    visible = np.asarray(visible, dtype=bool)
    n = len(visible)
    if not visible.any():
        return []
    if visible.all():
        return [list(range(n))]
    start = int(np.flatnonzero(~visible)[0])  # begin just after a hidden view: no run is cut
    arcs, run = [], []
    for k in range(1, n + 1):
        i = (start + k) % n
        if visible[i]:
            run.append(i)
        elif run:
            arcs.append(run)
            run = []
    if run:
        arcs.append(run)
    return arcs


def split_at_valleys(arc: list[int], shares: np.ndarray, valley_ratio: float = VALLEY_RATIO,
                     closed: bool = False) -> list[list[int]]:
    """Split a run of view indices at its deep valleys.

    A view ``k`` inside the run is a valley when ``shares[k] < valley_ratio * min(peak before
    k, peak after k)``; the deepest (relative to that smaller peak) is cut out and both sides
    are split again, until no valley is left. ``closed``: the run is the whole circle (every
    view visible); it is first cut at its smallest share if that is a valley to the largest.

    Args:
        arc: (n,) view indices in circular order.
        shares: (V,) per-view shares.
    Returns:
        The pieces, each a list of indices in order (valley views belong to none).
    """
    values = np.asarray(shares, dtype=np.float64)
    if closed:
        low = int(np.argmin(values[arc]))
        ring = arc[low:] + arc[:low]
        if values[ring[0]] >= valley_ratio * values[ring].max():
            return [list(arc)]  # no valley anywhere: one arc all around
        return split_at_valleys(ring[1:], values, valley_ratio)
    best, best_depth = None, 1.0
    for k in range(1, len(arc) - 1):
        smaller_peak = min(values[arc[:k]].max(), values[arc[k + 1:]].max())
        depth = values[arc[k]] / smaller_peak if smaller_peak > 0 else 1.0
        if depth < valley_ratio and depth < best_depth:
            best, best_depth = k, depth
    if best is None:
        return [list(arc)]
    return (split_at_valleys(arc[:best], values, valley_ratio)
            + split_at_valleys(arc[best + 1:], values, valley_ratio))


def arc_centre(azimuths_deg: np.ndarray, weights: np.ndarray) -> float:
    """Weighted circular mean of azimuths, degrees in (-180, 180]."""
    angles = np.radians(np.asarray(azimuths_deg, dtype=np.float64))
    w = np.asarray(weights, dtype=np.float64)
    centre = math.degrees(math.atan2(float((w * np.sin(angles)).sum()), float((w * np.cos(angles)).sum())))
    return 180.0 if centre <= -180.0 else centre


def angular_distance(a_deg: float, b_deg: float) -> float:
    """Smallest angle between two azimuths, degrees in [0, 180]."""
    return abs((a_deg - b_deg + 180.0) % 360.0 - 180.0)


def janus_verdict(shares: np.ndarray, azimuths_deg: np.ndarray, *, visible_share: float = VISIBLE_SHARE,
                  arc_min_peak: float = ARC_MIN_PEAK, valley_ratio: float = VALLEY_RATIO,
                  front_tolerance_deg: float = FRONT_TOLERANCE_DEG) -> dict[str, Any]:
    """The verdict from per-view marker shares around an orbit.

    Args:
        shares: (V,) marker share per view (:func:`colour_shares`).
        azimuths_deg: (V,) MVDream azimuths of the views, in circular order.

    Returns:
        JSON-able dict: ``verdict`` (one of :data:`VERDICTS`), ``front_correct`` (bool),
        ``centre`` (the single arc's centre azimuth, else None), ``arcs`` (each ``azimuths``,
        ``centre``, ``peak``), ``visible`` (V,) bool, ``shares`` (V,), ``azimuths`` (V,).
    """
    shares = np.asarray(shares, dtype=np.float64)
    azimuths = np.asarray(azimuths_deg, dtype=np.float64)
    if shares.shape != azimuths.shape or shares.ndim != 1 or len(shares) < 3:
        raise ValueError(f"shares and azimuths_deg must have the same shape (V,) with V >= 3, "
                         f"got {shares.shape} and {azimuths.shape}")
    visible = shares >= visible_share
    runs = circular_arcs(visible)
    pieces = [piece for run in runs
              for piece in split_at_valleys(run, shares, valley_ratio, closed=len(run) == len(shares))]
    arcs = []
    for run in pieces:
        peak = float(shares[run].max())
        if peak >= arc_min_peak:
            arcs.append({"azimuths": [round(float(azimuths[i]), 2) for i in run],
                         "centre": round(arc_centre(azimuths[run], shares[run]), 2),
                         "peak": round(peak, 4)})
    if not arcs:
        verdict = "none"
    elif len(arcs) == 1 and len(arcs[0]["azimuths"]) == len(shares):
        verdict = "everywhere"
    else:
        verdict = "single" if len(arcs) == 1 else "multiple"
    centre = arcs[0]["centre"] if verdict == "single" else None
    return {
        "verdict": verdict,
        "front_correct": centre is not None and angular_distance(centre, 0.0) <= front_tolerance_deg,
        "centre": centre, "arcs": arcs, "visible": visible.tolist(),
        "shares": [round(float(s), 4) for s in shares], "azimuths": [round(float(a), 2) for a in azimuths],
    }


def score_janus(rgb: np.ndarray, opacity: np.ndarray, azimuths_deg: np.ndarray, marker: str,
                body: str | None = None, **thresholds: float) -> dict[str, Any]:
    """:func:`janus_verdict` of the marker's shares in orbit renders (see :func:`colour_shares`
    for the arrays); with ``body``, also the body colour's share per view (``body_shares``)."""
    from .metrics import shaded_palette

    palette = shaded_palette()
    result = janus_verdict(colour_shares(rgb, opacity, marker, palette), azimuths_deg, **thresholds)
    result["marker"] = marker
    if body is not None:
        result["body"] = body
        result["body_shares"] = [round(float(s), 4) for s in colour_shares(rgb, opacity, body, palette)]
    return result
