"""A static HTML report of our runs, without W&B: the offline users' dashboard.

    python dashboards/report.py RUN_DIR [RUN_DIR ...] --out report.html [--title TITLE]

Each RUN_DIR may be a training run (``outputs/runs/<name>``), a text-to-3D run, a sweep folder
(Tune's ``results.csv`` or a Hydra multirun's ``summary.csv``), a Serve tracking folder
(``ingress-*/``), an offline W&B run, or a folder holding several of these (see
``dashboards/collect.py`` for how each is recognised). The report has:

* an overview table of everything found;
* training: loss, learning rate, gradient norm, throughput, memory and step-time breakdown
  plots (runs overlaid), and the latest sample grids;
* text-to-3D: the scores table, loss curves, turntable GIFs and multi-view pictures;
* sweeps: the table sorted by the objective (best first), a parallel-coordinates plot of the
  swept parameters against it, and the trials' turntables in that order;
* serving: latency percentiles, batch sizes, queue depth, throughput and errors per replica.

The file is self-contained (images are base64 ``data:`` URIs, no scripts, no external links)
so that it can be mailed or archived. It is written to a temporary file and renamed, so a
failure never leaves a partial report; a RUN_DIR that does not exist or holds nothing
recognisable is an error naming it (exit status 2).
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import plots
from collect import (
    Item,
    ReportInputError,
    Serving,
    Sweep,
    TextTo3DRun,
    TrainingRun,
    discover,
)

MAX_SAMPLE_GRIDS = 3  # latest sample grids shown per training run
MAX_SWEEP_GIFS = 48  # turntables shown per sweep (the best ones): keeps the file mailable
# The step-time breakdown our training loop logs; runs from before that instrumentation logged
# forward+backward+optimizer as one compute_time_s, which the stack then shows instead.
STEP_PARTS = ("data_time_s", "forward_time_s", "backward_time_s", "optimizer_time_s",
              "allreduce_time_s", "compute_time_s")
MIME = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; color: #222;
       padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em;
     margin-top: 2em; } h3 { margin-top: 1.5em; }
.meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: right; }
th { background: #f4f4f4; } td.text { text-align: left; }
tr.best td { background: #eaf7ea; font-weight: 600; }
.figures, .gallery { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
figure { margin: 0; }
figcaption { font-size: 0.8em; color: #444; max-width: 40em; overflow-wrap: anywhere; }
.gallery figure { width: 200px; } .gallery img { width: 192px; image-rendering: pixelated; }
img.wide { max-width: 100%; } .scroll { overflow-x: auto; }
"""


# ---------------------------------------------------------------------------- html helpers
def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A table cell: 4 significant digits for floats, blanks for missing values."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def img(data: bytes, mime: str, alt: str, cls: str = "") -> str:
    klass = f' class="{cls}"' if cls else ""
    return f'<img src="{data_uri(data, mime)}" alt="{esc(alt)}"{klass}>'


def img_file(path: Path, alt: str, cls: str = "") -> str:
    return img(path.read_bytes(), MIME.get(path.suffix.lower(), "application/octet-stream"),
               alt, cls)


def figure(content: str, caption: str) -> str:
    return f"<figure>{content}<figcaption>{esc(caption)}</figcaption></figure>"


def plot_figures(entries: Iterable[tuple[bytes | None, str]]) -> str:
    """A row of plot figures; plots that had nothing to draw (None) are left out."""
    shown = [figure(img(png, "image/png", caption), caption) for png, caption in entries if png]
    return f'<div class="figures">{"".join(shown)}</div>' if shown else ""


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], text_columns: int = 1,
          highlight: int | None = None) -> str:
    """An HTML table; the first ``text_columns`` columns are left-aligned text."""
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for n, row in enumerate(rows):
        cells = "".join(f'<td class="text">{esc(fmt(v))}</td>' if i < text_columns
                        else f"<td>{esc(fmt(v))}</td>" for i, v in enumerate(row))
        body.append(f'<tr{" class=best" if n == highlight else ""}>{cells}</tr>')
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(body)}</table></div>'


