"""The W&B wrapper: no-op ranks, the local record, error handling, and one real offline run."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import PIL.Image
import pytest

from mvdream_platform.tracking import (
    Tracker,
    TrackingConfigError,
    image_filename,
    read_metrics,
    start_tracking,
    to_uint8_image,
)


def start(tmp_path, mode="disabled", **kwargs):
    kwargs.setdefault("dir", tmp_path / "track")
    return start_tracking(mode, project="test", run_name=None, group=None, config={"lr": 1e-3},
                          **kwargs)


def test_other_ranks_are_noop(tmp_path):
    tracker = start(tmp_path, rank=1)
    with tracker:
        tracker.log({"loss": 1.0}, step=0)
        tracker.log_images("samples", np.zeros((2, 4, 4, 3), np.uint8), step=0)
        tracker.summary({"best": 1.0})
    assert tracker.run_id is None and tracker.run_dir is None and tracker.dir is None
    assert not tracker.active
    assert not (tmp_path / "track").exists()  # a non-zero rank writes nothing at all


def test_disabled_mode_writes_metrics_jsonl(tmp_path):
    import torch

    with start(tmp_path) as tracker:
        assert tracker.run_id is None and tracker.run_dir is None and tracker.active
        tracker.log({"loss": 0.5, "lr": np.float32(0.25), "n": 3}, step=0)
        # One-element tensors become numbers; a non-scalar is W&B-only, not in the JSON line.
        tracker.log({"loss": torch.tensor(0.25), "hist": np.arange(4), "step": 99}, step=1)
    lines = (tmp_path / "track" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [0, 1]  # a metric named "step" cannot override it
    assert records[0]["loss"] == 0.5 and records[0]["lr"] == 0.25 and records[0]["n"] == 3
    assert records[1]["loss"] == 0.25 and "hist" not in records[1]
    assert all(isinstance(r["time"], float) for r in records)
    assert not (tmp_path / "track" / "wandb").exists()


def test_read_metrics_merges_resumed_steps(tmp_path):
    with start(tmp_path) as tracker:
        tracker.log({"loss": 3.0}, step=0)
        tracker.log({"loss": 2.0}, step=1)
    # A restart from the step-0 checkpoint re-logs step 1: the later line wins.
    with start(tmp_path) as tracker:
        tracker.log({"loss": 1.5, "extra": 1}, step=1)
    with open(tmp_path / "track" / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # killed mid-write: skipped by readers
    assert len(read_metrics(tmp_path / "track", dedupe=False)) == 3
    merged = read_metrics(tmp_path / "track")
    assert [(r["step"], r["loss"]) for r in merged] == [(0, 3.0), (1, 1.5)]
    assert merged[1]["extra"] == 1
    assert read_metrics(tmp_path / "missing") == []


def test_log_images_writes_loadable_pngs(tmp_path):
    rng = np.random.default_rng(0)
    views = rng.random((4, 8, 6, 3)).astype(np.float32)  # floats in [0, 1]
    grid = rng.integers(0, 256, (16, 12, 3), dtype=np.uint8)
    with start(tmp_path) as tracker:
        tracker.log_images("val/samples", views, captions=list("abcd"), step=10)
        tracker.log_images("grid", grid, captions=["a grid"], step=3)
        tracker.log_images("many", np.zeros((9, 2, 2, 3), np.uint8), step=0)

    assert image_filename("val/samples", 10) == "media/val_samples_10.png"
    row = np.asarray(PIL.Image.open(tmp_path / "track" / "media" / "val_samples_10.png"))
    assert row.shape == (8, 4 * 6, 3) and row.dtype == np.uint8  # N <= 8: one row of views
    np.testing.assert_array_equal(row[:, 6:12], (views[1] * 255).round().astype(np.uint8))
    saved = np.asarray(PIL.Image.open(tmp_path / "track" / image_filename("grid", 3)))
    np.testing.assert_array_equal(saved, grid)  # a single picture is stored as is
    square = np.asarray(PIL.Image.open(tmp_path / "track" / image_filename("many", 0)))
    assert square.shape == (6, 6, 3)  # 9 images: a 3x3 grid


def test_to_uint8_image_shapes():
    assert to_uint8_image(np.ones((5, 2, 3, 3)), ncols=2).shape == (3 * 2, 2 * 3, 3)
    assert to_uint8_image(np.ones((2, 4, 4, 1))).shape == (4, 8)  # grayscale -> (H, W)
    assert to_uint8_image(np.full((2, 2, 3), 2.0)).max() == 255  # clipped
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        to_uint8_image(np.zeros((2, 3, 8, 8)))  # channels-first is refused, not misread


def test_summary_merges_into_summary_json(tmp_path):
    with start(tmp_path) as tracker:
        tracker.summary({"best_loss": 0.5, "best_step": 7})
        tracker.summary({"best_loss": 0.25})
    assert json.loads((tmp_path / "track" / "summary.json").read_text()) == {
        "best_loss": 0.25, "best_step": 7}


def test_bad_mode_names_allowed_values(tmp_path):
    with pytest.raises(ValueError, match="'offline', 'online', 'disabled'"):
        start(tmp_path, mode="offlne")
    with pytest.raises(ValueError, match="local folder"):
        start(tmp_path, dir="s3://bucket/run")
    with pytest.raises(ValueError, match="resume_id"):
        start(tmp_path, resume_id="train/run:1")  # W&B refuses '/' and ':' in run ids


def test_online_without_api_key_fails_before_init(tmp_path, monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(wandb, "init", lambda *a, **k: pytest.fail("wandb.init was reached"))
    with pytest.raises(TrackingConfigError, match="WANDB_API_KEY"):
        start(tmp_path, mode="online")
    # Only rank 0 talks to W&B, so only rank 0 needs the key.
    assert start(tmp_path, mode="online", rank=1).run is None


def test_wandb_mode_disabled_env_is_a_kill_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with start(tmp_path, mode="offline") as tracker:
        tracker.log({"loss": 1.0}, step=0)
    assert tracker.run is None
    assert not (tmp_path / "track" / "wandb").exists()
    assert read_metrics(tmp_path / "track")[0]["loss"] == 1.0


class BrokenRun:
    """Stands in for a wandb Run whose every call raises (disk full, service crashed, ...)."""

    id = "broken"
    dir = "/nonexistent/offline-run-x/files"

    def __init__(self):
        self.summary = self
        self.finished = 0

    def log(self, *args, **kwargs):
        raise OSError("wandb service went away")

    def update(self, *args, **kwargs):
        raise OSError("wandb service went away")

    def finish(self, exit_code=0):
        self.finished += 1
        raise OSError("wandb service went away")


def test_tracking_errors_do_not_propagate(tmp_path, caplog):
    run = BrokenRun()
    tracker = Tracker(run=run, dir=tmp_path)
    with caplog.at_level(logging.DEBUG, logger="mvdream_platform.tracking"):
        for step in range(3):
            tracker.log({"loss": 1.0 / (step + 1)}, step=step)
        tracker.log_images("x", np.zeros((2, 4, 4, 3), np.uint8), captions=["a", "b"], step=0)
        tracker.log_images("bad", np.zeros((3, 8, 8)), step=0)  # a bad shape is a warning too
        tracker.summary({"best": 1.0})
        tracker.finish()
        tracker.finish()  # idempotent
        tracker.log({"loss": 0.0}, step=9)  # after finish: ignored, with a warning
    # The local record survives W&B's failure.
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    assert (tmp_path / image_filename("x", 0)).exists()
    assert run.finished == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # Warned once per failing call, not once per step.
    assert sum("log (wandb) failed" in m for m in warnings) == 1
    assert any("log_images (PNG) failed" in m for m in warnings)
    assert any("already finished" in m for m in warnings)


def test_local_record_errors_do_not_propagate(tmp_path):
    (tmp_path / "track").write_text("a file where the folder should be")
    tracker = Tracker(dir=tmp_path / "track")
    tracker.log({"loss": 1.0}, step=0)
    tracker.log_images("x", np.zeros((4, 4, 3)), step=0)
    tracker.summary({"a": 1})
    tracker.finish()


def test_real_offline_run_and_resume(tmp_path, monkeypatch, caplog):
    # conftest sets WANDB_MODE=disabled as a kill switch; lift it for this one test, and keep
    # every file W&B writes (its cache/config/core debug log) under tmp_path.
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    out = tmp_path / "track"

    with start(tmp_path, mode="offline", tags=("test",), job_type="train") as tracker:
        assert tracker.run is not None and tracker.run.settings.mode == "offline"
        run_id, run_dir = tracker.run_id, tracker.run_dir
        tracker.log({"loss": 1.0}, step=0)
        tracker.log({"loss": 0.5}, step=1)
        tracker.log_images("samples", np.zeros((2, 4, 4, 3), np.float32), ["a", "b"], step=1)
        tracker.summary({"final_loss": 0.5})
    # Every W&B call went through (a failure would only have been a warning).
    assert not [r for r in caplog.records if r.name == "mvdream_platform.tracking"
                and r.levelno >= logging.WARNING]

    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert [str(p) for p in runs] == [run_dir] and run_dir.endswith(run_id)
    assert (runs[0] / f"run-{run_id}.wandb").stat().st_size > 0
    assert [(r["step"], r["loss"]) for r in read_metrics(out)] == [(0, 1.0), (1, 0.5)]
    assert (out / image_filename("samples", 1)).exists()

    # Resuming with the run id continues the same run: offline, a second folder with that id
    # (``wandb sync`` uploads both into one run; wandb adds "-1" to a name taken in the same
    # second); the local record keeps appending.
    with start(tmp_path, mode="offline", resume_id=run_id) as tracker:
        assert tracker.run_id == run_id
        tracker.log({"loss": 0.25}, step=2)
    runs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert len(runs) == 2 and all((r / f"run-{run_id}.wandb").exists() for r in runs)
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2]


def test_tracking_dir_is_inside_a_local_output_and_local_for_an_object_store():
    from mvdream_platform.tracking import tracking_dir

    assert tracking_dir("outputs/run1", "run1") == os.path.join("outputs/run1", "tracking")
    assert tracking_dir("s3://bucket/run1", "sweep", "t3") == os.path.join("outputs", "wandb", "sweep", "t3", "tracking")
