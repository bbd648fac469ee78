"""MVDreamPipeline: shapes, batching, CFG with cameras, determinism, persistence, bad input."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from mvdream_platform.cameras import get_camera
from mvdream_platform.pipelines import MVDreamPipeline

from conftest import make_tiny_pipeline
from jobs_helpers import ROOT


def _run(pipe, prompt="a red cube", seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("output_type", "np")
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_output_types_group_images_per_prompt(tiny_pipeline):
    prompts = ["a red cube", "a blue sphere"]
    np_out = _run(tiny_pipeline, prompts, num_views=4)
    assert np_out.images.shape == (2, 4, 8, 8, 3) and np_out.images.dtype == np.float32
    assert 0.0 <= np_out.images.min() and np_out.images.max() <= 1.0
    torch.testing.assert_close(np_out.cameras, get_camera(4, elevation=15, azimuth_start=0))
    pt_out = _run(tiny_pipeline, prompts, num_views=4, output_type="pt")
    assert pt_out.images.shape == (2, 4, 3, 8, 8)
    np.testing.assert_allclose(pt_out.images.permute(0, 1, 3, 4, 2).numpy(), np_out.images, atol=1e-6)
    pil_out = _run(tiny_pipeline, prompts, num_views=2, output_type="pil")
    assert len(pil_out.images) == 2 and all(len(group) == 2 for group in pil_out.images)
    assert isinstance(pil_out.images[0][0], PIL.Image.Image) and pil_out.images[0][0].size == (8, 8)


def test_same_seed_same_images_other_seed_other_images(tiny_pipeline):
    a = _run(tiny_pipeline, seed=1).images
    b = _run(tiny_pipeline, seed=1).images
    c = _run(tiny_pipeline, seed=2).images
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_one_batched_forward_per_step_with_the_camera_in_both_branches(tiny_pipeline):
    calls = []

    def record(module, args, kwargs):
        calls.append({"batch": args[0].shape[0], "camera": kwargs["camera"], "frames": kwargs["num_frames"],
                      "context": args[2]})

    handle = tiny_pipeline.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        _run(tiny_pipeline, ["a red cube", "a blue sphere", "a green cone"], num_views=4,
             num_inference_steps=3, guidance_scale=5.0, elevation=20, azimuth_start=30)
        with_cfg = list(calls)
        calls.clear()
        _run(tiny_pipeline, ["a red cube"], num_views=2, num_inference_steps=2, guidance_scale=1.0)
    finally:
        handle.remove()
    assert len(with_cfg) == 3  # one forward per step for every prompt, view and branch
    first = with_cfg[0]
    assert first["batch"] == 2 * 3 * 4 and first["frames"] == 4
    uncond_cam, cond_cam = first["camera"].chunk(2)
    assert torch.equal(uncond_cam, cond_cam)  # same cameras in both CFG branches
    expected = get_camera(4, elevation=20, azimuth_start=30).repeat(3, 1)
    torch.testing.assert_close(cond_cam, expected)
    uncond_ctx, cond_ctx = first["context"].chunk(2)
    assert torch.equal(uncond_ctx[0], uncond_ctx[-1])  # the empty negative prompt everywhere
    assert torch.equal(cond_ctx[0], cond_ctx[3]) and not torch.equal(cond_ctx[0], cond_ctx[4])
    assert len(calls) == 2 and calls[0]["batch"] == 2  # guidance 1: a single branch


def test_guidance_changes_the_result_and_negative_prompts_are_used(tiny_pipeline):
    plain = _run(tiny_pipeline, guidance_scale=1.0).images
    guided = _run(tiny_pipeline, guidance_scale=7.5).images
    negative = _run(tiny_pipeline, guidance_scale=7.5, negative_prompt="a blue sphere").images
    assert np.abs(plain - guided).max() > 1e-3
    assert np.abs(guided - negative).max() > 1e-3


def test_cfg_rescale_changes_the_result_and_importing_the_pipeline_warns_nothing():
    import subprocess
    import sys

    pipe = make_tiny_pipeline()
    plain = _run(pipe, guidance_scale=7.5).images
    rescaled = _run(pipe, guidance_scale=7.5, guidance_rescale=0.7).images
    assert np.abs(plain - rescaled).max() > 1e-4
    # transformers' "requires torchvision" notices come with SD's pipeline module, which is
    # imported only when the rescale is used
    out = subprocess.run([sys.executable, "-c", "from mvdream_platform.pipelines import MVDreamPipeline"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "torchvision" not in out.stderr + out.stdout


def test_pipeline_save_and_load_round_trip(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "pipe")
    weights = sum(f.stat().st_size for f in (tmp_path / "pipe").rglob("*") if f.is_file())
    assert weights < 5e6  # MiniLM's 90 MB come from its package, not the folder
    loaded = MVDreamPipeline.from_pretrained(tmp_path / "pipe")
    assert type(loaded.unet).__name__ == "MultiViewUNet"
    assert np.array_equal(_run(loaded, seed=3).images, _run(tiny_pipeline, seed=3).images)


def test_the_model_folders_recommended_sampling_settings_are_the_defaults_and_the_caller_wins(tmp_path):
    shipped = MVDreamPipeline.from_pretrained(ROOT / "checkpoints" / "tiny")
    assert (shipped.default_guidance_scale, shipped.default_steps) == (2.0, 50)  # checkpoints/README

    pipe = make_tiny_pipeline()
    assert (pipe.default_guidance_scale, pipe.default_steps) == (7.5, 50)  # ModelConfig's defaults
    pipe.recommend(guidance_scale=3.0, steps=3)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = MVDreamPipeline.from_pretrained(tmp_path / "pipe")
    assert (loaded.default_guidance_scale, loaded.default_steps) == (3.0, 3)

    def sample(**kwargs):
        return loaded("a red cube", num_views=2, height=8, width=8, output_type="np",
                      generator=torch.Generator().manual_seed(0), **kwargs).images

    implicit = sample()
    assert np.array_equal(implicit, sample(guidance_scale=3.0, num_inference_steps=3))
    assert not np.array_equal(implicit, sample(guidance_scale=7.5))  # a given value wins
    assert not np.array_equal(implicit, sample(num_inference_steps=4))


def test_any_diffusers_scheduler_can_be_swapped_in():
    pipe = make_tiny_pipeline()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    images = _run(pipe, num_inference_steps=4).images
    assert images.shape == (1, 4, 8, 8, 3) and np.isfinite(images).all()


def test_a_zero_terminal_snr_v_model_samples_from_pure_noise():
    """conf/model/tiny_init.yaml's zero-SNR option: the first DDIM step is t = T - 1 (abar = 0)."""
    from mvdream_platform.pipelines.loading import SD_SCHEDULER, ModelConfig, build_pipeline

    from conftest import tiny_pixel_unet_config

    scheduler = dict(SD_SCHEDULER, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                     prediction_type="v_prediction")
    pipe = build_pipeline(ModelConfig(name="zsnr", source="init", unet=tiny_pixel_unet_config(),
                                      text_encoder={"kind": "minilm", "max_length": 8},
                                      scheduler=scheduler), seed=0)
    images = _run(pipe, num_inference_steps=4).images
    assert int(pipe.scheduler.timesteps[0]) == 999
    assert float(pipe.scheduler.alphas_cumprod[999]) < 1e-9
    assert images.shape == (1, 4, 8, 8, 3) and np.isfinite(images).all()


