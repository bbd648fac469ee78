"""jobs/train.py on a real local Ray cluster: 2 workers, checkpoints, resume, a killed worker."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from mvdream_platform.pipelines import MVDreamPipeline

from conftest import shutdown_ray
from jobs_helpers import compose, import_job, prepare_training_data

TINY = [
    "model=tiny_init", "data=shapes", "cluster=local_cpu", "logger=disabled",
    "data.resolution=16", "data.multiview_batch=2", "data.image_batch=4", "data.num_workers=0",
    "trainer.warmup_steps=2", "trainer.log_every=1", "trainer.lr=1e-3",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return prepare_training_data(tmp_path_factory.mktemp("train-data"))


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    shutdown_ray()


def _train(data, tmp_path, *overrides):
    job = import_job("train")
    return job.run(compose("train", TINY + [f"data.uri={data['mv']}", f"data.image_uri={data['2d']}",
                                            f"run.storage_path={tmp_path / 'runs'}", *overrides]))


def _logged_steps(run: Path) -> list[int]:
    lines = (run / "tracking" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def test_two_workers_train_checkpoint_resume_and_export(data, tmp_path, ray_cluster):
    summary = _train(data, tmp_path, "trainer.max_steps=4", "trainer.checkpoint_every=2", "run.name=r1",
                     "samples.every=3", "samples.steps=2", "samples.num_captions=2")
    run = tmp_path / "runs" / "r1"
    metrics = summary["metrics"]
    assert metrics["step"] == 4
    assert metrics["loss"] > 0 and metrics["images_per_s"] > 0
    assert 0 < metrics["samples_per_s"] <= metrics["images_per_s"]
    # The step-time breakdown; with 2 workers the gradient all-reduce is timed too.
    for phase in ("data", "forward", "backward", "optimizer", "allreduce"):
        assert metrics[f"{phase}_time_s"] > 0, phase
    assert metrics["forward_time_s"] + metrics["backward_time_s"] < metrics["step_time_s"]

    # Sample grids (2 held-out captions x 4 views of 16 px) at step 3 and at the last step.
    from PIL import Image

    grids = sorted(p.name for p in (run / "tracking" / "media").glob("samples_*.png"))
    assert grids == ["samples_3.png", "samples_4.png"]
    assert np.asarray(Image.open(run / "tracking" / "media" / "samples_4.png")).shape == (32, 64, 3)
    checkpoints = sorted(c for c in run.glob("checkpoint_*") if c.is_dir())
    assert len(checkpoints) in (1, 2) and all((c / "COMPLETE").is_file() for c in checkpoints)
    assert _logged_steps(run) == [1, 2, 3, 4]

    # The final model is a pipeline folder that generation loads.
    pipe = MVDreamPipeline.from_pretrained(run / "pipeline")
    images = pipe("a red cube", num_views=4, num_inference_steps=2, height=16, width=16,
                  output_type="np").images
    assert images.shape == (1, 4, 16, 16, 3)

    # Same run name, more steps: resumes at step 4 instead of starting over.
    resumed = _train(data, tmp_path, "trainer.max_steps=6", "trainer.checkpoint_every=2", "run.name=r1")
    assert resumed["metrics"]["step"] == 6
    assert _logged_steps(run) == [1, 2, 3, 4, 5, 6]


def test_a_killed_worker_is_survived_and_the_run_ends_at_the_right_step(data, tmp_path, ray_cluster):
    summary = _train(data, tmp_path, "trainer.max_steps=5", "trainer.checkpoint_every=2",
                     "run.name=crash", "crash_at_step=3", "run.max_failures=2")
    run = tmp_path / "runs" / "crash"
    assert (run / ".crash_injected").read_text() == "3"  # a worker really was SIGKILLed at step 3
    assert summary["metrics"]["step"] == 5
    steps = _logged_steps(run)
    # steps 1..3 (maybe 4) ran, then the worker group restarted from the step-2 checkpoint
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[:3] == [1, 2, 3]
    assert steps[restart:] == [3, 4, 5]


def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one(data, tmp_path, ray_cluster):
    _train(data, tmp_path, "trainer.max_steps=4", "trainer.checkpoint_every=2", "run.name=damaged")
    run = tmp_path / "runs" / "damaged"
    checkpoints = sorted(c for c in run.glob("checkpoint_*") if c.is_dir())
    assert [int((c / "COMPLETE").read_text()) for c in checkpoints] == [2, 4]
    weights = checkpoints[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # the newest checkpoint, truncated
    resumed = _train(data, tmp_path, "trainer.max_steps=6", "trainer.checkpoint_every=2", "run.name=damaged",
                     "run.max_failures=0")  # no retry needed: the fallback happens in the first try
    assert resumed["metrics"]["step"] == 6
    assert _logged_steps(run) == [1, 2, 3, 4, 3, 4, 5, 6]  # steps 3 and 4 again, from step 2's state


def _logged(run: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (run / "tracking" / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_trains_like_ddp_resumes_and_takes_over_a_ddp_run(data, tmp_path, ray_cluster):
    from safetensors.torch import load_file

    common = ["trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.ema_decay=0.9",
              "samples.every=3", "samples.steps=2", "samples.num_captions=2"]
    _train(data, tmp_path, *common, "run.name=ddp")
    _train(data, tmp_path, *common, "run.name=fsdp", "cluster.parallel_strategy=fsdp")
    runs = tmp_path / "runs"
    assert _logged(runs / "fsdp", "loss") == pytest.approx(_logged(runs / "ddp", "loss"), rel=1e-4)
    assert "allreduce_time_s" not in json.loads((runs / "fsdp" / "tracking" / "metrics.jsonl").read_text()
                                                .splitlines()[-1])  # not timed under FSDP, not a fake 0
    # the exported pipelines (EMA weights, gathered from the shards) agree
    weights = {name: load_file(runs / name / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
               for name in ("ddp", "fsdp")}
    assert weights["fsdp"].keys() == weights["ddp"].keys()
    for key, value in weights["ddp"].items():
        assert np.allclose(weights["fsdp"][key].numpy(), value.numpy(), atol=1e-4), key
    # sample grids under FSDP: every rank gathers, rank 0 draws
    assert sorted(p.name for p in (runs / "fsdp" / "tracking" / "media").glob("samples_*.png")) == [
        "samples_3.png", "samples_4.png"]
    # an FSDP run resumes; a DDP run continues under FSDP
    _train(data, tmp_path, *common, "trainer.max_steps=6", "run.name=fsdp", "cluster.parallel_strategy=fsdp")
    assert _logged_steps(runs / "fsdp") == [1, 2, 3, 4, 5, 6]
    _train(data, tmp_path, *common, "trainer.max_steps=6", "run.name=ddp", "cluster.parallel_strategy=fsdp")
    assert _logged_steps(runs / "ddp") == [1, 2, 3, 4, 5, 6]
    assert _logged(runs / "ddp", "loss")[4:] == pytest.approx(_logged(runs / "fsdp", "loss")[4:], rel=1e-4)


def test_a_saved_v_model_is_fine_tuned_as_a_v_model_unless_told_otherwise(data, tmp_path, ray_cluster):
    """trainer.prediction_type unset = the model's own: fine-tuning a v pipeline (e.g. a
    zero-SNR default) must not silently retrain it as an eps model."""
    _train(data, tmp_path, "trainer.max_steps=2", "trainer.checkpoint_every=2", "run.name=v0",
           "trainer.prediction_type=v_prediction")
    saved = tmp_path / "runs" / "v0" / "pipeline"
    assert MVDreamPipeline.from_pretrained(saved).scheduler.config.prediction_type == "v_prediction"
    job = import_job("train")
    again = [o for o in TINY if o != "model=tiny_init"] + [
        "model=trained", f"model.path={saved}", f"data.uri={data['mv']}", f"data.image_uri={data['2d']}",
        f"run.storage_path={tmp_path / 'runs'}", "trainer.max_steps=2", "trainer.checkpoint_every=2",
        "trainer.timestep_bias_range=[800,1000]", "trainer.timestep_bias_multiplier=4"]
    job.run(compose("train", again + ["run.name=v1"]))
    assert MVDreamPipeline.from_pretrained(tmp_path / "runs" / "v1" / "pipeline").scheduler.config.prediction_type \
        == "v_prediction"
    job.run(compose("train", again + ["run.name=e1", "trainer.prediction_type=epsilon"]))
    assert MVDreamPipeline.from_pretrained(tmp_path / "runs" / "e1" / "pipeline").scheduler.config.prediction_type \
        == "epsilon"


def test_missing_data_fails_before_the_cluster_starts(data, tmp_path):
    job = import_job("train")
    with pytest.raises(ValueError, match="training data: no readable text-image rows"):
        job.run(compose("train", TINY + [f"data.uri={data['mv']}", f"data.image_uri={tmp_path / 'nothing'}",
                                         f"run.storage_path={tmp_path / 'runs'}", "run.name=nodata"]))
    assert not list((tmp_path / "runs" / "nodata").glob("checkpoint_*"))


def test_bad_training_config_is_rejected_by_name(tmp_path):
    job = import_job("train")
    with pytest.raises(ValueError, match="trainer.prediction_type"):
        job.run(compose("train", TINY + ["data.uri=x", "trainer.prediction_type=x0",
                                         f"run.storage_path={tmp_path}"]))
    with pytest.raises(ValueError, match="zero-terminal-SNR .* needs prediction_type v_prediction"):
        job.run(compose("train", TINY + ["data.uri=x", "model.scheduler.rescale_betas_zero_snr=true",
                                         f"run.storage_path={tmp_path}"]))
    with pytest.raises(ValueError, match=r"timestep_bias_range \[900, 1200\] reaches past the model's 1000"):
        job.run(compose("train", TINY + [f"data.uri={tmp_path}", "trainer.timestep_bias_range=[900,1200]",
                                         "trainer.timestep_bias_multiplier=2", f"run.storage_path={tmp_path}"]))
    with pytest.raises(ValueError, match="data.background: .* got 'pink'"):
        job.run(compose("train", TINY + ["data.uri=x", "data.background=pink",
                                         f"run.storage_path={tmp_path}"]))
    with pytest.raises(ValueError, match="data.p_multiview"):
        job.run(compose("train", TINY + ["data.uri=x", "data.p_multiview=1.5",
                                         f"run.storage_path={tmp_path}"]))
    with pytest.raises(ValueError, match="cluster.parallel_strategy must be one of"):
        job.run(compose("train", TINY + ["data.uri=x", "cluster.parallel_strategy=zero3",
                                         f"run.storage_path={tmp_path}"]))
    with pytest.raises(ValueError, match="preservation_weight > 0 .* not supported with cluster.parallel_strategy=fsdp"):
        job.run(compose("train", TINY + ["data.uri=x", "cluster.parallel_strategy=fsdp",
                                         "trainer.preservation_weight=1", f"run.storage_path={tmp_path}"]))


def test_the_training_loader_composites_the_renders_over_data_background(data):
    """``data.background`` reaches the multi-view items: one random grey per object by default
    (MVDream's), the same fixed level everywhere when set."""
    from omegaconf import OmegaConf

    from mvdream_platform.training.config import TrainJobConfig
    from mvdream_platform.training.loop import make_loader

    def corners(*overrides):  # (objects,) top-left pixel of each object's first view, red channel
        cfg = compose("train", TINY + [f"data.uri={data['mv']}", "data.image_uri=null",
                                       "data.p_multiview=1.0", *overrides])
        job = TrainJobConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))
        batches = list(itertools.islice(make_loader(job, rank=0, world=1, start_micro_step=0), 3))
        assert [b.kind for b in batches] == ["multiview"] * 3
        return np.concatenate([b.images[::4, 0, 0, 0].numpy() for b in batches])

    random = corners()
    assert len(np.unique(random.round(4))) == len(random)  # a grey of its own per object
    np.testing.assert_allclose(corners("data.background=grey"), 0.0, atol=1e-6)  # 0.5 -> 0 in [-1, 1]
    np.testing.assert_allclose(corners("data.background=0.25"), -0.5, atol=1e-6)


