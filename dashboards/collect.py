"""Find and read what our jobs wrote, for the offline report (dashboards/report.py).

:func:`discover` turns a folder into the runs it holds, recognising each by its files:

* a **Tune sweep** (``jobs/tune_sds.py``): ``results.csv`` with a ``trial_id`` column (its
  ``trials/<id>/`` folders are not listed again: the sweep shows them);
* a **Hydra multirun sweep** (``jobs/text_to_3d.py -m``): ``summary.csv`` with ``job`` and
  ``overrides`` columns;
* a **text-to-3D run** (``jobs/text_to_3d.py``, a sweep trial): ``metrics.json`` with a
  ``prompt``, beside ``turntable.gif`` / ``multiview.png`` and ``tracking/``;
* a **training run** (``jobs/train.py``): ``train_summary.json``, or a tracking folder whose
  metrics have ``images_per_s``;
* **serving** (``jobs/serve.py``): ``ingress-<replica>/metrics.jsonl`` folders (in the Serve
  storage's ``tracking/`` folder, or given directly);
* an **offline W&B run** without our local record: ``wandb/offline-run-*`` (read with
  :mod:`wandb_offline`, sorted by its ``job_type``).

A folder that is none of these is searched (a few levels deep) for folders that are.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb_offline import OfflineRunError, read_offline_run

from mvdream_platform.tracking import read_metrics

MAX_DEPTH = 4
# Folders that never hold a run: model weights, checkpoints, media, caches.
SKIP_DIRS = re.compile(r"^(\..*|__pycache__|checkpoints?|checkpoint_.*|pipeline|media|files|"
                       r"logs|tmp|node_modules)$")
MINIMISED = ("prior_eps_mse", "final_loss", "loss")
TRAIN_KEYS = ("images_per_s", "samples_per_s")
SERVE_KEYS = ("latency_p50_s", "requests_per_s", "mean_batch_size")
SDS_KEYS = ("loss_sds", "t", "opacity")


class ReportInputError(ValueError):
    """A RUN_DIR that does not exist or holds nothing the report understands."""


@dataclass
class TrainingRun:
    """A training run: metrics per logged step, final summary, sample-grid PNGs by step."""

    name: str
    path: Path
    records: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    samples: list[tuple[int, Path]] = field(default_factory=list)
    source: str = "metrics.jsonl"


@dataclass
class TextTo3DRun:
    """A text-to-3D run: its metrics.json, optimisation history and picture assets."""

    name: str
    path: Path
    metrics: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    turntable: Path | None = None
    multiview: Path | None = None
    source: str = "metrics.json"


@dataclass
class Sweep:
    """A sweep's table: one row per trial/job, the swept parameters and the objective."""

    name: str
    path: Path
    kind: str  # "tune" or "multirun"
    rows: list[dict[str, Any]]
    params: list[str]
    metric: str | None
    mode: str  # "max" or "min"

    def sorted_rows(self) -> list[dict[str, Any]]:
        """Rows best first by the objective; rows without a finite value last, in file order."""
        if self.metric is None:
            return list(self.rows)
        scored = [r for r in self.rows if _finite(r.get(self.metric))]
        rest = [r for r in self.rows if not _finite(r.get(self.metric))]
        scored.sort(key=lambda r: r[self.metric], reverse=self.mode == "max")
        return scored + rest


@dataclass
class Serving:
    """Serving metrics: one list of window records per ingress replica."""

    name: str
    path: Path
    replicas: dict[str, list[dict[str, Any]]]
    source: str = "metrics.jsonl"


Item = TrainingRun | TextTo3DRun | Sweep | Serving


