"""Sweeps of jobs (Hydra multirun): one output folder per job and a summary table of them all.

    python jobs/text_to_3d.py -m sds.guidance.recon_std_rescale=0,0.3,0.5 seed=0,1
    python jobs/text_to_3d.py -m ... hydra/launcher=ray_tasks     # the jobs as parallel Ray tasks

Each job writes into its own folder, ``<sweep dir>/<job num>`` unless its command line sets
``out`` (:func:`job_out`). The :class:`SweepSummary` callback (``hydra.callbacks`` in the job's
config) records every job's end in ``job.json`` inside that job's Hydra folder (status,
overrides, error, seconds, host and pid, Ray task id) and, when the sweep ends, reads them with
each job's ``metrics.json`` into ``<sweep dir>/summary.csv`` and ``summary.md``: one row per job
(overrides, prompt, seed, final loss; silhouette IoU, colour accuracy, volume IoU and the Janus
verdict when scored; seconds, output folder), failed jobs included.

Plain Python on purpose: nothing here imports Hydra or OmegaConf; the callback only reads the
config and job-return objects that Hydra hands it.
"""

from __future__ import annotations

import atexit
import csv
import io
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import storage

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
COLUMNS = ("job", "status", "overrides", "prompt", "seed", "final_loss", "iou", "colour_accuracy",
           "volume_iou", "janus", "seconds", "out", "error", "host", "pid")
_MARKDOWN = {"job": "job", "status": "status", "overrides": "overrides", "prompt": "prompt", "seed": "seed",
             "final_loss": "final loss", "iou": "IoU", "colour_accuracy": "colour", "volume_iou": "volume IoU",
             "janus": "Janus", "seconds": "seconds", "out": "out"}


def override_key(override: str) -> str:
    """The config key a command-line override sets: ``+a.b=1`` -> ``a.b``, ``model=x`` -> ``model``."""
    return override.split("=", 1)[0].lstrip("+~")


def job_out(out: str | None, overrides: Iterable[str], job_dir: str) -> str:
    """The output folder of one job of a sweep: ``out`` when its overrides set it, else ``job_dir``.

    ``job_dir`` is the job's Hydra folder, ``<hydra.sweep.dir>/<hydra.sweep.subdir>``, so jobs
    never share a folder by default (a configured default such as ``outputs/x/${now:...}``
    would be the same for jobs that start within the same second).
    """
    if out is not None and any(override_key(o) == "out" for o in overrides):
        return str(out)
    return str(job_dir)


def job_record(*, num: int, status: str, overrides: Sequence[str], out: str | None, job_dir: str,
               seconds: float | None = None, error: BaseException | str | None = None,
               sweep_id: str | None = None) -> dict[str, Any]:
    """What ``job.json`` holds about one ended job; host, pid and Ray task id are this process's."""
    if isinstance(error, BaseException):
        error = f"{type(error).__name__}: {error}"
    return {
        "job": num, "status": status, "overrides": list(overrides), "out": out, "job_dir": job_dir,
        "seconds": None if seconds is None else round(seconds, 2), "error": error,
        "host": socket.gethostname(), "pid": os.getpid(), "ray_task_id": _ray_task_id(),
        "ended_at": time.time(), "sweep_id": sweep_id,
    }


def read_job_records(sweep_dir: str | os.PathLike, sweep_id: str | None = None) -> list[dict[str, Any]]:
    """Every ``job.json`` under ``sweep_dir`` (of sweep ``sweep_id`` only, when given), by job number."""
    records = []
    for path in Path(sweep_dir).rglob(JOB_FILE):
        try:
            record = storage.read_json(str(path))
        except (OSError, ValueError) as error:
            log.warning("skipping unreadable %s: %s", path, error)
            continue
        if sweep_id is None or record.get("sweep_id") == sweep_id:
            records.append(record)
    return sorted(records, key=lambda r: r["job"])


