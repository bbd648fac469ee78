"""Sweeps of jobs/text_to_3d.py (Hydra multirun) with the basic and the ray_tasks launcher.

Run as subprocesses (run_job): multirun needs the real Hydra entry point. Each sweep is 2x2 toy
text-to-3D jobs of 2 steps; the Ray ones start a local 2-CPU cluster of their own.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

from mvdream_platform import sweeps
from test_text_to_3d_job import FAST

from jobs_helpers import run_job

SWEEP = ["sds.guidance.recon_std_rescale=0,0.5", "seed=0,1"]
SWEPT = {f"sds.guidance.recon_std_rescale={r} seed={s}" for r in (0, 0.5) for s in (0, 1)}
# A fresh local cluster (never one that another process on this machine started), 2 CPUs.
RAY = ["hydra/launcher=ray_tasks", "hydra.launcher.address=local", "+hydra.launcher.init.num_cpus=2",
       "+hydra.launcher.init.include_dashboard=false"]


def _sweep(sweep: Path, *args: str) -> subprocess.CompletedProcess:
    return run_job("text_to_3d.py", "-m", *FAST, "steps=2", f"hydra.sweep.dir={sweep}", *args, timeout=300)


def _summary(sweep: Path) -> list[dict]:
    with open(sweep / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def _jobs(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob(f"*/{sweeps.JOB_FILE}"))]


def _check_completed_sweep(sweep: Path) -> list[dict]:
    """4 jobs, each in its own folder with its own assets, and one summary row per job."""
    rows = _summary(sweep)
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert {r["overrides"] for r in rows} == SWEPT  # the shared FAST overrides are left out
    for row in rows:
        folder = sweep / row["job"]
        assert row["status"] == "COMPLETED" and row["out"] == str(folder)
        assert (folder / "mesh.glb").is_file() and (folder / "turntable.gif").is_file()
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["steps"] == 2 and f"seed={metrics['seed']}" in row["overrides"]
        assert f"out: {folder}" in (folder / "config.yaml").read_text()
        # the default prompt is marked: its Janus verdict is in the summary beside IoU
        assert row["prompt"] == "a red cube with a yellow front" and row["seed"] == str(metrics["seed"])
        assert row["janus"] == metrics["quality"]["janus"]["verdict"]
        assert row["janus"] in ("single", "multiple", "none", "everywhere")
        assert 0 <= float(row["volume_iou"]) <= 1
        assert math.isclose(float(row["final_loss"]), metrics["final"]["loss"], rel_tol=1e-6)
        assert 0 <= float(row["iou"]) <= 1 and 0 <= float(row["colour_accuracy"]) <= 1
        assert float(row["seconds"]) > 0
    # different recon_std_rescale or seed: different runs
    assert len({r["final_loss"] for r in rows}) == 4
    table = (sweep / "summary.md").read_text()
    assert "4 jobs: 4 completed, 0 failed." in table
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + 4  # header + 4 jobs
    return _jobs(sweep)


def test_basic_launcher_sweep_writes_a_folder_per_job_and_a_summary(tmp_path):
    proc = _sweep(tmp_path / "sweep", *SWEEP)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _check_completed_sweep(tmp_path / "sweep")
    assert "sweep summary (4 jobs, 0 failed)" in proc.stdout
    assert "Callback SweepSummary" not in proc.stderr  # Hydra warns about failing or missing hooks
    # one after another in this process
    assert len({j["pid"] for j in jobs}) == 1 and all(j["ray_task_id"] is None for j in jobs)


def test_ray_tasks_launcher_runs_the_jobs_as_parallel_ray_tasks(tmp_path):
    proc = _sweep(tmp_path / "sweep", *SWEEP, *RAY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _check_completed_sweep(tmp_path / "sweep")
    # each job ran in a Ray task (a worker process), two at a time on the 2-CPU cluster
    assert len({j["ray_task_id"] for j in jobs}) == 4 and None not in {j["ray_task_id"] for j in jobs}
    spans = sorted((j["ended_at"] - j["seconds"], j["ended_at"]) for j in jobs)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans


def test_a_failing_job_is_reported_and_the_others_complete(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _sweep(sweep, "guidance_scale=7.5,-1,2")
    assert proc.returncode != 0
    assert "guidance_scale" in proc.stderr  # Hydra re-raises the failed job's error at the end
    rows = _summary(sweep)
    assert [(r["job"], r["status"]) for r in rows] == [("0", "COMPLETED"), ("1", "FAILED"), ("2", "COMPLETED")]
    assert "guidance_scale" in rows[1]["error"] and rows[1]["final_loss"] == ""
    for job in ("0", "2"):
        assert (sweep / job / "metrics.json").is_file() and rows[int(job)]["final_loss"] != ""
    assert [r["overrides"] for r in rows] == ["guidance_scale=7.5", "guidance_scale=-1", "guidance_scale=2"]
    table = (sweep / "summary.md").read_text()
    assert "3 jobs: 2 completed, 1 failed." in table and "## Failed jobs" in table


TOY = """\
import os

import hydra


@hydra.main(config_path=".", config_name="toy", version_base="1.3")
def main(cfg):
    if cfg.x == 2:
        os._exit(3)  # the worker process dies: its task returns no JobReturn
    return cfg.x


if __name__ == "__main__":
    main()
"""


def test_a_crashed_ray_worker_is_a_failed_job_not_a_lost_sweep(tmp_path):
    (tmp_path / "toy.py").write_text(TOY)
    (tmp_path / "toy.yaml").write_text(textwrap.dedent("""\
        x: 0
        hydra:
          output_subdir: null
          job: {chdir: false}
          callbacks:
            sweep_summary: {_target_: mvdream_platform.sweeps.SweepSummary}
        """))
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "toy.py", "-m", "x=1,2,3", f"hydra.sweep.dir={sweep}", *RAY,
                           "hydra.launcher.max_concurrent=1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "WorkerCrashedError" in proc.stderr
    rows = _summary(sweep)
    assert [(r["job"], r["status"]) for r in rows] == [("0", "COMPLETED"), ("1", "FAILED"), ("2", "COMPLETED")]
    assert "WorkerCrashedError" in rows[1]["error"]
    spans = sorted((j["ended_at"] - j["seconds"], j["ended_at"]) for j in _jobs(sweep) if j["seconds"])
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:]))  # one at a time


def test_job_out_is_the_job_folder_unless_the_command_line_sets_out():
    assert sweeps.job_out("outputs/x/123", ["seed=1"], "/s/0") == "/s/0"
    assert sweeps.job_out("/mine/1", ["seed=1", "out=/mine/1"], "/s/0") == "/mine/1"
    assert sweeps.job_out("/mine", ["++out=/mine"], "/s/0") == "/mine"
    assert sweeps.override_key("+sds.cameras.bogus=1") == "sds.cameras.bogus"


def test_ray_tasks_is_a_discovered_hydra_launcher_plugin():
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    names = [f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Launcher)]
    assert "hydra_plugins.mvdream_ray_tasks.ray_tasks_launcher.RayTasksLauncher" in names
    node = ConfigStore.instance().load("hydra/launcher/ray_tasks.yaml").node
    assert {"address", "num_cpus", "num_gpus", "max_concurrent", "init"} <= set(node)