# ---------------------------------------------------------------------------- small readers
def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _cell(text: str) -> Any:
    """A CSV cell as int, float, bool or None when it reads as one, else the string."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = [{k: _cell(v or "") for k, v in row.items() if k is not None} for row in reader]
        return list(reader.fieldnames or []), rows


def _csv_header(path: Path) -> list[str]:
    try:
        with path.open(newline="") as f:
            return next(csv.reader(f), [])
    except OSError:
        return []


def _keys(records: list[dict[str, Any]]) -> set[str]:
    return {k for r in records for k in r}


def _media(folder: Path, key: str) -> list[tuple[int, Path]]:
    """``folder/media/<key>_<step>.png`` files by step (the tracker's image_filename)."""
    found = []
    for png in (folder / "media").glob(f"{key}_*.png"):
        match = re.fullmatch(rf"{re.escape(key)}_(\d+)\.png", png.name)
        if match:
            found.append((int(match.group(1)), png))
    return sorted(found)


def _existing(path: Any) -> Path | None:
    if not path or not isinstance(path, str):
        return None
    p = Path(path)
    return p if p.is_file() else None


# ---------------------------------------------------------------------------- one folder
def read_tune_sweep(path: Path, name: str) -> Sweep:
    """``results.csv`` (+ ``summary.json`` for the mode) of a jobs/tune_sds.py sweep.

    The swept parameters are the columns between ``prompt`` and ``objective`` (the order
    mvdream_platform.tune.results writes). Each row gets ``turntable`` (a Path or None): the
    recorded GIF, or ``trials/<id>/turntable.gif`` when the sweep folder was moved.
    """
    header, rows = _read_csv(path / "results.csv")
    params = header[header.index("prompt") + 1:header.index("objective")] \
        if "prompt" in header and "objective" in header else []
    summary = _read_json(path / "summary.json") or {}
    metric = summary.get("metric") or next(
        (r["objective"] for r in rows if isinstance(r.get("objective"), str)), None)
    mode = summary.get("mode") or ("min" if metric in MINIMISED else "max")
    for row in rows:
        moved = path / "trials" / str(row.get("trial_id")) / "turntable.gif"
        row["turntable"] = _existing(row.get("turntable_gif")) or (moved if moved.is_file()
                                                                   else None)
    return Sweep(name, path, "tune", rows, params, metric, mode)


def _overrides(text: Any) -> dict[str, Any]:
    """``"a=1 b='x y'"`` -> ``{"a": 1, "b": "x y"}`` (a Hydra multirun's swept values)."""
    if not isinstance(text, str) or not text.strip():
        return {}
    try:
        tokens = shlex.split(text)
    except ValueError:  # an unbalanced quote: split on spaces rather than lose the row
        tokens = text.split()
    out = {}
    for token in tokens:
        if "=" in token:
            key, value = token.split("=", 1)
            out[key.lstrip("+~")] = _cell(value)
    return out


def read_multirun_sweep(path: Path, name: str) -> Sweep:
    """``summary.csv`` of a Hydra multirun (mvdream_platform.sweeps): one row per job.

    The swept values come from each row's ``overrides``; the objective is ``iou`` (max) when
    the jobs were scored against ground truth, else ``final_loss`` (min).
    """
    _, rows = _read_csv(path / "summary.csv")
    params: list[str] = []
    for row in rows:
        swept = _overrides(row.get("overrides"))
        params += [k for k in swept if k not in params]
        for key, value in swept.items():
            row.setdefault(key, value)
        out = Path(str(row.get("out") or ""))
        candidates = [out / "turntable.gif", path / str(row.get("job")) / "turntable.gif"]
        row["turntable"] = next((c for c in candidates if c.is_file()), None)
    metric = "iou" if any(_finite(r.get("iou")) for r in rows) else (
        "final_loss" if any(_finite(r.get("final_loss")) for r in rows) else None)
    return Sweep(name, path, "multirun", rows, params, metric,
                 "min" if metric in MINIMISED else "max")


def read_text_to_3d(path: Path, name: str, metrics: dict[str, Any]) -> TextTo3DRun:
    turntable = path / "turntable.gif"
    multiview = path / "multiview.png"
    return TextTo3DRun(name, path, metrics, read_metrics(path / "tracking"),
                       turntable if turntable.is_file() else None,
                       multiview if multiview.is_file() else None)


def read_training(path: Path, name: str, tracking: Path) -> TrainingRun | None:
    """A training run from its tracking folder (metrics.jsonl, media/samples_*.png), falling
    back to the offline W&B runs in ``tracking/wandb`` when there is no metrics.jsonl."""
    records = read_metrics(tracking)
    summary = (_read_json(path / "train_summary.json") or {}).get("metrics") \
        or _read_json(tracking / "summary.json") or {}
    run = TrainingRun(name, path, records, summary, _media(tracking, "samples"))
    if not records:
        offline = read_offline_folder(tracking / "wandb")
        if not offline:
            return None
        run.records = _records(offline[0]["history"])
        run.summary = summary or _scalars(offline[0]["summary"])
        run.source = "W&B offline run"
    return run


def read_serving(path: Path, name: str) -> Serving | None:
    """Every ``ingress-*`` replica folder with metrics under ``path`` (or ``path`` itself)."""
    folders = [path] if path.name.startswith("ingress-") else sorted(path.glob("ingress-*"))
    replicas = {f.name: read_metrics(f) for f in folders if (f / "metrics.jsonl").is_file()}
    replicas = {k: v for k, v in replicas.items() if v}
    return Serving(name, path, replicas) if replicas else None


def _scalars(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if not k.startswith("_") and _finite(v)}


def read_offline_folder(folder: Path) -> list[dict[str, Any]]:
    """The offline W&B runs of a ``wandb/`` folder (or one ``offline-run-*`` folder), the
    folders of one run id (a resumed run writes one per restart) merged, later ones winning."""
    if not folder.is_dir():
        return []
    dirs = [folder] if any(folder.glob("*.wandb")) else sorted(folder.glob("offline-run-*"))
    merged: dict[str, dict[str, Any]] = {}
    for d in dirs:
        try:
            run = read_offline_run(d)
        except (OfflineRunError, FileNotFoundError, OSError):
            continue
        key = run["run"].get("id") or d.name
        if key not in merged:
            merged[key] = run
            continue
        into = merged[key]
        by_step = {r["_step"]: r for r in into["history"]}
        for row in run["history"]:
            by_step.setdefault(row["_step"], {}).update(row)
        into["history"] = [by_step[s] for s in sorted(by_step)]
        into["config"].update(run["config"])
        into["summary"].update(run["summary"])
    return list(merged.values())


def _records(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """W&B history rows as our metrics records: ``_step`` -> ``step``, ``_timestamp`` ->
    ``time``, W&B's other ``_`` keys dropped."""
    records = []
    for row in history:
        record = {k: v for k, v in row.items() if not k.startswith("_")}
        record["step"] = row["_step"]
        record.setdefault("time", row.get("_timestamp"))
        records.append(record)
    return records


def _from_offline(path: Path, name: str) -> list[Item]:
    """Items of offline W&B runs, sorted by their job type (history keys when it is unset)."""
    items: list[Item] = []
    for run in read_offline_folder(path):
        history = _records(run["history"])
        label = f"{name} ({run['run'].get('name') or run['run'].get('id')})"
        job_type = run["run"].get("job_type") or _job_type_from_keys(_keys(history))
        if job_type == "train":
            items.append(TrainingRun(label, path, history, _scalars(run["summary"]),
                                     source="W&B offline run"))
        elif job_type == "serve":
            items.append(Serving(label, path, {run["run"].get("name") or "replica": history},
                                 source="W&B offline run"))
        elif job_type in ("text_to_3d", "tune_trial"):
            metrics = {"prompt": run["config"].get("prompt"), **_scalars(run["summary"])}
            items.append(TextTo3DRun(label, path, metrics, history, source="W&B offline run"))
    return items


def _job_type_from_keys(keys: set[str]) -> str | None:
    if keys & set(TRAIN_KEYS):
        return "train"
    if keys & set(SERVE_KEYS):
        return "serve"
    if keys & set(SDS_KEYS):
        return "text_to_3d"
    return None


def detect(path: Path, name: str) -> list[Item] | None:
    """The items ``path`` itself is (a list, usually of one), or None when it is none of the
    recognised kinds (its subfolders may still be)."""
    if "trial_id" in _csv_header(path / "results.csv"):
        return [read_tune_sweep(path, name)]
    header = _csv_header(path / "summary.csv")
    if "job" in header and "overrides" in header:
        return [read_multirun_sweep(path, name)]
    metrics = _read_json(path / "metrics.json")
    if isinstance(metrics, dict) and "prompt" in metrics:
        return [read_text_to_3d(path, name, metrics)]
    if (path / "train_summary.json").is_file():
        run = read_training(path, name, path / "tracking")
        return [run] if run else None
    serving = read_serving(path, name)
    if serving is None and (path / "tracking").is_dir():
        serving = read_serving(path / "tracking", name)
    if serving is not None:
        return [serving]
    for tracking in (path, path / "tracking"):
        if (tracking / "metrics.jsonl").is_file():
            kind = _job_type_from_keys(_keys(read_metrics(tracking)))
            if kind == "train":
                run = read_training(path, name, tracking)
                return [run] if run else None
            if kind == "serve":
                return [Serving(name, path, {tracking.name: read_metrics(tracking)})]
            if kind == "text_to_3d":
                return [TextTo3DRun(name, path, {}, read_metrics(tracking))]
    if path.name == "wandb" or path.name.startswith("offline-run-"):
        return _from_offline(path, name) or None
    return None


def discover(path: str | Path, name: str | None = None, depth: int = 0) -> list[Item]:
    """Every item in ``path`` (itself, or its subfolders up to :data:`MAX_DEPTH` levels down).

    Raises ReportInputError (naming the path) when ``path`` does not exist or, at the top
    level, holds nothing recognisable.
    """
    path = Path(path)
    name = name or path.resolve().name or str(path)
    if not path.exists():
        raise ReportInputError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".wandb":
            found = _from_offline(path.parent, name)
            if found:
                return found
        raise ReportInputError(f"{path}: a file; give a run, sweep or serving folder")
    items = detect(path, name)
    if items is None:
        items = []
        if depth < MAX_DEPTH:
            for child in sorted(path.iterdir()):
                if child.is_dir() and not SKIP_DIRS.match(child.name):
                    items += discover(child, f"{name}/{child.name}", depth + 1)
    if depth == 0 and not items:
        raise ReportInputError(
            f"{path}: nothing recognisable (expected a training run, a text-to-3D run, a sweep "
            "folder with results.csv or summary.csv, a serving tracking folder with ingress-*/, "
            "or offline W&B runs)")
    return items
