"""The job store and runner under faults, without a cluster: unreadable records are quarantined
and never stop the other jobs, attempts count only runs a worker started, statuses say what
is happening now."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import yaml

from mvdream_platform.serve.runner import next_attempt, run_job
from mvdream_platform.serve.settings import ServeSettings
from mvdream_platform.serve.store import REQUEST_UNREADABLE, JobStore, UnreadableJob

from jobs_helpers import ROOT

TINY_MODEL = yaml.safe_load((ROOT / "conf" / "model" / "tiny.yaml").read_text())


def _jobs(store: JobStore, n: int) -> list[str]:
    return [store.create(f"prompt {i}", {"steps": 10, "seed": i}) for i in range(n)]


def test_unreadable_records_are_quarantined_and_every_other_job_still_resumes(tmp_path):
    store = JobStore(str(tmp_path))
    a, b, c, d, e = _jobs(store, 5)
    store.set_state(b, "retrying", attempts=1)
    store.write_lease(c, {"owner": "w", "attempt": 1, "phase": "optimising", "step": 3})
    (tmp_path / "jobs" / a / "state.json").write_bytes(b"")           # 0 bytes
    (tmp_path / "jobs" / b / "request.json").write_text('{"id": "x", "pro')  # truncated
    (tmp_path / "jobs" / c / "lease.json").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "jobs" / d / "result.json").write_text("[1, 2]")     # JSON, but not a record
    assert store.unfinished() == [a, c, d, e]  # b cannot run; all others resume, in order
    for job_id, name in ((a, "state.json"), (b, "request.json")):
        assert not (tmp_path / "jobs" / job_id / name).exists()
    assert store.view(a)["status"] == "queued" and store.view(a)["attempts"] == 0
    failed = store.view(b)
    assert failed["status"] == "failed" and failed["error"] == REQUEST_UNREADABLE
    with pytest.raises(UnreadableJob):
        store.request(b)
    assert store.view(c)["status"] == "queued" and "progress" not in store.view(c)  # the lease is gone
    assert store.view(d)["status"] == "queued" and store.view(d)["assets"] == []
    records = store.quarantined()
    assert sorted((r["job"], r["file"]) for r in records) == sorted(
        [(a, "state.json"), (b, "request.json"), (c, "lease.json"), (d, "result.json")])
    assert all(r["reason"] for r in records)
    # the bytes are kept for an operator, beside their reason
    kept = sorted(p.name for p in (tmp_path / "quarantine" / b).iterdir())
    assert len(kept) == 2 and (tmp_path / "quarantine" / b / kept[0]).read_text() == '{"id": "x", "pro'
    assert store.unfinished() == [a, c, d, e] and len(store.quarantined()) == 4  # nothing counted twice


def test_restarted_jobs_keep_submission_order_within_one_second(tmp_path):
    store = JobStore(str(tmp_path))
    ids = _jobs(store, 12)  # same second: the ids' random suffixes alone would shuffle them
    assert len({i.split("-")[0] for i in ids}) <= 2
    assert store.unfinished() == ids


def test_status_is_what_happens_now(tmp_path):
    store = JobStore(str(tmp_path), lease_timeout_s=30.0)
    job, queued = _jobs(store, 2)
    lease = {"owner": "w1", "attempt": 1, "phase": "optimising", "step": 4, "steps": 10}
    store.write_lease(job, lease)
    assert store.view(job)["status"] == "running" and store.view(job)["attempts"] == 1
    # the worker died; the queue is sending the job again: 'retrying' with the reason
    store.set_state(job, "retrying", attempts=1, retry_of=1, error="worker died during attempt 1")
    view = store.view(job)
    assert view["status"] == "retrying" and "died" in view["error"]
    # ... even while the dead worker's lease still looks fresh
    store.write_lease(job, lease | {"attempt": 2, "step": 5})
    view = store.view(job)
    assert (view["status"], view["attempts"], view["error"]) == ("running", 2, None)
    # a lease nobody refreshed for longer than the timeout is not 'running'
    stale = json.loads((tmp_path / "jobs" / job / "lease.json").read_text())
    stale["heartbeat"] = time.time() - 60
    (tmp_path / "jobs" / job / "lease.json").write_text(json.dumps(stale))
    assert store.view(job)["status"] == "retrying"
    # cancelling: a job no worker holds is cancelled at once; a held one is 'cancelling'
    store.request_cancel(queued)
    assert store.view(queued)["status"] == "cancelled" and store.view(queued)["finished"]
    store.write_lease(job, lease | {"attempt": 2})
    store.request_cancel(job)
    assert store.view(job)["status"] == "cancelling"


def test_next_attempt_counts_runs_not_calls():
    assert next_attempt(None) == (1, False)
    assert next_attempt({"attempt": 1, "phase": "optimising"}) == (2, True)  # its worker died
    assert next_attempt({"attempt": 2, "phase": "done"}) == (3, False)  # it ended; run again


def _settings(tmp_path, **worker) -> ServeSettings:
    return ServeSettings.from_dict({"model": TINY_MODEL, "storage": str(tmp_path),
                                    "worker": {"heartbeat_s": 0.1, "lease_timeout_s": 5.0, **worker}})


def test_a_job_whose_workers_died_max_attempts_times_fails_without_running(tmp_path):
    settings = _settings(tmp_path, max_attempts=2)
    store = JobStore(str(tmp_path))
    [job] = _jobs(store, 1)
    # attempt 2's worker died mid-run (its owner is dead): a third run would exceed the limit
    store.write_lease(job, {"owner": "dead", "attempt": 2, "phase": "optimising", "step": 7})
    outcome = run_job(store, job, pipe=None, settings=settings, owner="w3", owner_alive=lambda o: False)
    assert outcome["status"] == "failed" and outcome["attempt"] == 2 and "died 2 times" in outcome["error"]
    assert store.lease(job)["owner"] == "dead"  # nothing was started


def test_a_resent_call_waits_for_the_live_holder_and_adds_no_attempt(tmp_path):
    settings = _settings(tmp_path)
    store = JobStore(str(tmp_path))
    [job] = _jobs(store, 1)
    store.write_lease(job, {"owner": "w1", "attempt": 1, "phase": "optimising", "step": 3})

    import threading

    def finish_later():  # the live holder finishes a moment later
        time.sleep(0.5)
        store.write_result(job, {"assets": [], "metrics": {}})
        store.write_lease(job, {"owner": "w1", "attempt": 1, "phase": "done"})

    threading.Thread(target=finish_later).start()
    outcome = run_job(store, job, pipe=None, settings=settings, owner="w2", owner_alive=lambda o: True)
    assert outcome == {"status": "succeeded", "attempt": 1}


def test_cancelled_before_start_runs_nothing(tmp_path):
    store = JobStore(str(tmp_path))
    [job] = _jobs(store, 1)
    store.request_cancel(job)
    outcome = run_job(store, job, pipe=None, settings=_settings(tmp_path), owner="w1")
    assert outcome == {"status": "cancelled", "attempt": 0} and store.lease(job) is None


def test_errors_shown_to_clients_carry_no_server_paths_or_tracebacks(tmp_path):
    from ray.exceptions import RayTaskError

    from mvdream_platform.serve.runner import public_error

    root = str(tmp_path / "serve")
    error = FileNotFoundError(f"No such file: '{root}/jobs/j/out/mesh.glb' (from /opt/app/x/loader.py)\n"
                              "Traceback (most recent call last):\n  File \"/opt/app/x.py\", line 3")
    text = public_error(error, root)
    assert text == "FileNotFoundError: No such file: '<storage>/jobs/j/out/mesh.glb' (from loader.py)"
    wrapped = RayTaskError("run", "Traceback (most recent call last):\n  File \"/opt/ray/worker.py\"", error)
    assert public_error(wrapped, root) == text  # the cause, not Ray's remote traceback
    assert "/" not in public_error(ValueError(f"bad {root}/x"), root).replace("<storage>/x", "")


def test_retention_removes_only_what_finished_before_the_cut(tmp_path):
    store = JobStore(str(tmp_path))
    old, recent, running = _jobs(store, 3)
    store.set_state(old, "succeeded", attempts=1, finished=time.time() - 10 * 86400)
    store.set_state(recent, "failed", attempts=1)
    store.write_lease(running, {"owner": "w", "attempt": 1, "phase": "optimising"})
    (tmp_path / "multiview" / "20200101T000000-0badc0de").mkdir(parents=True)
    fresh_images = tmp_path / "multiview" / time.strftime("%Y%m%dT%H%M%S-00000000", time.gmtime())
    fresh_images.mkdir()
    assert store.remove_finished(before=time.time() - 86400) == [old]
    assert sorted(store.job_ids()) == sorted([recent, running])
    assert [p.name for p in (tmp_path / "multiview").iterdir()] == [fresh_images.name]


class _Reply:
    """An answer that takes ``seconds`` (awaitable once, cancellable), like a Serve response."""

    def __init__(self, item, seconds: float, log: dict):
        self.item, self.log = item, log
        self.task = asyncio.ensure_future(self._run(seconds))

    async def _run(self, seconds):
        self.log["running"] += 1
        self.log["peak"] = max(self.log["peak"], self.log["running"])
        try:
            await asyncio.sleep(seconds)
            return self.item * 10
        finally:
            self.log["running"] -= 1

    def cancel(self):  # what Serve's DeploymentResponse.cancel() is asked
        self.log["cancelled"].append(self.item)
        self.task.cancel()

    def __await__(self):
        return self.task.__await__()


def test_gather_bounded_limits_in_flight_and_withdraws_everything_at_the_deadline():
    from mvdream_platform.serve.app import gather_bounded

    async def scenario(deadline_s):
        log = {"running": 0, "peak": 0, "sent": [], "cancelled": []}

        def send(item):
            log["sent"].append(item)
            return _Reply(item, 0.1, log)

        try:
            out = await gather_bounded(send, list(range(6)), in_flight=2, deadline_s=deadline_s)
        except asyncio.TimeoutError:
            out = None
        await asyncio.sleep(0.05)  # let cancellations land
        return out, log

    out, log = asyncio.run(scenario(5.0))
    assert out == [0, 10, 20, 30, 40, 50] and log["peak"] == 2 and log["running"] == 0
    out, log = asyncio.run(scenario(0.15))  # time for the first pair and part of the second
    assert out is None and log["peak"] == 2
    assert log["sent"] == [0, 1, 2, 3]  # items 4 and 5 were never sent
    assert sorted(log["cancelled"]) == [0, 1, 2, 3]  # every sent item is withdrawn (a no-op when answered)
    assert log["running"] == 0  # nothing left running
