"""jobs/text_to_3d.py end to end on the shipped tiny model: assets, metrics, scores, resume, baseline."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import trimesh
from safetensors.torch import load_file

from jobs_helpers import compose, import_job, run_job

# A few steps of the real job at toy sizes (16 px renders, 16 samples per ray, small grid).
FAST = [
    "model=tiny", "logger=disabled", "progress=false",
    "sds.field.n_levels=4", "sds.field.log2_hashmap_size=10", "sds.field.hidden_dim=16",
    "sds.render.num_samples_per_ray=16", "sds.cameras.resolution=16",
    "sds.shading.ambient_only_steps=2", "sds.guidance.anneal_steps=4", "sds.optim.orient_end_step=4",
    "sds.export.mesh_resolution=32", "sds.export.turntable_frames=4",
    "sds.export.turntable_resolution=16", "sds.export.quality_views=4",
    "sds.checkpoint_every=2", "sds.log_every=1", "sds.render_every=100",
    "sds.schedule_steps=null",  # the step counts above are absolute (stretching: its own test)
]


def _run(tmp_path: Path, name: str, *overrides: str):
    out = tmp_path / name
    return import_job("text_to_3d").run(compose("text_to_3d", FAST + [f"out={out}", *overrides]))


def _weights(out: Path) -> dict[str, torch.Tensor]:
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    return load_file(out / "checkpoints" / latest["modules"])


def test_job_writes_every_asset_and_ground_truth_metrics(tmp_path, capsys):
    record = _run(tmp_path, "red", 'prompt="a red cube"', "steps=4", "sds.export.mesh_threshold=0.5")
    out = tmp_path / "red"
    printed = capsys.readouterr().out
    mesh = trimesh.load(out / "mesh.glb", force="mesh")
    assert len(mesh.faces) > 0
    for name in ("mesh.obj", "mesh.ply"):
        assert len(trimesh.load(out / name, force="mesh").faces) == len(mesh.faces)
    assert iio.imread(out / "turntable.gif", index=None).shape[:3] == (4, 16, 16)
    assert (out / "turntable.mp4").stat().st_size > 0
    assert iio.imread(out / "multiview.png").shape == (16, 64, 3)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == 4 and saved["final"]["step"] == 4 and np.isfinite(saved["final"]["loss"])
    quality = saved["quality"]
    assert quality["object"] == "a red cube" and len(quality["views"]) == 4
    assert 0.0 <= quality["mean_iou"] <= 1.0 and 0.0 <= quality["colour_accuracy"] <= 1.0
    assert 0.0 <= quality["volume_iou"] <= 1.0 and quality["genus_truth"] == 0
    assert quality["topology_ok"] == (quality["genus"] == 0) and "janus" not in quality  # no marker
    assert record.quality == quality and record.to_json() == saved
    assert (out / "quality.png").is_file() and not (out / "janus.png").exists()
    # every file written is printed with what it is, and the scores beside the object
    for name in ("config.yaml", "mesh.glb", "mesh.obj", "mesh.ply", "turntable.gif", "turntable.mp4",
                 "multiview.png", "quality.png", "metrics.json", "checkpoints/"):
        assert any(line.split()[:1] == [name] and len(line.split()) > 2 for line in printed.splitlines()), name
    assert "janus.png" not in printed
    assert "vs ground truth (a red cube): silhouette IoU" in printed and "volume IoU" in printed
    # metrics.jsonl from the local tracker: one line per step (log_every=1)
    steps = [json.loads(line)["step"] for line in (out / "tracking" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    logged = json.loads((out / "tracking" / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["min_step"] <= logged["t"] <= logged["max_step"]  # the annealed range is logged
    assert (out / "tracking" / "media" / "renders_4.png").is_file()  # renders of the eval orbit


def test_a_marked_prompt_gets_the_janus_verdict_beside_iou(tmp_path, capsys):
    record = _run(tmp_path, "marked", 'prompt="a red cube with a yellow front"', "steps=2")
    out = tmp_path / "marked"
    janus = json.loads((out / "metrics.json").read_text())["quality"]["janus"]
    assert janus == record.quality["janus"]
    assert janus["verdict"] in ("single", "multiple", "none", "everywhere") and janus["truth_verdict"] == "single"
    assert len(janus["shares"]) == 16 and janus["marker"] == "yellow" and janus["body"] == "red"
    assert iio.imread(out / "janus.png").shape == (64, 16 * 32, 3)
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("vs ground truth"))
    assert f"Janus: {janus['verdict']}" in line and line.index("silhouette IoU") < line.index("Janus")
    assert any(line.split()[:1] == ["janus.png"] for line in printed.splitlines())


def test_prompts_outside_the_vocabulary_get_no_made_up_quality(tmp_path, capsys):
    record = _run(tmp_path, "dog", 'prompt="a photo of a dog"', "steps=1")
    assert record.quality is None
    assert "quality" not in json.loads((tmp_path / "dog" / "metrics.json").read_text())
    assert "no ground truth for 'a photo of a dog'" in capsys.readouterr().out


def test_score_false_skips_the_ground_truth(tmp_path):
    record = _run(tmp_path, "unscored", "steps=1", "score=false")
    assert record.quality is None and not (tmp_path / "unscored" / "quality.png").exists()


def test_resume_equals_an_uninterrupted_run_and_same_seed_same_field(tmp_path):
    grid = "sds.render.occ_update_interval=1"  # the occupancy grid changes every step
    _run(tmp_path, "straight", "steps=4", grid)
    _run(tmp_path, "resumed", "steps=2", grid)
    resumed = _run(tmp_path, "resumed", "steps=4", grid)
    assert resumed.resumed_from == 2
    straight, again = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert straight.keys() == again.keys()
    for key in straight:
        torch.testing.assert_close(again[key], straight[key], rtol=0, atol=0, msg=key)


def test_schedules_stretch_to_the_run_length(tmp_path):
    """conf/sds/tiny.yaml's schedules are written for 400 steps: a 6-step run anneals its
    timesteps (and warms up) within its own 6 steps; with absolute schedules it stays at t ~ 970."""
    written_for_400 = ["sds.guidance.anneal_steps=400", "sds.shading.ambient_only_steps=300",
                       "sds.optim.orient_end_step=400"]
    stretched = _run(tmp_path, "stretched", "steps=6", "sds.schedule_steps=400", *written_for_400)
    fixed = _run(tmp_path, "fixed", "steps=6", *written_for_400)
    # Last step (5 of 6): max_step_percent 0.98 -> 0.50 at 5/6 of the way, of 1000 timesteps.
    assert stretched.final["max_step"] == pytest.approx(1000 * (0.98 - 0.48 * 5 / 6), abs=2)
    assert fixed.final["max_step"] > 960
    assert stretched.final["min_step"] < 200 < fixed.final["min_step"]


def test_stretched_schedules_scale_every_step_count():
    from mvdream_platform.sds.config import SDSConfig

    cfg = SDSConfig.from_dict({"steps": 150, "schedule_steps": 400,
                               "guidance": {"anneal_steps": 400}, "shading": {"ambient_only_steps": 300},
                               "optim": {"orient_end_step": 400}, "cameras": {"schedule": [[200, 64, 2]]}})
    short = cfg.scheduled()
    assert (short.guidance.anneal_steps, short.shading.ambient_only_steps, short.optim.orient_end_step) == (150, 112, 150)
    assert short.cameras.schedule == [[75, 64, 2]] and short.schedule_steps == 150
    assert cfg.guidance.anneal_steps == 400  # the original is left alone
    assert SDSConfig.from_dict({"steps": 150, "schedule_steps": None}).scheduled().guidance.anneal_steps == 8000
    with pytest.raises(ValueError, match="schedule_steps"):
        SDSConfig.from_dict({"steps": 150, "schedule_steps": 0}).validate()


def test_the_job_sets_torch_threads_and_says_so(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        _run(tmp_path, "threads", "steps=1", "threads=1", "score=false")
        assert torch.get_num_threads() == 1
        assert "on 1 CPU thread " in capsys.readouterr().out
        with pytest.raises(ValueError, match="threads must be"):
            _run(tmp_path, "bad", "steps=1", "threads=0")
    finally:
        torch.set_num_threads(before)


def test_dreamfusion_baseline_runs_the_same_job(tmp_path):
    record = _run(tmp_path, "df", "guidance_kind=dreamfusion", "steps=2")
    assert record.guidance == "dreamfusion" and record.final["step"] == 2


def test_any_pipeline_folder_runs_through_the_trained_model_group(tmp_path):
    folder = str(Path(__file__).resolve().parents[1] / "checkpoints" / "tiny")
    overrides = [o for o in FAST if o != "model=tiny"] + ["model=trained", f"model.path={folder}"]
    record = import_job("text_to_3d").run(compose("text_to_3d", overrides + [f"out={tmp_path / 'p'}", "steps=1"]))
    assert record.final["step"] == 1


def test_a_path_given_as_the_model_group_fails_with_hydras_list_of_models():
    # no command-line rewriting: model= names a conf/model/ option; folders go in model.path=
    result = run_job("generate.py", "model=checkpoints/tiny", "steps=1")
    assert result.returncode != 0
    assert "Could not find 'model/checkpoints/tiny'" in result.stderr and "trained" in result.stderr


def test_bad_input_is_rejected_by_name(tmp_path):
    job = import_job("text_to_3d")
    with pytest.raises(ValueError, match="prompt"):
        _run(tmp_path, "empty", 'prompt=""', "steps=1")
    with pytest.raises(ValueError, match="guidance"):
        _run(tmp_path, "g", "guidance_kind=sdxl", "steps=1")
    with pytest.raises(ValueError, match="guidance_scale"):
        _run(tmp_path, "s", "guidance_scale=-1", "steps=1")
    with pytest.raises(ValueError, match=r"sds.cameras.*bogus|bogus"):
        job.run(compose("text_to_3d", FAST + [f"out={tmp_path / 'x'}", "+sds.cameras.bogus=1"]))


def test_on_log_reports_every_window_and_without_a_scorer_nothing_is_scored(tmp_path):
    """The library call Serve makes: no scorer, so even a procedural prompt gets no quality."""
    from mvdream_platform.pipelines.loading import build_pipeline
    from mvdream_platform.sds import run_text_to_3d

    job, common = import_job("text_to_3d"), import_job("_common")
    cfg = compose("text_to_3d", FAST + [f"out={tmp_path / 'cb'}", "steps=4"])
    calls = []
    result = run_text_to_3d("a red cube", build_pipeline(common.model_config_from(cfg.model)),
                            job.sds_config_from(cfg), str(tmp_path / "cb"), progress=False,
                            on_log=lambda m, ck: calls.append((m["step"], ck)))
    folder = str(tmp_path / "cb" / "checkpoints")
    assert calls == [(1, None), (2, folder), (3, None), (4, folder)]  # checkpoint_every=2
    assert result.quality is None and result.steps == 4 and result.final_loss == result.final["loss"]
    assert "quality" not in json.loads((tmp_path / "cb" / "metrics.json").read_text())
    assert not (tmp_path / "cb" / "quality.png").exists()
