"""Durable text-to-3D job state in any fsspec storage.

One folder per job, ``<storage>/jobs/<id>/``, and one writer per file so that no two processes
ever read-modify-write the same object:

* ``request.json``: the ingress, once, before the job id is returned (so an accepted job is
  on storage before anyone knows its id);
* ``state.json``: the queue (attempts, status transitions, errors); absent means queued;
* ``lease.json``: the worker running the job (owner actor, heartbeat, progress);
* ``cancel``: the ingress, when a client cancels;
* ``result.json``: the worker, when the assets are complete;
* ``out/``: the text-to-3D run folder (assets, metrics.json, resumable field checkpoints).

Every JSON write is atomic (:func:`mvdream_platform.storage.write_json`), so a reader sees the
old or the new file, never half of one. A record that still cannot be read (a disk fault, a
hand edit, a truncated copy) is *quarantined*: moved to ``<storage>/quarantine/<id>/`` with the
reason beside it, logged and counted (``/healthz``), and the job goes on without it where it can:

* ``state.json`` / ``lease.json`` / ``result.json``: the job is treated as not started / not held
  / not finished, so the queue runs it again (resuming from its field checkpoints);
* ``request.json``: the job cannot run; it shows as ``failed`` with the reason.

One unreadable job never stops the others from being listed or resumed.

``attempts`` counts the runs a worker started (:func:`.runner.run_job` writes it in the lease):
1 for a job that ran once, one more for each worker that died while holding it. A queue restart
or a re-sent call never adds one.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from .. import storage

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"^[0-9]{8}T[0-9]{6}-[0-9a-f]{8}$")
ASSET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TERMINAL = ("succeeded", "failed", "cancelled")
# ``retrying``: its worker died; the queue has sent it again (the reason is in ``error``).
STATUSES = ("queued", "running", "retrying", "cancelling") + TERMINAL
REQUEST_UNREADABLE = "the stored request of this job could not be read (quarantined); submit the prompt again"


class UnknownJob(KeyError):
    """No job with this id (or the id is not a job id at all)."""


class UnknownAsset(KeyError):
    """The job has no asset of this name."""


class UnreadableJob(Exception):
    """The job exists but its request could not be read (it was quarantined)."""


def _id_time(job_id: str) -> float:
    """The UTC second a job (or multi-view request) id was made."""
    import calendar

    return float(calendar.timegm(time.strptime(job_id.split("-")[0], "%Y%m%dT%H%M%S")))


def new_job_id() -> str:
    """Sortable by creation time (UTC second), unguessable suffix: ``20261126T001500-1a2b3c4d``."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)


