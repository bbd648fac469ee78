"""A sweep's results: one row per trial, the best trial as a text-to-3D job config.

Written into the sweep folder:

* ``results.csv`` / ``results.parquet`` / ``results.md``: every trial's id, status
  (TERMINATED = ran all steps, EARLY_STOPPED = stopped by the scheduler, ERROR, or Tune's
  PENDING/RUNNING/PAUSED for an interrupted sweep), prompt, sampled parameters, last reported
  metrics (objective, ground truth ``gt_*`` for procedural prompts), error, and asset paths
  (turntable GIF, mesh, metrics.json); the Markdown shows the GIFs;
* ``best.yaml``: the best finished trial as a primary config of ``jobs/text_to_3d.py``:
  ``python jobs/text_to_3d.py --config-dir <sweep> --config-name best [out=...]``
  (it includes conf/text_to_3d.yaml and sets every value the trial ran with);
* ``best_overrides.txt``: the same trial's swept values as command-line overrides, one per line,
  to apply on top of the sweep's own base settings (``mapfile -t o < best_overrides.txt;
  python jobs/text_to_3d.py "${o[@]}" <the sweep's base overrides>``);
* ``summary.json``: counts per status, the best trial, the files.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from dataclasses import asdict
from typing import Any

from .. import storage
from ..sds.config import TextTo3DSettings
from ..sweeps import markdown_cell
from .trial import RUN_RECORD, TRIALS

log = logging.getLogger(__name__)

FINISHED, EARLY, ERROR = "TERMINATED", "EARLY_STOPPED", "ERROR"
UNFINISHED = ("PENDING", "RUNNING", "PAUSED")
METRIC_COLUMNS = ("step", "objective_step", "prior_text_gain", "prior_eps_mse",
                  "clip_score", "loss", "gt_iou", "gt_iou_raw", "gt_colour_accuracy", "gt_volume_iou",
                  "gt_janus_free", "total_seconds", "time_total_s")
ASSETS = {"turntable_gif": "turntable.gif", "mesh_glb": "mesh.glb", "multiview_png": "multiview.png",
          "metrics_json": "metrics.json"}


def _error_line(text: str | None) -> str:
    """The exception line of a traceback (``FloatingPointError: non-finite loss ...``)."""
    if not text:
        return ""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line):
            return line[:500]
    return lines[-1][:500] if lines else ""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def collect_rows(sweep_dir: str, metric: str, steps: int) -> list[dict[str, Any]]:
    """One row per trial of the Tune experiment in ``sweep_dir``, in trial-id order."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(sweep_dir)
    rows = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        result = dict(trial.last_result or {})
        out = storage.join(sweep_dir, TRIALS, trial.trial_id)
        record_path = storage.join(out, RUN_RECORD)
        record = storage.read_json(record_path) if storage.exists(record_path) else {}
        step = result.get("step")
        status = trial.status
        if status == FINISHED and (step is None or step < steps):
            status = EARLY
        error = ""
        if status == ERROR:
            try:
                error = _error_line(str(trial.get_error() or ""))
            except Exception:  # an unreadable error file must not lose the table
                error = "error (details in the Tune trial folder)"
        row: dict[str, Any] = {"trial_id": trial.trial_id, "status": status,
                               "prompt": trial.config.get("prompt", record.get("run", {}).get("prompt"))}
        row |= {k: v for k, v in trial.config.items() if k != "prompt"}
        row["objective"] = metric
        row |= {k: result.get(k) for k in METRIC_COLUMNS}
        row[metric] = result.get(metric)
        row["error"] = error
        row["out"] = out
        for column, name in ASSETS.items():
            path = storage.join(out, name)
            row[column] = path if storage.exists(path) else None
        rows.append(row)
    return rows


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def write_table(rows: list[dict[str, Any]], sweep_dir: str, metric: str) -> dict[str, str]:
    """results.csv, results.parquet and results.md; returns name -> URI."""
    columns = _columns(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    paths = {"csv": storage.join(sweep_dir, "results.csv"), "md": storage.join(sweep_dir, "results.md"),
             "parquet": storage.join(sweep_dir, "results.parquet")}
    storage.write_text(paths["csv"], buffer.getvalue())
    storage.write_bytes(paths["parquet"], _parquet(rows, columns))
    storage.write_text(paths["md"], _markdown(rows, columns, sweep_dir, metric))
    return paths


def _parquet(rows: list[dict[str, Any]], columns: list[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {}
    for column in columns:
        values = [row.get(column) for row in rows]
        try:
            arrays[column] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: keep them readable
            arrays[column] = pa.array([None if v is None else str(v) for v in values])
    sink = io.BytesIO()
    pq.write_table(pa.table(arrays) if arrays else pa.table({}), sink)
    return sink.getvalue()


def _markdown(rows: list[dict[str, Any]], columns: list[str], sweep_dir: str, metric: str) -> str:
    shown = [c for c in columns if c not in ("out", "objective", *ASSETS)]
    lines = [f"# Sweep results ({len(rows)} trials; objective: {metric})", "",
             "| turntable | " + " | ".join(shown) + " |", "|" + "---|" * (len(shown) + 1)]
    for row in rows:
        gif = row.get("turntable_gif")
        relative = f"{TRIALS}/{row['trial_id']}/turntable.gif"
        picture = f"![{row['trial_id']}]({relative})" if gif else ""
        lines.append(f"| {picture} | " + " | ".join(markdown_cell(row.get(c)) for c in shown) + " |")
    return "\n".join(lines) + "\n"


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The finished trial (all steps run) with the best final ``metric``; None if none finished."""
    candidates = [r for r in rows if r["status"] == FINISHED and _number(r.get(metric)) is not None]
    if not candidates:
        return None
    pick = min if mode == "min" else max
    return pick(candidates, key=lambda r: r[metric])


def summarise(rows: list[dict[str, Any]], sweep_dir: str, metric: str, mode: str) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    best = best_row(rows, metric, mode)
    return {"sweep_dir": sweep_dir, "metric": metric, "mode": mode, "trials": len(rows), "counts": counts,
            "interrupted": any(r["status"] in UNFINISHED for r in rows), "best": best}


# ----------------------------------------------------------------------------- best config


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively (YAML and Hydra want lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def hydra_value(value: Any) -> str:
    """A value in Hydra's override grammar (strings single-quoted and escaped)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # Hydra's quoted strings: a backslash is literal unless it precedes a quote (or the end).
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, str(value)).replace("'", "\\'")
    return f"'{text}'"


def _dotted(run: dict[str, Any], key: str) -> Any:
    node: Any = run
    for part in key.split("."):
        node = node[part]
    return node


def job_config(run: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """The text-to-3D job values of a trial: every value explicit (the sds section as the
    trial's full SDSConfig, the model as its full ModelConfig), so composing them over
    conf/text_to_3d.yaml's defaults gives exactly the trial's run."""
    from ..pipelines.loading import ModelConfig

    sds = TextTo3DSettings.of_run(run).config().to_dict()
    steps, kind = sds.pop("steps"), sds.pop("guidance_kind")
    return _plain({"prompt": run["prompt"], "seed": run["seed"], "steps": steps, "guidance_kind": kind,
                   "guidance_scale": sds["guidance"]["guidance_scale"], "device": run.get("device", "auto"),
                   "model": asdict(ModelConfig(**model)), "sds": sds})


def trial_overrides(record: dict[str, Any]) -> list[str]:
    """The trial's prompt and swept values as Hydra overrides of jobs/text_to_3d.py."""
    run = record["run"]
    lines = [f"prompt={hydra_value(run['prompt'])}"]
    for key in record.get("params", {}):
        if key == "prompt":
            continue
        target = "sds.guidance.negative_prompt" if key == "negative_prompt" else key
        lines.append(f"{target}={hydra_value(_dotted(run, target))}")
    return lines


def write_best(best: dict[str, Any], sweep_dir: str, model: dict[str, Any], name: str,
               metric: str) -> dict[str, str]:
    """best.yaml (a primary config for jobs/text_to_3d.py) and best_overrides.txt."""
    import yaml

    record = storage.read_json(storage.join(best["out"], RUN_RECORD))
    values = job_config(record["run"], model)
    header = [
        f"# Best trial {best['trial_id']} of sweep {name!r}: {metric} = {best.get(metric)}",
        *([f"# ground truth: IoU {best['gt_iou']:.3f}, colour {best['gt_colour_accuracy']:.2f}"]
          if _number(best.get("gt_iou")) is not None else []),
        f"# swept values: {json.dumps(record.get('params', {}))}",
        "# Run it (conf/text_to_3d.yaml is included; every value the trial ran with is set):",
        f"#   python jobs/text_to_3d.py --config-dir {sweep_dir} --config-name best out=outputs/best",
        "# Longer or on other hardware: add overrides, e.g. steps=... device=...",
    ]
    body = yaml.safe_dump({"defaults": ["text_to_3d", "_self_"], **values}, sort_keys=False,
                          allow_unicode=True, width=100)
    paths = {"best_yaml": storage.join(sweep_dir, "best.yaml"),
             "best_overrides": storage.join(sweep_dir, "best_overrides.txt")}
    storage.write_text(paths["best_yaml"], "\n".join(header) + "\n" + body)
    storage.write_text(paths["best_overrides"], "\n".join(trial_overrides(record)) + "\n")
    return paths
