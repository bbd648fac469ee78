"""Experiment tracking for the train, SDS and serving jobs: Weights & Biases plus a local record.

One call, :func:`start_tracking`, returns a :class:`Tracker` with the same methods on every rank
and in every mode, so job code never branches on "is W&B on here?":

- rank 0, mode ``"offline"`` (the default of our configs): a real W&B run written under
  ``dir/wandb/offline-run-*``; upload it later with ``wandb sync dir/wandb/offline-run-*``;
- rank 0, mode ``"online"``: a real W&B run streamed to the server (needs ``WANDB_API_KEY``);
- rank 0, mode ``"disabled"``: no W&B run, but the local record below is still written;
- any other rank: a no-op (log from rank 0 only).

The local record is independent of W&B (our tests, ``dashboards/report.py`` and offline users
read it without parsing W&B's binary ``.wandb`` files):

- ``dir/metrics.jsonl``: one JSON object per :meth:`Tracker.log` call,
  ``{"step": int, "time": unix seconds, <metric>: value, ...}``. A resumed run appends to the
  same file, so a step may appear twice (before and after the restart): the last line wins,
  see :func:`read_metrics`;
- ``dir/media/<key>_<step>.png``: one image (or grid) per :meth:`Tracker.log_images` call,
  see :func:`image_filename`;
- ``dir/summary.json``: the merged :meth:`Tracker.summary` values.

Tracking must never kill a training run: once started, every method catches its own errors and
logs a warning (the first failure of each method at WARNING level, later ones at DEBUG so a
broken connection does not flood the log). Only configuration errors at start raise.

The environment variable ``WANDB_MODE=disabled`` is honoured as a kill switch whatever the
``mode`` argument says (tests set it so no job started from a test writes W&B files); any other
value of it is overridden by ``mode``, which comes from the job's configuration.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import storage

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")
API_KEY_ENV = "WANDB_API_KEY"
# Characters W&B refuses in a run id (wandb 0.31 Settings.validate_run_id). Checked up front so a
# bad resume id is a configuration error, not a silent fall-back to local-only tracking.
RUN_ID_RESERVED = ":;,#?/'"

# W&B settings that keep start-up fast and quiet and avoid any network access that is not the
# run itself. Checked against wandb 0.31; names this wandb does not know are dropped (see
# _wandb_settings), so an older or newer wandb still starts.
#   silent: no banner/summary printed into the job's own log;
#   console="off": do not wrap stdout/stderr (Ray already captures worker output, and the
#     wrapping interferes with tqdm progress bars);
#   x_disable_stats: no system-metrics sampler thread (it also probes cloud metadata endpoints
#     such as CoreWeave's 169.254.169.254, which is network access we do not want offline);
#   disable_job_creation: no W&B Launch job artifact.
# Git state and machine metadata stay on: they are local and are what makes a run reproducible.
DEFAULT_SETTINGS: dict[str, Any] = {
    "silent": True,
    "console": "off",
    "x_disable_stats": True,
    "disable_job_creation": True,
}


class TrackingConfigError(ValueError):
    """A tracking configuration that cannot work (bad mode, missing API key, remote dir)."""


# --------------------------------------------------------------------------------------------
# Local record helpers (usable without a Tracker, e.g. by report.py)
# --------------------------------------------------------------------------------------------


def image_filename(key: str, step: int) -> str:
    """Path of the PNG :meth:`Tracker.log_images` writes, relative to the tracking ``dir``.

    ``key`` is made filesystem-safe: anything but letters, digits, ``.``, ``-`` and ``_``
    becomes ``_`` (so W&B's panel separator ``val/samples`` -> ``media/val_samples_<step>.png``).
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._") or "images"
    return f"media/{safe}_{int(step)}.png"


def read_metrics(dir: str | os.PathLike, dedupe: bool = True) -> list[dict[str, Any]]:
    """Records of ``dir/metrics.jsonl`` in step order ([] if there is none).

    With ``dedupe``, records that share a step are merged, later lines winning: a run resumed
    from a checkpoint re-logs the steps between that checkpoint and the crash. A truncated last
    line (the job was killed mid-write) is skipped.
    """
    path = Path(storage.local_path(dir)) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if not dedupe:
        return records
    by_step: dict[int, dict[str, Any]] = {}
    for record in records:
        by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


def to_uint8_image(images: Any, ncols: int | None = None) -> np.ndarray:
    """Images -> one (H', W', C) uint8 picture (a grid when several images are given).

    images: (N, H, W, C) or (H, W, C) or (H, W), C in {1, 3, 4}, uint8 in [0, 255] or float in
        [0, 1] (clipped); a torch tensor is moved to CPU first. Channels-last only: convert
        (B*F, C, H, W) tensors in [-1, 1] with ``((x + 1) / 2).permute(0, 2, 3, 1)``.
    ncols: columns of the grid; default N for up to 8 images (a multi-view row), else
        ceil(sqrt(N)). Missing cells of the last row are black.
    """
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    x = np.asarray(images)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4) or 0 in x.shape:
        raise ValueError(
            f"images: expected shape (N, H, W, C) or (H, W, C) with C in (1, 3, 4), "
            f"got {tuple(np.shape(images))}"
        )
    if x.dtype != np.uint8:
        x = x.astype(np.float32)
        # Our tensors live in [-1, 1]; a caller who forgot to rescale gets half-black pictures,
        # so say so rather than silently clipping.
        if x.size and (np.nanmin(x) < -0.01 or np.nanmax(x) > 1.01):
            log.warning("log_images: float images outside [0, 1] were clipped "
                        "(images in [-1, 1]? pass (x + 1) / 2)")
        x = (np.nan_to_num(x).clip(0.0, 1.0) * 255.0).round().astype(np.uint8)
    n, h, w, c = x.shape
    cols = max(1, min(ncols or (n if n <= 8 else math.ceil(math.sqrt(n))), n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * cols, h, w, c), np.uint8)
    grid[:n] = x
    grid = grid.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
    # PIL and wandb.Image want grayscale as (H, W), not (H, W, 1).
    return grid[..., 0] if c == 1 else grid