# ---------------------------------------------------------------------------- numbers
def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def last(records: Sequence[dict[str, Any]], key: str) -> Any:
    """The last finite value of ``key`` (None if never logged)."""
    return next((r[key] for r in reversed(records) if _finite(r.get(key))), None)


def peak(records: Sequence[dict[str, Any]], key: str) -> Any:
    values = [r[key] for r in records if _finite(r.get(key))]
    return max(values) if values else None


def mean(records: Sequence[dict[str, Any]], key: str) -> Any:
    values = [r[key] for r in records if _finite(r.get(key))]
    return sum(values) / len(values) if values else None


def kind_name(item: Item) -> str:
    if isinstance(item, Sweep):
        return "Tune sweep" if item.kind == "tune" else "Hydra multirun"
    return {TrainingRun: "training run", TextTo3DRun: "text-to-3D run",
            Serving: "serving"}[type(item)]


# ---------------------------------------------------------------------------- sections
def overview(items: Sequence[Item]) -> str:
    rows = []
    for item in items:
        if isinstance(item, TrainingRun):
            what = f"{len(item.records)} logged steps, last step {fmt(last(item.records, 'step'))}"
        elif isinstance(item, TextTo3DRun):
            what = f"prompt {item.metrics.get('prompt')!r}" if item.metrics.get("prompt") \
                else f"{len(item.records)} logged steps"
        elif isinstance(item, Sweep):
            what = f"{len(item.rows)} trials, objective {item.metric} ({item.mode})"
        else:
            what = f"{len(item.replicas)} replicas, " \
                   f"{sum(len(r) for r in item.replicas.values())} windows"
        rows.append((item.name, kind_name(item), what, str(item.path)))
    return "<h2 id=overview>Overview</h2>" + table(("name", "kind", "content", "path"), rows,
                                                  text_columns=4)


def training_section(runs: Sequence[TrainingRun]) -> str:
    by_name = {r.name: r.records for r in runs}
    rows = [(r.name, r.source, last(r.records, "step"), last(r.records, "loss"),
             mean(r.records[-10:], "images_per_s"), mean(r.records[-10:], "samples_per_s"),
             peak(r.records, "max_rss_mb"), mean(r.records[-10:], "step_time_s")) for r in runs]
    parts = ["<h2 id=training>Training</h2>",
             table(("run", "source", "last step", "last loss", "images/s (last 10)",
                    "samples/s (last 10)", "peak RSS MB", "step s (last 10)"), rows,
                   text_columns=2),
             plot_figures([
                 (plots.lines(by_name, ["loss", "preservation_loss"], "Loss", log_y=True),
                  "Training loss (and DreamBooth's preservation loss)"),
                 (plots.lines(by_name, ["lr"], "Learning rate"), "Learning rate"),
                 (plots.lines(by_name, ["grad_norm"], "Gradient norm"), "Gradient norm"),
                 (plots.lines(by_name, ["images_per_s", "samples_per_s"], "Throughput",
                              ylabel="per second"), "Throughput (images and samples per s)"),
                 (plots.lines(by_name, ["max_rss_mb"], "Peak host memory", ylabel="MB"),
                  "Peak resident memory of the rank-0 process"),
                 (plots.lines(by_name, ["cuda_max_allocated_mb"], "Peak GPU memory",
                              ylabel="MB"), "Peak GPU memory allocated by rank 0"),
             ])]
    for run in runs:
        breakdown = plots.stacked(run.records, STEP_PARTS, "step_time_s",
                                  f"Step time breakdown: {run.name}")
        grids = [figure(img_file(png, f"samples at step {step}", "wide"),
                        f"{run.name}: samples at step {step}")
                 for step, png in run.samples[-MAX_SAMPLE_GRIDS:]]
        if breakdown or grids:
            parts.append(f"<h3>{esc(run.name)}</h3>")
            parts.append(plot_figures([(breakdown, "Step time: data, forward, backward, "
                                                   "optimizer, all-reduce (s)")]))
            if grids:
                parts.append(f'<div class="figures">{"".join(grids)}</div>')
    return "".join(parts)