def test_scheduler_keys_given_for_a_saved_pipeline_replace_its_own(tmp_path):
    """model=tiny +model.scheduler...: a trained eps model becomes a zero-SNR v model to fine-tune;
    without keys the saved scheduler is kept as it is (not SD's defaults)."""
    from mvdream_platform.pipelines.loading import ModelConfig, build_pipeline

    pipe = make_tiny_pipeline()
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, clip_sample=True)
    pipe.save_pretrained(tmp_path / "pipe")
    kept = build_pipeline(ModelConfig(source="pipeline", path=str(tmp_path / "pipe")))
    assert kept.scheduler.config.clip_sample is True
    assert not kept.scheduler.config.rescale_betas_zero_snr
    turned = build_pipeline(ModelConfig(source="pipeline", path=str(tmp_path / "pipe"), scheduler={
        "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}))
    assert turned.scheduler.config.rescale_betas_zero_snr and turned.scheduler.config.clip_sample is True
    assert turned.scheduler.config.prediction_type == "v_prediction"
    assert float(turned.scheduler.alphas_cumprod[-1]) < 1e-9


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_views": 0}, "num_views must be an integer >= 1"),
        ({"guidance_scale": -1.0}, "guidance_scale must be >= 0"),
        ({"height": 9}, "height must be a positive multiple of 2"),
        ({"height": 6.0}, "height must be a positive multiple"),
        ({"width": 0}, "width must be a positive multiple"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"output_type": "jpg"}, "output_type must be one of"),
        ({"prompt": []}, "prompt must be a non-empty"),
        ({"prompt": ["a", "b"], "negative_prompt": ["x"]}, "negative_prompt must be one string"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(tiny_pipeline, kwargs, message):
    prompt = kwargs.pop("prompt", "a red cube")
    with pytest.raises(ValueError, match=message):
        _run(tiny_pipeline, prompt, **kwargs)


@pytest.fixture(scope="module")
def tiny_sd_folder(tmp_path_factory):
    from tiny_models import write_tiny_sd_folder

    return write_tiny_sd_folder(tmp_path_factory.mktemp("sd21"))


def test_inflating_a_stable_diffusion_folder_gives_a_latent_multiview_pipeline(tiny_sd_folder, tmp_path):
    from diffusers import UNet2DConditionModel

    from mvdream_platform.pipelines.loading import ModelConfig, build_pipeline

    config = ModelConfig(name="sd", source="sd", path=str(tiny_sd_folder), codec="latent",
                         text_encoder={"kind": "clip", "hidden_layer": -1})
    pipe = build_pipeline(config)
    assert type(pipe.codec).__name__ == "LatentCodec" and type(pipe.text_encoder).__name__ == "CLIPTextEncoder"
    base = UNet2DConditionModel.from_pretrained(tiny_sd_folder / "unet")
    assert all(torch.equal(v, pipe.unet.unet.state_dict()[k]) for k, v in base.state_dict().items())
    out = _run(pipe, ["a red cat", "a dog"], num_views=4, height=16, width=16)
    assert out.images.shape == (2, 4, 16, 16, 3)
    assert pipe.default_size == 16  # unet sample 8 x VAE factor 2
    with pytest.raises(ValueError, match="multiple of 4"):
        _run(pipe, height=18, width=16)
    pipe.save_pretrained(tmp_path / "mv")
    again = MVDreamPipeline.from_pretrained(tmp_path / "mv")
    assert np.array_equal(_run(again, seed=5, height=16, width=16).images,
                          _run(pipe, seed=5, height=16, width=16).images)


def test_model_config_errors_name_the_field():
    from mvdream_platform.pipelines.loading import ModelConfig, build_pipeline

    with pytest.raises(ValueError, match="model.source must be one of"):
        build_pipeline(ModelConfig(source="hub"))
    with pytest.raises(ValueError, match="model.path is required"):
        build_pipeline(ModelConfig(source="pipeline"))
    with pytest.raises(ValueError, match="cross_attention_dim"):
        build_pipeline(ModelConfig(source="init", unet={"sample_size": 8, "cross_attention_dim": 7}))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        build_pipeline(ModelConfig(source="pipeline", path="./no/such/folder"))


def test_a_fresh_process_loads_a_saved_pipeline(tiny_pipeline, tmp_path):
    """Loading must not depend on other modules of ours having been imported first."""
    import subprocess
    import sys

    tiny_pipeline.save_pretrained(tmp_path / "pipe")
    code = ("from mvdream_platform.pipelines import MVDreamPipeline; "
            f"p = MVDreamPipeline.from_pretrained({str(tmp_path / 'pipe')!r}); "
            "print(type(p.unet).__name__, type(p.text_encoder).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MultiViewUNet MiniLMTextEncoder" in result.stdout