@dataclass
class JobStore:
    """Jobs under ``root`` (a local path or fsspec URI).

    ``lease_timeout_s``: a lease whose heartbeat is older than this does not make a job show as
    ``running`` (its worker is gone or stuck; the queue's retry decides what happens next).
    """

    root: str
    lease_timeout_s: float = 120.0

    # -------------------------------------------------------------- paths
    def folder(self, job_id: str) -> str:
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            raise UnknownJob(job_id)
        return storage.join(self.root, "jobs", job_id)

    def out(self, job_id: str) -> str:
        """The text-to-3D run folder of the job."""
        return storage.join(self.folder(job_id), "out")

    def _file(self, job_id: str, name: str) -> str:
        return storage.join(self.folder(job_id), name)

    def _read(self, job_id: str, name: str) -> dict[str, Any] | None:
        """The record, or None when it is absent or was unreadable (then it is quarantined)."""
        uri = self._file(job_id, name)
        try:
            record = storage.read_json(uri)
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
            self._quarantine(job_id, name, f"{type(error).__name__}: {error}")
            return None
        if not isinstance(record, dict):
            self._quarantine(job_id, name, f"not a JSON object but {type(record).__name__}")
            return None
        return record

    # -------------------------------------------------------------- quarantine
    def _quarantine_folder(self, job_id: str) -> str:
        return storage.join(self.root, "quarantine", job_id)

    def _quarantine(self, job_id: str, name: str, reason: str) -> None:
        """Move an unreadable record aside (bytes and reason kept for an operator)."""
        uri = self._file(job_id, name)
        stamp = f"{time.time():.6f}"
        target = storage.join(self._quarantine_folder(job_id), f"{stamp}-{name}")
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:  # another reader moved it first
            return
        storage.write_bytes(target, data)
        storage.write_json(target + ".why.json", {"job": job_id, "file": name, "reason": reason,
                                                  "bytes": len(data), "time": float(stamp)})
        storage.remove(uri)
        log.error("job %s: %s could not be read (%s); quarantined to %s", job_id, name, reason, target)

    def quarantined(self) -> list[dict[str, Any]]:
        """Every quarantined record (job, file, reason, bytes, time), oldest first."""
        records = []
        for job_id in storage.listdir(storage.join(self.root, "quarantine")):
            folder = self._quarantine_folder(job_id)
            for name in storage.listdir(folder):
                if name.endswith(".why.json"):
                    try:
                        records.append(storage.read_json(storage.join(folder, name)))
                    except (ValueError, UnicodeDecodeError, FileNotFoundError):
                        records.append({"job": job_id, "file": name[:-len(".why.json")], "reason": "unknown"})
        return sorted(records, key=lambda r: r.get("time", 0.0))

    def request_quarantined(self, job_id: str) -> bool:
        return any(n.endswith("-request.json.why.json")
                   for n in storage.listdir(self._quarantine_folder(job_id)))

    # -------------------------------------------------------------- writers
    def create(self, prompt: str, options: dict[str, Any]) -> str:
        """Write a new job's request; returns its id. The job is durable once this returns."""
        job_id = new_job_id()
        storage.write_json(self._file(job_id, "request.json"),
                           {"id": job_id, "prompt": prompt, "options": options, "created": time.time()})
        return job_id

    def set_state(self, job_id: str, status: str, **fields: Any) -> dict[str, Any]:
        """Queue only: record a status transition (keeps attempts and times across writes)."""
        if status not in STATUSES:
            raise ValueError(f"unknown job status {status!r}; allowed: {STATUSES}")
        state = self.state(job_id)
        state.update(fields, status=status, updated=time.time())
        if status in TERMINAL:
            state.setdefault("finished", state["updated"])
        storage.write_json(self._file(job_id, "state.json"), state)
        return state

    def write_lease(self, job_id: str, lease: dict[str, Any]) -> None:
        """Worker only: its ownership of the job, heartbeat and progress."""
        storage.write_json(self._file(job_id, "lease.json"), lease | {"heartbeat": time.time()})

    def request_cancel(self, job_id: str) -> None:
        """Ingress only: the client's cancel, with its time (a job no one started ends then)."""
        storage.write_bytes(self._file(job_id, "cancel"), f"{time.time():.6f}".encode())

    def write_result(self, job_id: str, result: dict[str, Any]) -> None:
        """Worker only, last: the asset list that makes the job's outputs downloadable."""
        storage.write_json(self._file(job_id, "result.json"), result)

    # -------------------------------------------------------------- readers
    def request(self, job_id: str) -> dict[str, Any]:
        """The job's request; raises :class:`UnknownJob` (no such job) or
        :class:`UnreadableJob` (its request was quarantined)."""
        request = self._read(job_id, "request.json")
        if request is None:
            if self.request_quarantined(job_id):
                raise UnreadableJob(job_id)
            raise UnknownJob(job_id)
        return request

    def state(self, job_id: str) -> dict[str, Any]:
        return self._read(job_id, "state.json") or {"status": "queued", "attempts": 0}

    def lease(self, job_id: str) -> dict[str, Any] | None:
        return self._read(job_id, "lease.json")

    def result(self, job_id: str) -> dict[str, Any] | None:
        return self._read(job_id, "result.json")

    def cancel_requested(self, job_id: str) -> bool:
        return storage.exists(self._file(job_id, "cancel"))

    def cancel_time(self, job_id: str) -> float | None:
        try:
            return float(storage.read_bytes(self._file(job_id, "cancel")).decode())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):  # an empty file from an older version
            return 0.0

    def job_ids(self) -> list[str]:
        """All job ids, by creation second (jobs made within one second in no particular order;
        :meth:`unfinished` gives submission order)."""
        return [n for n in storage.listdir(storage.join(self.root, "jobs")) if JOB_ID.match(n)]

    def unfinished(self) -> list[str]:
        """Accepted jobs that have not reached a terminal state (what a restart must resume), in
        submission order. Unreadable records are quarantined on the way; a job whose request is
        unreadable cannot run and is left out (its view says so)."""
        pending = []
        for job_id in self.job_ids():
            if self.state(job_id)["status"] in TERMINAL:  # most jobs: one small read
                continue
            request = self._read(job_id, "request.json")
            if request is not None:
                pending.append((float(request.get("created", 0.0)), job_id))
        return [job_id for _, job_id in sorted(pending)]  # ids sort by second only

    def remove_finished(self, before: float) -> list[str]:
        """Delete every job that reached a terminal state before time ``before`` (its whole
        folder) and every multi-view URL-image folder older than that; returns the job ids.
        Unfinished jobs are never touched, however old."""
        removed = []
        for job_id in self.job_ids():
            view = self.view(job_id)
            finished = view.get("finished")
            if view["status"] in TERMINAL and finished is not None and float(finished) < before:
                storage.remove_tree(self.folder(job_id))
                removed.append(job_id)
        images = storage.join(self.root, "multiview")
        for request_id in storage.listdir(images):  # ids start with their UTC creation second
            if JOB_ID.match(request_id) and _id_time(request_id) < before:
                storage.remove_tree(storage.join(images, request_id))
        if removed:
            log.info("retention: removed %d finished jobs", len(removed))
        return removed

    def asset_uri(self, job_id: str, name: str) -> str:
        """The URI of one of the job's finished assets; names outside its asset list are refused,
        so no name (``../x``, absolute paths, checkpoints) can reach outside the job's files."""
        result = self.result(job_id)
        if result is None or not ASSET_NAME.match(name) or name not in result["assets"]:
            raise UnknownAsset(name)
        return storage.join(self.out(job_id), name)

    def view(self, job_id: str) -> dict[str, Any]:
        """What GET /v1/jobs/{id} shows: status, progress, ETA, error, asset names.

        The status is what is happening now: ``running`` only while a worker's lease is fresh,
        ``retrying`` (with the reason) while a dead worker's job waits for its next attempt,
        ``cancelled`` at once for a job no worker has started.
        """
        try:
            request = self.request(job_id)
        except UnreadableJob:
            return {"id": job_id, "prompt": "", "options": {}, "status": "failed", "attempts": 0,
                    "created": 0.0, "error": REQUEST_UNREADABLE, "assets": []}
        state = self.state(job_id)
        result = self.result(job_id)
        lease = self.lease(job_id)
        status = state["status"]
        if result is not None and status not in TERMINAL:
            # The worker wrote its result but the queue died before recording it; its restart
            # will. The result is written last and only when complete, so it is authoritative.
            status = "succeeded"
        attempts = max(int(state.get("attempts", 0)), int((lease or {}).get("attempt", 0)))
        view: dict[str, Any] = {
            "id": job_id, "prompt": request["prompt"], "options": request["options"],
            "status": status, "attempts": attempts, "created": request["created"],
            "error": state.get("error"),
        }
        holding = lease is not None and lease.get("phase") not in (None, "done")
        fresh = holding and time.time() - float(lease.get("heartbeat", 0.0)) <= self.lease_timeout_s
        if lease is not None:
            view["progress"] = {k: lease.get(k) for k in ("step", "steps", "phase", "loss", "eta_s", "heartbeat")}
        if status not in TERMINAL:
            retried_attempt = int(state.get("retry_of", 0))
            if fresh and int(lease.get("attempt", 0)) > retried_attempt:
                status = "running"  # a live worker holds it (the retry's new attempt, if any)
            elif status == "running":
                status = "queued"  # a stale 'running' from a queue that died: nobody holds it
            if self.cancel_requested(job_id):
                status = "cancelling" if fresh else "cancelled"  # nobody runs it: nothing to wait for
            view["status"] = status
            if status == "running":
                view["error"] = None  # the retry's reason is history once the new attempt runs
        if view["status"] in TERMINAL:
            view["finished"] = (state.get("finished") or (lease or {}).get("heartbeat")
                                or self.cancel_time(job_id) or state.get("updated"))
        view["assets"] = sorted(result["assets"]) if result and status == "succeeded" else []
        if result and status == "succeeded":
            view["metrics"] = result.get("metrics")
        return view