def test_relative_local_paths_are_made_absolute_for_the_workers(tmp_path, monkeypatch):
    from mvdream_platform.pipelines.loading import ModelConfig
    from mvdream_platform.training.config import DataConfig, RunSettings, TrainJobConfig
    from mvdream_platform.training.trainer import absolute_local_paths

    monkeypatch.chdir(tmp_path)
    cfg = TrainJobConfig(model=ModelConfig(source="pipeline", path="checkpoints/tiny"),
                         data=DataConfig(uri="data/mv", image_uri="memory://2d"),
                         run=RunSettings(storage_path="outputs/runs"))
    absolute_local_paths(cfg)
    assert cfg.data.uri == str(tmp_path / "data" / "mv")
    assert cfg.data.image_uri == "memory://2d"  # URIs are left alone
    assert cfg.run.storage_path == str(tmp_path / "outputs" / "runs")


def test_a_checkpoint_exports_to_a_loadable_pipeline(tmp_path):
    import torch

    from mvdream_platform.pipelines.loading import ModelConfig, build_pipeline
    from mvdream_platform.training.checkpointing import save_training_state
    from mvdream_platform.training.export import export_checkpoint
    from mvdream_platform.training.optim import EMA, build_lr_scheduler, build_optimizer

    from conftest import tiny_pixel_unet_config

    config = ModelConfig(name="t", source="init", unet=tiny_pixel_unet_config(),
                         text_encoder={"kind": "minilm", "max_length": 8})
    unet = build_pipeline(config, seed=1).unet
    ema = EMA(unet, decay=0.5)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.1)
    ema.update(unet)  # shadow now differs from the live weights
    optimizer = build_optimizer(unet, lr=1e-3)
    save_training_state(tmp_path / "ckpt", model=unet, optimizer=optimizer,
                        lr_scheduler=build_lr_scheduler(optimizer), step=7, ema=ema)
    for use_ema in (False, True):
        out = export_checkpoint(tmp_path / "ckpt", config, str(tmp_path / f"pipe-{use_ema}"),
                                use_ema=use_ema)
        loaded = MVDreamPipeline.from_pretrained(out).unet
        expected = ema.state_dict()["shadow"] if use_ema else unet.state_dict()
        name = "unet.conv_in.weight"
        assert torch.allclose(loaded.state_dict()[name], expected[name].to(torch.float32))
    (tmp_path / "ckpt" / "COMPLETE").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        export_checkpoint(tmp_path / "ckpt", config, str(tmp_path / "never"))