def summary_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table row per job record, with the metrics from its ``<out>/metrics.json`` if any
    (:meth:`mvdream_platform.sds.pipeline.TextTo3DResult.to_json`; read as JSON here, so this
    module stays free of torch).

    ``overrides`` lists only what differs between the jobs (the swept values); overrides that
    every job shares are left out (all of them when there is a single job).
    """
    shared = set.intersection(*(set(r["overrides"]) for r in records)) if len(records) > 1 else set()
    rows = []
    for record in records:
        metrics = _metrics(record.get("out"))
        final = metrics.get("final") or {}
        quality = metrics.get("quality") or {}
        rows.append({
            "job": record["job"], "status": record["status"],
            "overrides": " ".join(o for o in record["overrides"] if o not in shared),
            "prompt": metrics.get("prompt"), "seed": metrics.get("seed"),
            "final_loss": final.get("loss"), "iou": quality.get("mean_iou"),
            "colour_accuracy": quality.get("colour_accuracy"), "volume_iou": quality.get("volume_iou"),
            "janus": (quality.get("janus") or {}).get("verdict"),
            "seconds": record.get("seconds") if record.get("seconds") is not None else metrics.get("total_seconds"),
            "out": record.get("out"), "error": record.get("error"),
            "host": record.get("host"), "pid": record.get("pid"),
        })
    return rows


def write_summary(sweep_dir: str | os.PathLike, records: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """Write ``summary.csv`` and ``summary.md`` into ``sweep_dir``; returns their paths."""
    rows = summary_rows(records)
    outs = [r["out"] for r in rows if r["out"]]
    if len(set(outs)) < len(outs):
        log.warning("jobs of this sweep share an output folder (out=... without ${hydra:job.num}?)")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    csv_path, md_path = (storage.join(str(sweep_dir), name) for name in ("summary.csv", "summary.md"))
    storage.write_text(csv_path, text.getvalue())
    storage.write_text(md_path, _markdown(str(sweep_dir), records, rows))
    return csv_path, md_path


def _markdown(sweep_dir: str, records: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> str:
    failed = [r for r in rows if r["status"] != "COMPLETED"]
    shared = set.intersection(*(set(r["overrides"]) for r in records)) if len(records) > 1 else set()
    lines = [f"# Sweep {sweep_dir}", "",
             f"{len(rows)} jobs: {len(rows) - len(failed)} completed, {len(failed)} failed."]
    if shared:
        common = " ".join(o for o in records[0]["overrides"] if o in shared)
        lines += ["", f"Every job: `{common}`"]
    lines += ["", "| " + " | ".join(_MARKDOWN.values()) + " |", "|" + "---|" * len(_MARKDOWN)]
    for row in rows:
        cells = {**row, "out": _relative(row["out"], sweep_dir)}
        lines.append("| " + " | ".join(markdown_cell(cells[k]) for k in _MARKDOWN) + " |")
    if failed:
        lines += ["", "## Failed jobs", ""]
        lines += [f"- #{r['job']} (`{r['overrides']}`): {markdown_cell(r['error'])}" for r in failed]
    return "\n".join(lines) + "\n"


def _metrics(out: str | None) -> dict[str, Any]:
    if not out:
        return {}
    path = storage.join(out, "metrics.json")
    try:
        return storage.read_json(path) if storage.exists(path) else {}
    except (OSError, ValueError) as error:
        log.warning("skipping unreadable %s: %s", path, error)
        return {}


def _relative(out: str | None, sweep_dir: str) -> str | None:
    if out and storage.is_local(out) and storage.is_local(sweep_dir):
        try:
            return str(Path(storage.local_path(out)).resolve().relative_to(Path(sweep_dir).resolve()))
        except ValueError:
            pass
    return out


def markdown_cell(value: Any) -> str:
    """A value as one markdown table cell (floats to 4 significant digits, pipes escaped)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _ray_task_id() -> str | None:
    ray = sys.modules.get("ray")  # only when this process uses Ray already
    if ray is None or not ray.is_initialized():
        return None
    try:
        worker = ray._private.worker
        if worker.global_worker.mode != worker.WORKER_MODE:  # the driver: it runs no task
            return None
        return ray.get_runtime_context().get_task_id()
    except Exception:  # noqa: BLE001 - a Ray without these internals: no task id recorded
        return None


class SweepSummary:
    """Hydra callback: ``job.json`` per job of a multirun, the summary table when it ends.

    Register it in a job's config::

        hydra:
          callbacks:
            sweep_summary:
              _target_: mvdream_platform.sweeps.SweepSummary

    Single runs are left alone. ``on_job_end`` runs where the job ran (a Ray worker under
    ``hydra/launcher=ray_tasks``), so the sweep folder must be visible from the driver
    (one machine or a shared filesystem) for the summary to list every job. Hydra skips
    ``on_multirun_end`` when a job failed (its sweeper re-raises that job's error after all
    jobs ran); the summary is then written when the process exits.
    """

    def __init__(self, out_key: str = "out") -> None:
        self.out_key = out_key
        self.sweep_dir: str | None = None
        self.sweep_id: str | None = None

    # Every hook of Hydra 1.3's Callback is here (Hydra warns about missing ones); single runs
    # have nothing to summarise.
    def on_run_start(self, config, **kwargs) -> None:
        pass

    def on_run_end(self, config, **kwargs) -> None:
        pass

    def on_multirun_start(self, config, **kwargs) -> None:
        self.sweep_dir = os.path.abspath(str(config.hydra.sweep.dir))
        self.sweep_id = uuid.uuid4().hex  # travels to the jobs with this callback (pickled)
        atexit.register(self._write_at_exit)

    def on_job_start(self, config, **kwargs) -> None:
        self._job_began = time.perf_counter()

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if getattr(config.hydra.mode, "name", str(config.hydra.mode)) != "MULTIRUN":
            return
        began = self.__dict__.pop("_job_began", None)
        job_dir = str(config.hydra.runtime.output_dir)
        overrides = [str(o) for o in config.hydra.overrides.task]
        try:
            out = job_out(job_return.cfg.get(self.out_key), overrides, job_dir)
        except Exception:  # noqa: BLE001 - an unresolvable out: the job has said why already
            out = None
        status = job_return.status.name
        record = job_record(num=int(config.hydra.job.num), status=status, overrides=overrides, out=out,
                            job_dir=job_dir, seconds=None if began is None else time.perf_counter() - began,
                            error=job_return._return_value if status != "COMPLETED" else None,
                            sweep_id=self.sweep_id)
        storage.write_json(storage.join(job_dir, JOB_FILE), record)

    def on_multirun_end(self, config, **kwargs) -> None:
        atexit.unregister(self._write_at_exit)
        self._write()

    def _write(self) -> None:
        if self.sweep_dir is None:
            return
        records = read_job_records(self.sweep_dir, self.sweep_id)
        if not records:
            log.warning("no job records under %s: no summary", self.sweep_dir)
            return
        csv_path, md_path = write_summary(self.sweep_dir, records)
        failed = sum(r["status"] != "COMPLETED" for r in records)
        print(f"sweep summary ({len(records)} jobs, {failed} failed): {md_path} and {csv_path}")

    def _write_at_exit(self) -> None:
        try:
            self._write()
        except Exception as error:  # noqa: BLE001 - never turn an exit into a traceback
            print(f"could not write the sweep summary: {error}", file=sys.stderr)
