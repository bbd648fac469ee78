"""Run one stored text-to-3D job: lease, heartbeat, resumable optimisation, cancel, result.

Plain Python (no Serve): the worker deployment calls :func:`run_job` in a thread, tests may
call it directly. A job is resumable because :func:`mvdream_platform.sds.pipeline.run_text_to_3d`
resumes from the field checkpoints in the job's ``out/`` folder. Serve scores nothing: user
prompts have no ground truth, so no scorer is passed (evaluation is for jobs, benchmarks and
Tune).
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import storage
from ..sds.checkpoint import read_latest
from ..sds.config import SDSConfig, TextTo3DSettings
from ..sds.optimize import CHECKPOINTS
from ..sds.pipeline import run_text_to_3d
from .settings import ServeSettings
from .store import JobStore

log = logging.getLogger(__name__)


def public_error(error: BaseException, root: str, with_type: bool = True) -> str:
    """What a client is told about ``error``: its first line, without server paths (the full
    traceback is in the server log). A Ray error's text starts with the remote traceback;
    its cause's message is used instead."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):  # ray.exceptions.RayTaskError and friends
        error = cause
    lines = str(error).strip().splitlines()
    text = storage.redact_paths(lines[0] if lines else "", root)
    return f"{type(error).__name__}: {text}" if with_type else text


class JobCancelled(Exception):
    """A client cancelled the job while it ran."""


def job_sds_config(settings: ServeSettings, options: dict[str, Any]) -> SDSConfig:
    """The server's SDS config with the request's options (steps, guidance, scale, ...) applied."""
    sds = copy.deepcopy(settings.sds)
    guidance = sds.setdefault("guidance", {})
    if options.get("negative_prompt") is not None:
        guidance["negative_prompt"] = options["negative_prompt"]
    if options.get("cfg_rescale") is not None:
        guidance["recon_std_rescale"] = options["cfg_rescale"]
    return TextTo3DSettings(sds=sds, steps=options.get("steps") or settings.default_sds_steps,
                            guidance_kind=options.get("guidance", "mvdream"),
                            guidance_scale=options.get("guidance_scale")).config()


def lease_is_live(lease: dict[str, Any] | None, timeout_s: float,
                  owner_alive: Callable[[str], bool] | None = None) -> bool:
    """True while another worker holds the job. A lease that says the job is done is not held.

    When the owner's liveness can be told (``owner_alive``), it decides: a dead owner frees the
    job at once, a live one keeps it even through a late heartbeat (a slow export is not a
    death, and taking the job over would run it twice). Otherwise a heartbeat older than
    ``timeout_s`` frees it.
    """
    if not lease or lease.get("phase") == "done":
        return False
    owner = lease.get("owner")
    if owner and owner_alive is not None:
        return owner_alive(owner)
    return time.time() - float(lease.get("heartbeat", 0)) <= timeout_s


class Heartbeat:
    """Writes the job's lease (owner, progress, ETA) every ``every_s`` seconds from a thread, so
    the lease stays fresh through exports and slow steps alike."""

    def __init__(self, store: JobStore, job_id: str, owner: str, attempt: int, every_s: float):
        self.store, self.job_id, self.every_s = store, job_id, every_s
        self.lease: dict[str, Any] = {"owner": owner, "pid": os.getpid(), "attempt": attempt,
                                      "phase": "starting", "step": 0, "steps": None,
                                      "loss": None, "eta_s": None}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"lease-{job_id}")

    def __enter__(self) -> Heartbeat:
        self.write()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def update(self, **fields: Any) -> None:
        with self._lock:
            self.lease.update(fields)

    def write(self) -> None:
        with self._lock:
            lease = dict(self.lease)
        self.store.write_lease(self.job_id, lease)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.write()
            except Exception:  # a storage hiccup must not kill the job; the next beat retries
                log.exception("heartbeat of %s failed", self.job_id)


def next_attempt(lease: dict[str, Any] | None) -> tuple[int, bool]:
    """(the number of the run a worker starts now, whether the previous holder died mid-run),
    from the job's last lease: 1 for a job never started; one more than the last run
    otherwise."""
    if not lease:
        return 1, False
    return int(lease.get("attempt", 0)) + 1, lease.get("phase") != "done"