def text_to_3d_section(runs: Sequence[TextTo3DRun]) -> str:
    rows = []
    for r in runs:
        quality = r.metrics.get("quality") or {}
        final = r.metrics.get("final") or {}
        rows.append((r.name, r.metrics.get("prompt", ""), r.metrics.get("steps"),
                     final.get("loss", r.metrics.get("final_loss")),
                     quality.get("mean_iou", r.metrics.get("iou")),
                     quality.get("colour_accuracy", r.metrics.get("colour_accuracy")),
                     r.metrics.get("total_seconds")))
    gallery = []
    for r in runs:
        if r.turntable:
            gallery.append(figure(img_file(r.turntable, f"turntable of {r.name}"),
                                  f"{r.name}: {r.metrics.get('prompt', '')}"))
    multiview = [figure(img_file(r.multiview, f"multi-view of {r.name}", "wide"),
                        f"{r.name}: 4 views") for r in runs if r.multiview]
    return "".join([
        "<h2 id=text-to-3d>Text-to-3D runs</h2>",
        table(("run", "prompt", "steps", "final loss", "IoU", "colour accuracy", "seconds"),
              rows, text_columns=2),
        plot_figures([(plots.lines({r.name: r.records for r in runs}, ["loss"], "SDS loss",
                                   log_y=True), "SDS loss per step")]),
        "<h3>Turntables</h3>" if gallery else "",
        f'<div class="gallery">{"".join(gallery)}</div>' if gallery else "",
        f'<div class="figures">{"".join(multiview)}</div>' if multiview else "",
    ])


def sweep_section(sweep: Sweep) -> str:
    ordered = sweep.sorted_rows()
    id_key = "trial_id" if sweep.kind == "tune" else "job"
    columns = [id_key, "status", "prompt", *sweep.params]
    if sweep.metric:
        columns.append(sweep.metric)
    for extra in ("gt_iou", "gt_colour_accuracy", "iou", "colour_accuracy", "final_loss",
                  "total_seconds", "seconds", "error"):
        if extra not in columns and any(r.get(extra) not in (None, "") for r in ordered):
            columns.append(extra)
    best = 0 if sweep.metric and ordered and _finite(ordered[0].get(sweep.metric)) else None
    counts: dict[str, int] = {}
    for row in sweep.rows:
        counts[str(row.get("status"))] = counts.get(str(row.get("status")), 0) + 1
    gallery = []
    for rank, row in enumerate(ordered, 1):
        if row.get("turntable") is not None and len(gallery) < MAX_SWEEP_GIFS:
            score = f", {sweep.metric} {fmt(row.get(sweep.metric))}" if sweep.metric else ""
            gallery.append(figure(img_file(row["turntable"], f"turntable of {row.get(id_key)}"),
                                  f"#{rank} {row.get(id_key)}: {row.get('prompt') or ''}{score}"))
    pc = plots.parallel_coordinates(ordered, sweep.params, sweep.metric, sweep.mode) \
        if sweep.metric else None
    status = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    return "".join([
        f"<h3>{esc(sweep.name)} <span class=meta>({esc(kind_name(sweep))}; {len(sweep.rows)} "
        f"trials; {esc(status)}; objective {esc(sweep.metric)}, "
        f"{'higher' if sweep.mode == 'max' else 'lower'} is better)</span></h3>",
        table(["rank", *columns], ([i, *(row.get(c) for c in columns)]
                                   for i, row in enumerate(ordered, 1)),
              text_columns=0, highlight=best),
        plot_figures([(pc, "Each line is a trial: its swept values and its objective")]),
        "<h4>Turntables, best first</h4>" if gallery else "",
        f'<div class="gallery">{"".join(gallery)}</div>' if gallery else "",
    ])


def _on_time_axis(replicas: dict[str, list[dict[str, Any]]]
                  ) -> tuple[dict[str, list[dict[str, Any]]], str, str]:
    """Records with ``elapsed_s`` (seconds since the first window of any replica), so that
    replicas started at different times share one time axis; returns (records, x key, x label).

    Falls back to the window index when some replica's windows are not strictly increasing in
    time (the recorded time has millisecond resolution, and a clock may step back)."""
    def increasing(records: list[dict[str, Any]]) -> bool:
        times = [r.get("time") for r in records]
        return all(_finite(t) for t in times) and all(a < b for a, b in zip(times, times[1:]))

    if not all(increasing(records) for records in replicas.values()):
        return replicas, "step", "window"
    start = min(r["time"] for records in replicas.values() for r in records)
    timed = {name: [{**r, "elapsed_s": r["time"] - start} for r in records]
             for name, records in replicas.items()}
    return timed, "elapsed_s", "seconds since the first window"