def _scalar(value: Any) -> Any:
    """A JSON-ready scalar for ``value``, or ``_SKIP`` (tensors/arrays of one element -> item)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "size", 1) in (1, ()):
        try:
            return value.item()
        except (ValueError, RuntimeError, TypeError):
            return _SKIP
    if hasattr(value, "numel") and value.numel() == 1:  # torch.Tensor: size is a method
        return value.item()
    return _SKIP


_SKIP = object()


# --------------------------------------------------------------------------------------------
# Tracker
# --------------------------------------------------------------------------------------------


class Tracker:
    """Logs metrics and images to a W&B run (if any) and to the local record (if rank 0).

    Build it with :func:`start_tracking`. Every method is safe to call in any state (after
    :meth:`finish`, after a W&B failure, on a no-op tracker): errors become warnings.
    Use it as a context manager to finish the run (marked failed if the block raised).
    """

    def __init__(self, run: Any = None, dir: str | os.PathLike | None = None):
        self._run = run
        self._dir = Path(dir) if dir is not None else None
        self._finished = False
        self._failures: dict[str, int] = {}

    # ----- properties --------------------------------------------------------------------

    @property
    def run(self) -> Any:
        """The underlying ``wandb`` Run, or None: an escape hatch for tables and artifacts."""
        return self._run

    @property
    def run_id(self) -> str | None:
        """W&B run id (pass it back as ``resume_id`` to continue the run); None without a run."""
        return None if self._run is None else self._run.id

    @property
    def run_dir(self) -> str | None:
        """The W&B run folder (``.../wandb/offline-run-<time>-<id>``); None without a run."""
        if self._run is None:
            return None
        # run.dir is the run's "files" sub-folder; its parent holds run-<id>.wandb and logs/.
        return str(Path(self._run.dir).parent)

    @property
    def dir(self) -> str | None:
        """Folder of the local record (metrics.jsonl, media/, summary.json); None off rank 0."""
        return None if self._dir is None else str(self._dir)

    @property
    def active(self) -> bool:
        """True while this tracker records anything (rank 0 and not finished)."""
        return not self._finished and (self._run is not None or self._dir is not None)

    # ----- logging -----------------------------------------------------------------------

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record scalar ``metrics`` at ``step`` (W&B history + one line of ``metrics.jsonl``).

        Values may be Python numbers, numpy scalars or one-element tensors; other values go to
        W&B only. Steps should not decrease within a run (W&B drops such rows with a warning).
        """
        if not self._check_open("log"):
            return
        if self._dir is not None:
            with self._guard("log (metrics.jsonl)"):
                record: dict[str, Any] = {}
                for name, value in metrics.items():
                    v = _scalar(value)
                    if v is not _SKIP:
                        record[str(name)] = v
                # Our keys last: a metric called "step" must not corrupt the record's step.
                record.update(step=int(step), time=round(time.time(), 3))
                self._append_line("metrics.jsonl", json.dumps(record))
        if self._run is not None:
            with self._guard("log (wandb)"):
                self._run.log(dict(metrics), step=int(step))

    def log_images(
        self,
        key: str,
        images: Any,
        captions: Sequence[str] | None = None,
        step: int = 0,
        ncols: int | None = None,
    ) -> None:
        """Record images under ``key`` at ``step``.

        images: (N, H, W, 3) uint8 or float in [0, 1], or a single (H, W, 3) picture (a grid
            you made); see :func:`to_uint8_image` for the accepted shapes.
        captions: one per image (N of them; 1 for a single picture), or None.
        The local record gets one PNG, ``dir/`` + :func:`image_filename` (the N images tiled in
        ``ncols`` columns); W&B gets the N images as a gallery with their captions.
        """
        if not self._check_open("log_images"):
            return
        picture = None
        with self._guard("log_images (PNG)"):
            picture = to_uint8_image(images, ncols=ncols)
            if self._dir is not None:
                path = self._dir / image_filename(key, step)
                storage.write_bytes(path, storage.encode_png(picture))
        if self._run is None or picture is None:
            return
        with self._guard("log_images (wandb)"):
            import wandb

            arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
            single = arr.ndim <= 3
            frames = [picture] if single else [to_uint8_image(a) for a in arr]
            if captions is not None and len(captions) != len(frames):
                log.warning("log_images(%r): %d captions for %d images; captions dropped",
                            key, len(captions), len(frames))
                captions = None
            media = [wandb.Image(f, caption=None if captions is None else str(captions[i]))
                     for i, f in enumerate(frames)]
            self._run.log({key: media[0] if single else media}, step=int(step))

    def summary(self, values: dict[str, Any]) -> None:
        """Set run-level values (final metrics, best scores): W&B summary + ``summary.json``."""
        if not self._check_open("summary"):
            return
        if self._dir is not None:
            with self._guard("summary (summary.json)"):
                path = self._dir / "summary.json"
                merged = json.loads(path.read_text()) if path.exists() else {}
                for name, value in values.items():
                    v = _scalar(value)
                    merged[str(name)] = str(value) if v is _SKIP else v
                storage.write_bytes(path, json.dumps(merged, indent=2).encode())
        if self._run is not None:
            with self._guard("summary (wandb)"):
                self._run.summary.update(dict(values))

    def finish(self, exit_code: int = 0) -> None:
        """Close the W&B run (idempotent). A non-zero ``exit_code`` marks the run failed."""
        if self._finished:
            return
        self._finished = True
        if self._failures:
            log.warning("tracking: calls that failed and were skipped: %s", self._failures)
        if self._run is not None:
            with self._guard("finish"):
                self._run.finish(exit_code=exit_code)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)

    def __repr__(self) -> str:
        kind = "wandb" if self._run is not None else ("local" if self._dir is not None else "no-op")
        return f"Tracker({kind}, run_id={self.run_id!r}, dir={self.dir!r})"

    # ----- internals ---------------------------------------------------------------------

    def _check_open(self, method: str) -> bool:
        if not self._finished:
            return self._run is not None or self._dir is not None
        if self._run is not None or self._dir is not None:
            self._failed(method, RuntimeError("tracker already finished; call ignored"))
        return False

    def _append_line(self, name: str, line: str) -> None:
        # Open per call rather than keeping a handle: a crash never loses buffered lines, and
        # the cost (~10 us) is nothing next to a training step.
        assert self._dir is not None
        with open(self._dir / name, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def _failed(self, what: str, exc: BaseException) -> None:
        count = self._failures[what] = self._failures.get(what, 0) + 1
        if count == 1:
            log.warning("tracking: %s failed (%s: %s); training continues, later failures of "
                        "this call are logged at DEBUG", what, type(exc).__name__, exc)
        else:
            log.debug("tracking: %s failed again (%d): %s", what, count, exc)

    def _guard(self, what: str) -> _Guard:
        return _Guard(self, what)


class _Guard:
    """Context manager turning any Exception of a tracking call into a warning."""

    def __init__(self, tracker: Tracker, what: str):
        self.tracker, self.what = tracker, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False  # KeyboardInterrupt / SystemExit still stop the job
        self.tracker._failed(self.what, exc)
        return True


# --------------------------------------------------------------------------------------------
# Start
# --------------------------------------------------------------------------------------------


def _wandb_settings(wandb: Any, overrides: dict[str, Any] | None) -> Any:
    """``wandb.Settings`` from DEFAULT_SETTINGS + overrides, dropping names this wandb lacks."""
    wanted = {**DEFAULT_SETTINGS, **(overrides or {})}
    known = getattr(wandb.Settings, "model_fields", None)
    if known is not None:
        unknown = sorted(set(wanted) - set(known))
        if unknown:
            log.debug("tracking: this wandb has no settings %s; ignored", unknown)
        wanted = {k: v for k, v in wanted.items() if k in known}
    return wandb.Settings(**wanted)


def tracking_dir(out: str | os.PathLike, *fallback: str) -> str:
    """The LOCAL folder a run's tracking writes to: ``<out>/tracking`` when ``out`` is local,
    else ``outputs/wandb/<fallback...>/tracking`` (W&B writes files; it cannot write to an
    object store)."""
    from . import storage

    local = storage.local_path(out) if storage.is_local(out) else os.path.join("outputs", "wandb", *fallback)
    return os.path.join(local, "tracking")


def start_tracking(
    mode: str,
    project: str,
    run_name: str | None,
    group: str | None,
    config: dict[str, Any],
    dir: str | os.PathLike,
    rank: int = 0,
    tags: Iterable[str] = (),
    job_type: str | None = None,
    resume_id: str | None = None,
    settings: dict[str, Any] | None = None,
) -> Tracker:
    """Start tracking a job; returns a :class:`Tracker` (a no-op one off rank 0).

    mode: ``"offline"`` (W&B files under ``dir/wandb/offline-run-*``, ``wandb sync`` later),
        ``"online"`` (needs ``WANDB_API_KEY``) or ``"disabled"`` (local record only).
    project, run_name, group, tags, job_type: W&B run fields (name None -> W&B picks one).
    config: the job's resolved configuration (plain, JSON-able dict), stored with the run.
    dir: a LOCAL folder inside the job's output folder (W&B writes files, it cannot write to an
        object store); created if missing. Holds ``wandb/`` and the local record.
    rank: the process's global rank; only rank 0 records anything.
    resume_id: a previous ``Tracker.run_id``: continue that run (``resume="allow"``: a new run
        with this id if none exists). Offline, each restart writes another
        ``offline-run-*-<id>`` folder; ``wandb sync`` uploads them all into the one run.
    settings: extra ``wandb.Settings`` fields overriding :data:`DEFAULT_SETTINGS`
        (e.g. ``{"x_disable_stats": False}`` for GPU utilisation charts online).

    Raises TrackingConfigError (a ValueError) for a bad ``mode`` or ``resume_id``, a remote
    ``dir``, or mode ``"online"`` without ``WANDB_API_KEY`` (checked before W&B is contacted).
    A W&B start-up failure after that is logged and the tracker carries on with the local
    record only.
    """
    if mode not in MODES:
        raise TrackingConfigError(f"tracking mode: got {mode!r}, allowed values are {list(MODES)}")
    if resume_id is not None and (
        not resume_id.strip() or resume_id != resume_id.strip()
        or any(ch in RUN_ID_RESERVED for ch in resume_id)
    ):
        raise TrackingConfigError(
            f"tracking resume_id: got {resume_id!r}; a W&B run id must be non-empty, without "
            f"surrounding spaces or any of {RUN_ID_RESERVED!r}"
        )
    if not storage.is_local(dir):
        raise TrackingConfigError(
            f"tracking dir must be a local folder (W&B writes files), got {os.fspath(dir)!r}; "
            "track into a local folder and copy it into the output URI at the end"
        )
    if rank != 0:
        return Tracker()

    local = Path(storage.local_path(dir))
    local.mkdir(parents=True, exist_ok=True)
    if os.environ.get("WANDB_MODE", "").lower() == "disabled" and mode != "disabled":
        log.info("tracking: WANDB_MODE=disabled in the environment overrides mode=%r", mode)
        mode = "disabled"
    if mode == "disabled":
        return Tracker(dir=local)
    if mode == "online" and not os.environ.get(API_KEY_ENV):
        raise TrackingConfigError(
            f"tracking mode 'online' needs the environment variable {API_KEY_ENV} "
            "(your key from https://wandb.ai/authorize); or use mode 'offline' and "
            "`wandb sync` the run later"
        )

    import wandb  # deferred: ~0.4 s of import that disabled runs and other ranks never pay

    try:
        run = wandb.init(
            mode=mode,
            project=project,
            name=run_name,
            group=group,
            job_type=job_type,
            tags=list(tags) or None,
            config=dict(config),
            dir=str(local),
            id=resume_id,
            resume="allow" if resume_id else None,
            # Each Tracker owns its own run: the default ("return_previous" outside notebooks)
            # would hand a second tracker in the same process (e.g. Tune trials) the first run.
            reinit="create_new",
            settings=_wandb_settings(wandb, settings),
        )
    except Exception as exc:  # W&B must not stop the job once the configuration is valid
        log.warning("tracking: wandb.init(mode=%r) failed (%s: %s); recording locally only "
                    "in %s", mode, type(exc).__name__, exc, local)
        return Tracker(dir=local)
    log.info("tracking: W&B %s run %s in %s", mode, run.id, Path(run.dir).parent)
    return Tracker(run=run, dir=local)
