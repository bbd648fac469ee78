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
old or the new file, never half of one.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from .. import storage

JOB_ID = re.compile(r"^[0-9]{8}T[0-9]{6}-[0-9a-f]{8}$")
ASSET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TERMINAL = ("succeeded", "failed", "cancelled")
STATUSES = ("queued", "running", "cancelling") + TERMINAL


class UnknownJob(KeyError):
    """No job with this id (or the id is not a job id at all)."""


class UnknownAsset(KeyError):
    """The job has no asset of this name."""


def new_job_id() -> str:
    """Sortable by creation time (UTC second), unguessable suffix: ``20261126T001500-1a2b3c4d``."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)


@dataclass
class JobStore:
    """Jobs under ``root`` (a local path or fsspec URI)."""

    root: str

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
        uri = self._file(job_id, name)
        try:
            return storage.read_json(uri)
        except FileNotFoundError:
            return None

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
        storage.write_bytes(self._file(job_id, "cancel"), b"")

    def write_result(self, job_id: str, result: dict[str, Any]) -> None:
        """Worker only, last: the asset list that makes the job's outputs downloadable."""
        storage.write_json(self._file(job_id, "result.json"), result)

    # -------------------------------------------------------------- readers
    def request(self, job_id: str) -> dict[str, Any]:
        request = self._read(job_id, "request.json")
        if request is None:
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

    def job_ids(self) -> list[str]:
        """All job ids, oldest first."""
        return [n for n in storage.listdir(storage.join(self.root, "jobs")) if JOB_ID.match(n)]

    def unfinished(self) -> list[str]:
        """Accepted jobs that have not reached a terminal state (what a restart must resume)."""
        return [j for j in self.job_ids()
                if storage.exists(self._file(j, "request.json")) and self.state(j)["status"] not in TERMINAL]

    def asset_uri(self, job_id: str, name: str) -> str:
        """The URI of one of the job's finished assets; names outside its asset list are refused,
        so no name (``../x``, absolute paths, checkpoints) can reach outside the job's files."""
        result = self.result(job_id)
        if result is None or not ASSET_NAME.match(name) or name not in result["assets"]:
            raise UnknownAsset(name)
        return storage.join(self.out(job_id), name)

    def view(self, job_id: str) -> dict[str, Any]:
        """What GET /v1/jobs/{id} shows: status, progress, ETA, error, asset names."""
        request = self.request(job_id)
        state = self.state(job_id)
        result = self.result(job_id)
        status = state["status"]
        if result is not None and status not in TERMINAL:
            # The worker wrote its result but the queue died before recording it; its restart
            # will. The result is written last and only when complete, so it is authoritative.
            status = "succeeded"
        view: dict[str, Any] = {
            "id": job_id, "prompt": request["prompt"], "options": request["options"],
            "status": status, "attempts": state.get("attempts", 0), "created": request["created"],
            "error": state.get("error"),
        }
        lease = self.lease(job_id)
        if lease is not None:
            view["progress"] = {k: lease.get(k) for k in ("step", "steps", "phase", "loss", "eta_s", "heartbeat")}
            if status == "queued" and lease.get("phase") not in (None, "done"):
                view["status"] = status = "running"
        if status not in TERMINAL and self.cancel_requested(job_id):
            view["status"] = "cancelling"
        if status in TERMINAL:
            view["finished"] = state.get("finished", (lease or {}).get("heartbeat"))
        view["assets"] = sorted(result["assets"]) if result and status == "succeeded" else []
        if result and status == "succeeded":
            view["metrics"] = result.get("metrics")
        return view