def serving_section(serving: Sequence[Serving]) -> str:
    parts = ["<h2 id=serving>Serving</h2>"]
    for item in serving:
        replicas, x, xlabel = _on_time_axis(item.replicas)
        rows = [(name, len(recs), sum(r.get("requests") or 0 for r in recs),
                 mean(recs, "latency_p50_s"), peak(recs, "latency_p95_s"),
                 mean(recs, "mean_batch_size"), peak(recs, "max_batch_size"),
                 peak(recs, "active_jobs"), sum(r.get("errors") or 0 for r in recs))
                for name, recs in item.replicas.items()]
        parts += [
            f"<h3>{esc(item.name)} <span class=meta>({esc(item.source)})</span></h3>",
            table(("replica", "windows", "requests", "mean p50 latency s", "max p95 latency s",
                   "mean batch", "max batch", "max queued jobs", "errors"), rows),
            plot_figures([
                (plots.lines(replicas, ["latency_p50_s", "latency_p95_s", "latency_max_s"],
                             "Request latency", "seconds", x=x, xlabel=xlabel),
                 "Latency percentiles per window"),
                (plots.lines(replicas, ["mean_batch_size", "max_batch_size"], "Batch size",
                             "views per batch", x=x, xlabel=xlabel), "Batch size per window"),
                (plots.lines(replicas, ["active_jobs", "jobs_submitted"], "Queue", "jobs",
                             x=x, xlabel=xlabel), "Jobs queued or running; jobs submitted"),
                (plots.lines(replicas, ["requests_per_s", "views_per_s"], "Throughput",
                             "per second", x=x, xlabel=xlabel), "Requests and views per second"),
                (plots.lines(replicas, ["errors"], "Errors", "responses", x=x, xlabel=xlabel),
                 "4xx/5xx responses per window"),
            ]),
        ]
    return "".join(parts)


def build_html(items: Sequence[Item], title: str) -> str:
    """The whole report page for ``items`` (from :func:`collect.discover`)."""
    training = [i for i in items if isinstance(i, TrainingRun)]
    runs = [i for i in items if isinstance(i, TextTo3DRun)]
    sweeps = [i for i in items if isinstance(i, Sweep)]
    serving = [i for i in items if isinstance(i, Serving)]
    sections = [overview(items)]
    if training:
        sections.append(training_section(training))
    if runs:
        sections.append(text_to_3d_section(runs))
    if sweeps:
        sections.append("<h2 id=sweeps>Sweeps</h2>" + "".join(sweep_section(s) for s in sweeps))
    if serving:
        sections.append(serving_section(serving))
    made = time.strftime("%Y-%m-%d %H:%M:%S")
    # An empty data: favicon stops the browser asking for /favicon.ico (a console error).
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width, initial-scale=1">'
            f'<link rel=icon href="data:,"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>"
            f"<p class=meta>Made by dashboards/report.py on {esc(made)} from "
            f"{len(items)} item(s).</p>{''.join(sections)}</body></html>\n")


def collect(run_dirs: Sequence[str | Path]) -> list[Item]:
    """Every item of every RUN_DIR, in argument order (raises ReportInputError naming a bad
    one)."""
    items: list[Item] = []
    for run_dir in run_dirs:
        items += discover(run_dir)
    return items


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make a shared report unreadable to others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dashboards/report.py",
        description="A self-contained HTML report of training runs, text-to-3D runs, sweeps "
                    "and serving metrics, without W&B.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="a run, sweep or serving folder, or a folder holding several")
    parser.add_argument("--out", required=True, help="the HTML file to write")
    parser.add_argument("--title", default="MVDream platform report")
    args = parser.parse_args(argv)
    try:
        items = collect(args.run_dirs)
        page = build_html(items, args.title)
        write_atomic(Path(args.out), page)
    except ReportInputError as exc:
        print(f"dashboards/report.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({len(page) / 1e6:.1f} MB, {len(items)} item(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