def run_job(store: JobStore, job_id: str, pipe, settings: ServeSettings, *, owner: str,
            device="cpu", owner_alive: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Run (or resume, or just confirm) job ``job_id``; returns ``{"status", "attempt", ...}``.

    Status is ``succeeded`` (result.json written), ``cancelled`` or ``failed`` (with ``error``);
    a dying process raises nothing, of course: the queue sees the actor die and sends the job
    again. ``attempt`` is the run this call started (or the last run, when it started none):
    a worker that finds the job held by a live worker waits for it instead of starting one, so
    a re-sent call never counts as an attempt, and a job whose workers died
    ``worker.max_attempts`` times fails instead of starting again.
    """
    worker = settings.worker
    while True:  # another live worker holds the job (a restarted queue re-sent it): wait for it
        lease = store.lease(job_id)  # one read per poll: the holder rewrites it meanwhile
        if store.result(job_id) is not None:
            return {"status": "succeeded", "attempt": int((lease or {}).get("attempt", 1))}
        if not lease_is_live(lease, worker.lease_timeout_s, owner_alive) or lease.get("owner") == owner:
            break
        time.sleep(min(1.0, worker.heartbeat_s))
    attempt, died = next_attempt(lease)
    if store.cancel_requested(job_id):
        return {"status": "cancelled", "attempt": attempt - 1}
    if died and attempt > worker.max_attempts:
        return {"status": "failed", "attempt": attempt - 1,
                "error": f"the worker running this job died {attempt - 1} times (worker.max_attempts)"}
    request = store.request(job_id)
    try:
        cfg = job_sds_config(settings, request["options"])
    except (ValueError, TypeError) as error:
        return {"status": "failed", "attempt": attempt - 1,
                "error": "bad job options: " + public_error(error, store.root, with_type=False)}

    started = time.time()
    with Heartbeat(store, job_id, owner, attempt, worker.heartbeat_s) as beat:
        if store.cancel_requested(job_id):  # cancelled while the lease was being taken
            beat.update(phase="done")
            beat.write()
            return {"status": "cancelled", "attempt": attempt}
        beat.update(phase="optimising", steps=cfg.steps)

        def on_log(metrics: dict[str, float], _checkpoint) -> None:
            step = int(metrics["step"])
            done_now = step - first_step[0]
            rate = (time.time() - started) / max(done_now, 1)
            beat.update(step=step, loss=round(float(metrics["loss"]), 6),
                        eta_s=round(rate * (cfg.steps - step), 1))
            if store.cancel_requested(job_id):
                raise JobCancelled(job_id)

        latest = read_latest(storage.join(store.out(job_id), CHECKPOINTS))
        first_step = [int(latest["step"]) if latest else 0]  # ETA counts this attempt's steps only
        try:
            result = run_text_to_3d(request["prompt"], pipe, cfg, store.out(job_id),
                                    seed=int(request["options"].get("seed", 0)), device=device,
                                    progress=False, on_log=on_log)
        except JobCancelled:
            beat.update(phase="done")
            beat.write()
            return {"status": "cancelled", "attempt": attempt}
        except Exception as error:  # the job's own failure (not the process's): report it
            log.exception("job %s failed", job_id)
            beat.update(phase="done")
            beat.write()
            return {"status": "failed", "attempt": attempt, "error": public_error(error, store.root)}
        assets = result.files()
        if storage.exists(storage.join(store.out(job_id), "metrics.json")):
            assets.append("metrics.json")
        metrics = {"steps": result.steps, "resumed_from": result.resumed_from,
                   "total_seconds": result.total_seconds, "final_loss": result.final_loss}
        store.write_result(job_id, {"assets": sorted(assets), "metrics": metrics,
                                    "attempt": attempt, "owner": owner})
        beat.update(phase="done", step=cfg.steps, eta_s=0.0)
        beat.write()
    return {"status": "succeeded", "attempt": attempt}
