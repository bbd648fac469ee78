"""Static matplotlib figures of the offline report, each returned as PNG bytes.

Every function takes plain data (lists of metric records as read by
``mvdream_platform.tracking.read_metrics``, or sweep rows) and returns the PNG of one figure,
or None when the data has nothing to draw (a metric no run logged), so the report simply
leaves that figure out.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot's import
import matplotlib.pyplot as plt  # noqa: E402

DPI = 96
WIDTH = 7.0  # inches: ~670 px, two figures side by side on a laptop screen


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def series(records: Sequence[dict[str, Any]], key: str, x: str = "step"
           ) -> tuple[list[float], list[float]]:
    """The (x, y) points of ``key`` over ``x``, skipping records where either is not finite."""
    points = [(r[x], r[key]) for r in records if _finite(r.get(x)) and _finite(r.get(key))]
    return [p[0] for p in points], [p[1] for p in points]


def lines(runs: dict[str, Sequence[dict[str, Any]]], keys: Sequence[str], title: str,
          ylabel: str = "", log_y: bool = False, x: str = "step", xlabel: str = "step"
          ) -> bytes | None:
    """One line per (run, key): runs overlaid so that they compare at a glance.

    runs: label -> records. A run's label is left out of the legend when there is one run, a
    key's when there is one key.
    """
    # Keys no run logged (e.g. DreamBooth's preservation_loss) do not count for the legend.
    keys = [k for k in keys if any(series(records, k, x)[0] for records in runs.values())]
    fig, ax = plt.subplots(figsize=(WIDTH, 3.4))
    drawn = 0
    for label, records in runs.items():
        for key in keys:
            xs, ys = series(records, key, x)
            if not xs:
                continue
            if log_y and min(ys) <= 0:
                log_y = False  # a log axis cannot show zero or negative values
            parts = ([label] if len(runs) > 1 else []) + ([key] if len(keys) > 1 else [])
            ax.plot(xs, ys, label=" / ".join(parts) or key, linewidth=1.4,
                    marker="o" if len(xs) < 12 else None, markersize=3)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    if log_y:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if drawn > 1:
        ax.legend(fontsize=8, loc="best")
    return _png(fig)


def stacked(records: Sequence[dict[str, Any]], parts: Sequence[str], total: str | None,
            title: str, ylabel: str = "seconds") -> bytes | None:
    """A stacked area of ``parts`` per step (e.g. data/forward/backward/optimizer time), with
    the measured ``total`` on top as a line (the gap is time the parts do not cover)."""
    rows = [r for r in records if _finite(r.get("step")) and any(_finite(r.get(p)) for p in parts)]
    present = [p for p in parts if any(_finite(r.get(p)) for r in rows)]
    if not rows or not present:
        return None
    xs = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(WIDTH, 3.4))
    ax.stackplot(xs, [[r.get(p) if _finite(r.get(p)) else 0.0 for r in rows] for p in present],
                 labels=[p.removesuffix("_time_s") for p in present], alpha=0.85)
    if total:
        tx, ty = series(records, total)
        if tx:
            ax.plot(tx, ty, color="black", linewidth=1.2, label=total)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    return _png(fig)


def parallel_coordinates(rows: Sequence[dict[str, Any]], params: Sequence[str], metric: str,
                         mode: str = "max") -> bytes | None:
    """A static parallel-coordinates plot: one axis per swept parameter and one for ``metric``,
    one line per trial coloured by ``metric`` (the best trial drawn thickest, on top).

    Numeric axes are scaled to their range; text values (e.g. negative-prompt set names) are
    spread evenly and labelled. Rows without a finite metric are left out.
    """
    rows = [r for r in rows if _finite(r.get(metric))]
    axes = [p for p in params if any(r.get(p) is not None for r in rows)] + [metric]
    if len(rows) < 1 or len(axes) < 2:
        return None
    positions: dict[str, list[float]] = {}
    labels: dict[str, list[tuple[float, str]]] = {}
    for key in axes:
        values = [r.get(key) for r in rows]
        numeric = [v for v in values if _finite(v)]
        if len(numeric) == len([v for v in values if v is not None]) and numeric:
            lo, hi = min(numeric), max(numeric)
            span = (hi - lo) or 1.0
            positions[key] = [(v - lo) / span if _finite(v) else math.nan for v in values]
            labels[key] = [(0.0, f"{lo:.4g}"), (1.0, f"{hi:.4g}")] if hi != lo \
                else [(0.0, f"{lo:.4g}")]
        else:  # categories: evenly spaced in first-seen order
            categories = list(dict.fromkeys(str(v) for v in values if v is not None))
            step = 1.0 / max(len(categories) - 1, 1)
            index = {c: i * step for i, c in enumerate(categories)}
            positions[key] = [index[str(v)] if v is not None else math.nan for v in values]
            labels[key] = [(index[c], c[:18]) for c in categories]
    scores = [r[metric] for r in rows]
    lo, hi = min(scores), max(scores)
    cmap = plt.get_cmap("viridis")
    best = scores.index(max(scores) if mode == "max" else min(scores))
    fig, ax = plt.subplots(figsize=(max(WIDTH, 1.3 * len(axes)), 3.8))
    order = sorted(range(len(rows)), key=lambda i: i == best)  # the best one drawn last
    for i in order:
        colour = cmap((scores[i] - lo) / ((hi - lo) or 1.0) if mode == "max"
                      else 1 - (scores[i] - lo) / ((hi - lo) or 1.0))
        ax.plot(range(len(axes)), [positions[k][i] for k in axes], color=colour,
                linewidth=2.6 if i == best else 1.2, alpha=0.95 if i == best else 0.7)
    for j, key in enumerate(axes):
        ax.axvline(j, color="0.3", linewidth=0.8)
        for y, text in labels[key]:
            ax.text(j + 0.03, y, text, fontsize=7, va="center", color="0.15")
    ax.set_xticks(range(len(axes)), [k.rsplit(".", 1)[-1] for k in axes], rotation=20,
                  ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.08, 1.08)
    ax.set_title(f"Hyper-parameters -> {metric} ({'higher' if mode == 'max' else 'lower'} is "
                 "better; brighter = better, thick = best)")
    return _png(fig)
