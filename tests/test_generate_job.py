"""jobs/generate.py end to end: files written, loadable, reproducible, any fsspec target."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import PIL.Image

from mvdream_platform import storage

from jobs_helpers import JOBS, compose, import_job, run_job


def test_generate_job_writes_views_grid_and_record(tmp_path):
    out = tmp_path / "gen"
    result = run_job("generate.py", "model=tiny_init", "prompt=a red cube", "steps=2", "num_views=4", "seed=3", f"out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "UNTRAINED" in result.stderr + result.stdout  # the untrained default says so
    # the first line comes before torch/diffusers are imported (they take a minute on a busy machine)
    assert result.stderr.splitlines()[0].startswith("generate: started ")
    # advice that says nothing to our users is silenced at the source (component_io.loading_defaults)
    assert "accelerate" not in result.stderr and "torchvision" not in result.stderr
    record = json.loads((out / "generation.json").read_text())
    assert record["request"]["prompts"] == ["a red cube"] and record["image_shape"] == [1, 4, 32, 32, 3]
    assert len(record["cameras"]) == 4 and len(record["cameras"][0]) == 16
    views = [np.asarray(PIL.Image.open(out / f"prompt_000/view_{j:02d}.png")) for j in range(4)]
    assert all(v.shape == (32, 32, 3) for v in views)
    grid = np.asarray(PIL.Image.open(out / "grid.png"))
    assert grid.shape == (32, 128, 3)
    assert np.array_equal(grid[:, 32:64], views[1])  # the grid is the views side by side
    assert "prompt: a red cube" in (out / "config.yaml").read_text()


def test_generate_in_bfloat16_casts_quietly(tmp_path):
    out = tmp_path / "gen"
    result = run_job("generate.py", "model=tiny_init", "model.dtype=bfloat16", "prompt=a red cube",
                     "steps=2", "num_views=2", f"out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    # diffusers' dtype cast warns about float32 modules that none of ours has (loading.cast_components)
    assert "kept in float32" not in result.stderr
    assert json.loads((out / "generation.json").read_text())["image_shape"] == [1, 2, 32, 32, 3]


def test_generate_same_seed_same_pngs_and_memory_uri():
    job = import_job("generate")
    records = []
    for target in ("memory://gen-a", "memory://gen-b"):
        cfg = compose("generate", ["steps=2", "num_views=2", "seed=7", f"out={target}",
                                   "prompt=[a red cube,a blue sphere]"])
        records.append(job.run(cfg))
    assert records[0]["image_shape"] == [2, 2, 32, 32, 3]
    fs = fsspec.filesystem("memory")
    for name in records[0]["files"]:
        assert storage.read_bytes(f"memory://gen-a/{name}") == storage.read_bytes(f"memory://gen-b/{name}")
    assert fs.exists("/gen-a/prompt_001/view_01.png") and fs.exists("/gen-a/config.yaml")


def test_generate_with_inflated_sd_folder_and_with_a_pipeline_behind_an_fsspec_uri(tmp_path):
    from mvdream_platform.pipelines.loading import ModelConfig, build_pipeline

    from tiny_models import write_tiny_sd_folder

    job = import_job("generate")
    sd = write_tiny_sd_folder(tmp_path / "sd21")
    record = job.run(compose("generate", [
        "model=sd21_base", f"model.path={sd}", "steps=2", "num_views=4", "prompt=a red cat",
        f"out={tmp_path / 'inflated'}"]))
    assert record["image_shape"] == [1, 4, 16, 16, 3] and record["model"]["source"] == "sd"

    # A saved pipeline uploaded to an object store loads through its URI.

    pipe = build_pipeline(ModelConfig(name="sd", source="sd", path=str(sd), codec="latent",
                                      text_encoder={"kind": "clip"}))
    pipe.save_pretrained(tmp_path / "saved")
    storage.put_dir(tmp_path / "saved", "memory://models/mv-sd")
    from_uri = job.run(compose("generate", [
        "model=mvdream_official", "model.path=memory://models/mv-sd", "steps=2", "num_views=4",
        "prompt=a red cat", f"out={tmp_path / 'from_uri'}"]))
    assert from_uri["image_shape"] == [1, 4, 16, 16, 3]
    # same weights, same seed: the URI-loaded pipeline reproduces the folder-built one
    a = PIL.Image.open(tmp_path / "inflated" / "grid.png")
    b = PIL.Image.open(tmp_path / "from_uri" / "grid.png")
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_unknown_model_paths_and_keys_fail_clearly(tmp_path):
    import pytest

    job = import_job("generate")
    with pytest.raises(FileNotFoundError, match="hub id"):
        job.run(compose("generate", ["model=sd21_base", "model.path=nobody/no-such-model",
                                     f"out={tmp_path}"]))
    with pytest.raises(ValueError, match=r"unknown model keys \[.colour.\]; allowed"):
        job.run(compose("generate", ["+model.colour=red", f"out={tmp_path}"]))
    with pytest.raises(Exception, match="model.path"):
        job.run(compose("generate", ["model=sd21_base", f"out={tmp_path}"]))  # path: ??? missing


def test_the_default_model_is_the_shipped_trained_checkpoint(tmp_path):
    result = run_job("generate.py", "prompt=a red sphere", "steps=2", "num_views=4", f"out={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "UNTRAINED" not in result.stdout + result.stderr
    record = json.loads((tmp_path / "generation.json").read_text())
    assert record["model"] == {"name": "tiny", "source": "pipeline", "path": "checkpoints/tiny",
                               "trained": True, "device": "cpu"}
    assert record["request"]["guidance_scale"] == 2.0  # the tiny model's measured best


def test_words_the_embedded_default_never_read_get_one_warning_line(caplog):
    from mvdream_platform.data.shapes import unknown_words

    assert unknown_words("a tall red cube to the left of a blue sphere") == []
    assert unknown_words("a cube with a yellow front on top of a flat torus") == []
    assert unknown_words("A corgi, 3D asset; a corgi!") == ["corgi", "3d", "asset"]

    job = import_job("generate")
    cfg = compose("generate", ["steps=1", "num_views=1", "out=memory://gen-vocab", "prompt=[a red cube,a corgi]"])
    with caplog.at_level("WARNING"):
        job.run(cfg)
    lines = [r.getMessage() for r in caplog.records if "never read" in r.getMessage()]
    assert len(lines) == 1 and "'corgi'" in lines[0] and "'a corgi'" in lines[0]
    caplog.clear()
    with caplog.at_level("WARNING"):  # real weights (no closed vocabulary) are never warned about
        job.run(compose("generate", ["steps=1", "num_views=1", "out=memory://gen-vocab2", "prompt=a corgi",
                                     "model.vocabulary=null"]))
    assert not [r for r in caplog.records if "never read" in r.getMessage()]


def test_only_a_job_run_as_a_script_prints_the_start_line(capsys):
    import_job("generate")  # as tests, Ray workers and Tune trials import jobs: silent
    assert import_job("_starting").announce() is None
    assert "started" not in capsys.readouterr().err
    for script in ("text_to_3d.py", "train.py", "serve.py", "tune_sds.py", "convert_official.py",
                   "dreambooth.py", "evaluate.py", "prepare_data.py"):
        first = next(line for line in (JOBS / script).read_text().splitlines()
                     if line.startswith(("import ", "from ")) and "__future__" not in line)
        assert first.startswith("import _starting"), script  # before any heavy import
