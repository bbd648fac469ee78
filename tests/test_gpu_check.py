"""benchmarks/gpu_check.py's CPU smoke mode: every part of the GPU check runs its real code path
(an SD-2.1-layout model at a tenth of the width, 64 px), so the device minutes are not spent on
plumbing errors. Speeds here mean nothing; shapes, counts and the JSON do."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import shutdown_ray

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return gpu_check.write_sd_folder(tmp_path_factory.mktemp("gpu-check") / "sd", gpu_check.SMOKE)


def test_sd_folder_loads_as_an_sd21_shaped_multiview_pipeline(sd_folder):
    from mvdream_platform.pipelines.loading import ModelConfig, build_pipeline

    pipe = build_pipeline(ModelConfig(**gpu_check.model_values(sd_folder)))
    unet = pipe.unet.config["unet_config"]
    assert tuple(unet["block_out_channels"]) == gpu_check.SMOKE["unet_channels"]
    assert tuple(unet["down_block_types"]) == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert pipe.codec.downscale_factor == 8 and pipe.default_size == 64
    assert pipe.text_encoder.max_length == 77 and pipe.text_encoder.dim == gpu_check.SMOKE["text_dim"]
    assert gpu_check.FULL["unet_channels"] == (320, 640, 1280, 1280)  # SD 2.1-base's


@pytest.fixture(scope="module")
def first_call(sd_folder, tmp_path_factory) -> tuple[dict, Path]:
    """The device's first call: the parts that need no Ray."""
    out = tmp_path_factory.mktemp("gpu-check-out") / "gpu.json"
    record = gpu_check.main(["--smoke", "--parts", "train", "sds", "--model", str(sd_folder),
                             "--out", str(out)])
    return record, out


def test_train_and_sds_parts_measure_and_write_json(first_call):
    record, out = first_call
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    train = record["parts"]["train"]
    assert train["resolution"] == 64 and not train["bf16_autocast"]
    runs = train["runs"]
    assert [(r["gradient_checkpointing"], r["objects"]) for r in runs] == [
        (False, 1), (False, 2), (True, 1), (True, 2)]
    for r in runs:
        assert r["images"] == 4 * r["objects"] and r["images_per_s"] > 0
        assert r["step_s"] == pytest.approx(r["encode_s"] + r["unet_s"] + r["optimizer_s"], abs=1e-4)
    # FLOPs per image and phase (matrix products and convolutions: AdamW counts none). No peak
    # for a CPU, so no MFU.
    flops = train["flops_per_image"]
    assert flops["unet"] > 0 and flops["encode"] > 0 and flops["optimizer"] == 0
    assert "mfu_unet" not in train["best"] and train["peak_bf16_flops"] is None
    sds = record["parts"]["sds"]
    assert [s["stage"] for s in sds["stages"]] == ["64px_albedo", "256px_lit"]
    assert all(s["total"] > 0 and s["unet"] > 0 for s in sds["stages"])
    expected = sum(s["total"] * s["reference_steps"] for s in sds["stages"]) / 60
    assert sds["projected_10k_steps_min"] == pytest.approx(expected, abs=0.1)


def test_ray_train_and_serve_parts_run_the_real_job_and_endpoint(sd_folder, first_call, tmp_path):
    """The device's second call: compared with the first call's plain loop, not measured again."""
    train = first_call[0]["parts"]["train"]
    try:
        record = gpu_check.main(["--smoke", "--parts", "ray_train", "serve", "--model", str(sd_folder),
                                 "--train-json", str(first_call[1]), "--work", str(tmp_path),
                                 "--out", str(tmp_path / "gpu.json")])
    finally:
        shutdown_ray()
    assert "train" not in record["parts"]
    job = record["parts"]["ray_train"]
    assert job["images_per_s"] > 0
    assert job["objects"] == train["best"]["objects"]
    assert job["plain_images_per_s"] == train["best"]["images_per_s"]
    assert job["ray_over_plain"] == pytest.approx(job["images_per_s"] / job["plain_images_per_s"], abs=1e-3)
    assert (tmp_path / "runs" / "gpu-check" / "pipeline").is_dir()  # the job finished and exported
    serve = record["parts"]["serve"]
    assert set(serve["runs"]) == {"1", "2"}
    assert serve["runs"]["1"]["mean_batch_size"] == 1
    # two clients against max_batch_size=2: the batcher serves them together, not one by one
    assert serve["runs"]["2"]["mean_batch_size"] > 1
    assert serve["throughput_2_over_1"] > 0


def test_peak_override_and_cpu_refusal(capsys):
    assert gpu_check.peak_flops(torch.device("cpu"), None) is None
    assert gpu_check.peak_flops(torch.device("cpu"), 100.0) == 100e12
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the full check")
    with pytest.raises(SystemExit):
        gpu_check.main(["--parts", "train"])
    assert "--smoke" in capsys.readouterr().err
