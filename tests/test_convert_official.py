"""Official MVDream checkpoint conversion: numerical parity, strictness, outputs, CLI.

CI compares against ``official_reference.py`` (our own re-implementation with the official
layout). With ``MVDREAM_OFFICIAL_REPO=<checkout of bytedance/MVDream>`` the tests at the end
also build the real official modules and check both the conversion and the reference against
them (needs ``einops``; the official package ``__init__`` is bypassed, it imports open_clip).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mvdream_platform.models import MultiViewUNet
from mvdream_platform.models.convert_official import (
    ConversionError,
    StateDictMismatchError,
    UnsupportedConfigError,
    convert_unet,
    convert_vae,
    parse_unet_params,
    unet_config_from_official,
    vae_config_from_official,
)
from mvdream_platform.pipelines.convert_official import convert_checkpoint

from official_reference import (
    OfficialLayoutUNet,
    OfficialLayoutVAE,
    randomize_,
    relative_error,
)

TOLERANCE = 1e-4  # max relative error allowed against the official model
REPO_ROOT = Path(__file__).resolve().parents[1]

# SD 2.x style: fixed head width, linear projections; level 2 has no attention (as SD's last).
SD2_TINY = dict(
    image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 1],
    num_res_blocks=2, channel_mult=[1, 2, 2], num_head_channels=16, use_spatial_transformer=True,
    use_linear_in_transformer=True, transformer_depth=1, context_dim=24, use_checkpoint=False,
    legacy=False, camera_dim=16,
)
# SD 1.x style: fixed head count, 1x1-conv projections; plus per-level block counts, FiLM
# conditioning and attention only on the deeper levels, to exercise the index arithmetic.
SD1_TINY = dict(
    image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2],
    num_res_blocks=[1, 2, 1], channel_mult=[1, 2, 2], num_heads=2, use_spatial_transformer=True,
    transformer_depth=1, context_dim=20, use_checkpoint=False, legacy=False, camera_dim=16,
    use_scale_shift_norm=True,
)
# Deeper transformers and no camera (the official code cannot run depth 2 with one context,
# so this one is checked against the reference only).
DEEP_NO_CAMERA = dict(SD1_TINY, transformer_depth=2, legacy=True, camera_dim=None,
                      use_scale_shift_norm=False, attention_resolutions=[1, 2, 4])
VAE_TINY = dict(
    embed_dim=4, lossconfig={"target": "torch.nn.Identity"},
    ddconfig=dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32,
                  ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0),
)
# The released models' UNet hyper-parameters (configs/sd-v2-base.yaml, configs/sd-v1.yaml).
SD2_FULL = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320,
    attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
    num_head_channels=64, use_spatial_transformer=True, use_linear_in_transformer=True,
    transformer_depth=1, context_dim=1024, use_checkpoint=False, legacy=False, camera_dim=16,
)
SD1_FULL = dict(SD2_FULL, context_dim=768, use_linear_in_transformer=False, num_heads=8)
del SD1_FULL["num_head_channels"]


def official_config(unet_params: dict, with_vae: bool = True) -> dict:
    """A config in the official YAML layout around the given UNet params."""
    params = {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
        "parameterization": "eps",
        "unet_config": {
            "target": "mvdream.ldm.modules.diffusionmodules.openaimodel.MultiViewUNetModel",
            "params": unet_params,
        },
    }
    if with_vae:
        params["first_stage_config"] = {
            "target": "mvdream.ldm.models.autoencoder.AutoencoderKL", "params": VAE_TINY,
        }
    return {"model": {"target": "mvdream.ldm.interface.LatentDiffusionInterface",
                      "params": params}}


def reference_unet(params: dict, seed: int = 0) -> OfficialLayoutUNet:
    return randomize_(OfficialLayoutUNet(**params), seed).eval()


def unet_inputs(params: dict, num_frames: int, with_camera: bool, seed: int = 0):
    """Two objects of ``num_frames`` views: x (2F, 4, 8, 8), t (2F,), text (2F, 5, D), camera."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * num_frames
    x = torch.randn(n, params["in_channels"], 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    text = torch.randn(n, 5, params["context_dim"], generator=g)
    camera = torch.randn(n, params["camera_dim"], generator=g) if with_camera else None
    return x, t, text, camera


def parity_cases(params: dict) -> list[tuple[int, bool]]:
    cameras = (False, True) if params.get("camera_dim") else (False,)
    return [(f, c) for f in (1, 4) for c in cameras]


@torch.no_grad()
def unet_errors(ours: MultiViewUNet, official: torch.nn.Module, params: dict) -> dict:
    """Max relative error of ours vs an official-signature model, per (num_frames, camera)."""
    errors = {}
    for num_frames, with_camera in parity_cases(params):
        x, t, text, camera = unet_inputs(params, num_frames, with_camera, seed=num_frames)
        expected = official(x, t, text, camera=camera, num_frames=num_frames)
        got = ours(x, t, text, camera=camera, num_frames=num_frames).sample
        errors[(num_frames, with_camera)] = relative_error(got, expected)
    return errors


def full_checkpoint(params: dict, seed: int = 0, with_vae: bool = True) -> dict:
    """A whole official-style checkpoint: UNet, VAE, a text-encoder stand-in, buffers."""
    state = {f"model.diffusion_model.{k}": v for k, v in reference_unet(params, seed).state_dict().items()}
    if with_vae:
        vae = randomize_(OfficialLayoutVAE(**VAE_TINY), seed + 1)
        state.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    state["cond_stage_model.model.token_embedding.weight"] = torch.randn(10, 8)
    state["betas"] = torch.linspace(1e-4, 2e-2, 1000)
    return state


def write_inputs(tmp_path: Path, state: dict, config: dict, fmt: str = "pt") -> tuple[Path, Path]:
    ckpt = tmp_path / f"model.{fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt))
    else:
        torch.save({"state_dict": state, "global_step": 7}, ckpt)  # nested, Lightning style
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return ckpt, cfg


def load_cli():
    from jobs_helpers import import_job

    return import_job("convert_official")


# ---------------------------------------------------------------------------------------------
# Parity with the official architecture (reference implementation)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [SD2_TINY, SD1_TINY, DEEP_NO_CAMERA], ids=["sd2", "sd1", "deep"])
def test_converted_unet_matches_official_layout_model(params):
    reference = reference_unet(params)
    ours = convert_unet(reference.state_dict(), parse_unet_params(params))
    errors = unet_errors(ours, reference, params)
    assert max(errors.values()) < TOLERANCE, errors


def test_views_interact_only_through_self_attention():
    # Guards the test itself: with F=4 the views must influence each other, else the F=4
    # comparison would not exercise the 3D attention at all.
    reference = reference_unet(SD2_TINY)
    x, t, text, camera = unet_inputs(SD2_TINY, 4, True)
    with torch.no_grad():
        joint = reference(x, t, text, camera=camera, num_frames=4)
        separate = reference(x, t, text, camera=camera, num_frames=1)
    assert relative_error(joint, separate) > 1e-2


@pytest.mark.parametrize(
    "params, heads, params_millions",
    [(SD2_FULL, (5, 10, 20, 20), (860, 880)), (SD1_FULL, (8, 8, 8, 8), (850, 870))],
    ids=["sd-v2-base", "sd-v1"],
)
def test_released_configs_map_every_key(params, heads, params_millions):
    # Full size on the meta device: checks key coverage and shapes without allocating.
    with torch.device("meta"):
        reference = OfficialLayoutUNet(**params)
    spec = parse_unet_params(params)
    config = unet_config_from_official(spec)
    assert config["attention_head_dim"] == heads
    assert config["down_block_types"] == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    ours = convert_unet(reference.state_dict(), spec)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert params_millions[0] * 1e6 < count < params_millions[1] * 1e6


@torch.no_grad()
def test_converted_vae_matches_official_layout_model():
    reference = randomize_(OfficialLayoutVAE(**VAE_TINY), 1).eval()
    config = vae_config_from_official(official_config(SD2_TINY))
    assert config["scaling_factor"] == 0.18215
    vae = convert_vae(reference.state_dict(), config)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert relative_error(vae.encode(x).latent_dist.mean, reference.encode(x)) < TOLERANCE
    assert relative_error(vae.decode(z).sample, reference.decode(z)) < TOLERANCE


# ---------------------------------------------------------------------------------------------
# Strictness
# ---------------------------------------------------------------------------------------------


def _break_missing(state):
    del state["middle_block.1.transformer_blocks.0.attn1.to_k.weight"]
    return "middle_block.1.transformer_blocks.0.attn1.to_k.weight"


def _break_extra(state):
    state["output_blocks.2.9.weight"] = torch.zeros(3)
    return "output_blocks.2.9.weight"


def _break_shape(state):
    key = "input_blocks.4.0.skip_connection.weight"
    state[key] = state[key][:, :16]
    return key


@pytest.mark.parametrize("breaker, attribute", [(_break_missing, "missing"),
                                               (_break_extra, "unmapped"),
                                               (_break_shape, "misshaped")])
def test_key_problems_are_refused_naming_the_key(breaker, attribute):
    state = reference_unet(SD2_TINY).state_dict()
    key = breaker(state)
    with pytest.raises(StateDictMismatchError, match=re.escape(key)) as info:
        convert_unet(state, parse_unet_params(SD2_TINY))
    assert isinstance(info.value, ValueError)
    found = getattr(info.value, attribute)
    assert key in (found if attribute != "misshaped" else [k for k, _, _ in found])


def test_vae_key_problems_are_refused():
    state = randomize_(OfficialLayoutVAE(**VAE_TINY)).state_dict()
    state["encoder.extra.weight"] = torch.zeros(2)
    config = vae_config_from_official(official_config(SD2_TINY))
    with pytest.raises(StateDictMismatchError, match="encoder.extra.weight"):
        convert_vae(state, config)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"resblock_updown": True}, "resblock_updown"),
        ({"use_spatial_transformer": False}, "use_spatial_transformer"),
        ({"num_head_channels": 24}, "level 0 has width 32"),  # 1 head of 24 != 32 channels
        ({"model_channels": 40}, "divisible by 32"),
        ({"num_res_blocks": [1, 2]}, "num_res_blocks"),
        ({"context_dmi": 24}, "unknown fields"),
        ({"num_classes": 10}, "num_classes"),
    ],
)
def test_unsupported_configs_are_refused(overrides, field):
    params = dict(SD2_TINY, **overrides)
    with pytest.raises(UnsupportedConfigError, match=re.escape(field)):
        parse_unet_params(params)


def test_legacy_flag_recomputes_head_width():
    # 32 channels with 24-wide heads: 1 head; legacy widens it to 32, which diffusers can hold.
    spec = parse_unet_params(dict(SD2_TINY, num_head_channels=24, legacy=True,
                                  channel_mult=[1, 1], attention_resolutions=[1]))
    assert spec.heads == (1, 1)


# ---------------------------------------------------------------------------------------------
# Whole conversion, outputs and CLI
# ---------------------------------------------------------------------------------------------


def test_convert_checkpoint_writes_loadable_folders(tmp_path):
    from diffusers import AutoencoderKL

    ckpt, cfg = write_inputs(tmp_path, full_checkpoint(SD2_TINY), official_config(SD2_TINY))
    out = tmp_path / "converted"
    result = convert_checkpoint(ckpt, cfg, out)

    assert sorted(p.name for p in out.iterdir()) == ["conversion.json", "unet", "vae"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    record = json.loads((out / "conversion.json").read_text())
    n_unet = len(reference_unet(SD2_TINY).state_dict())
    assert record["keys"]["unet"] == n_unet
    assert record["keys"]["vae"] == len(OfficialLayoutVAE(**VAE_TINY).state_dict())
    assert record["keys"]["text_encoder_not_converted"] == 1
    assert record["keys"]["other_ignored_names"] == ["betas"]
    assert record["source"]["nested_under"] == "state_dict"
    assert record["scheduler"]["beta_schedule"] == "scaled_linear"

    reloaded = MultiViewUNet.from_pretrained(out / "unet", low_cpu_mem_usage=False).eval()
    errors = unet_errors(reloaded, reference_unet(SD2_TINY), SD2_TINY)
    assert max(errors.values()) < TOLERANCE, errors
    vae = AutoencoderKL.from_pretrained(out / "vae", low_cpu_mem_usage=False)
    assert vae.config.scaling_factor == 0.18215
    for name, tensor in result.vae.state_dict().items():
        torch.testing.assert_close(vae.state_dict()[name], tensor, rtol=0, atol=0)


def test_safetensors_checkpoint_without_vae(tmp_path):
    state = full_checkpoint(SD1_TINY, with_vae=False)
    ckpt, cfg = write_inputs(tmp_path, state, official_config(SD1_TINY, with_vae=False),
                             fmt="safetensors")
    result = convert_checkpoint(ckpt, cfg, tmp_path / "out")
    assert result.vae is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["conversion.json", "unet"]
    errors = unet_errors(result.unet, reference_unet(SD1_TINY), SD1_TINY)
    assert max(errors.values()) < TOLERANCE, errors


def test_failed_conversion_leaves_nothing(tmp_path):
    state = full_checkpoint(SD2_TINY)
    del state["model.diffusion_model.out.2.bias"]
    ckpt, cfg = write_inputs(tmp_path, state, official_config(SD2_TINY))
    before = set(tmp_path.iterdir())
    with pytest.raises(StateDictMismatchError, match=r"out\.2\.bias"):
        convert_checkpoint(ckpt, cfg, tmp_path / "out")
    assert set(tmp_path.iterdir()) == before


def test_existing_output_needs_overwrite(tmp_path):
    ckpt, cfg = write_inputs(tmp_path, full_checkpoint(SD2_TINY, with_vae=False),
                             official_config(SD2_TINY, with_vae=False))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    with pytest.raises(FileExistsError):
        convert_checkpoint(ckpt, cfg, out)
    assert (out / "keep.txt").exists()
    convert_checkpoint(ckpt, cfg, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["conversion.json", "unet"]


def test_unreadable_checkpoint_is_a_conversion_error(tmp_path):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"not a checkpoint")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(official_config(SD2_TINY)))
    with pytest.raises(ConversionError, match="cannot read checkpoint"):
        convert_checkpoint(ckpt, cfg)


def test_cli(tmp_path, capsys):
    cli = load_cli()
    ckpt, cfg = write_inputs(tmp_path, full_checkpoint(SD2_TINY, with_vae=False),
                             official_config(SD2_TINY, with_vae=False))
    assert cli.main(["--ckpt", str(ckpt), "--config", str(cfg), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "unet" / "config.json").is_file()
    capsys.readouterr()

    bad = official_config(dict(SD2_TINY, resblock_updown=True), with_vae=False)
    cfg.write_text(yaml.safe_dump(bad))
    assert cli.main(["--ckpt", str(ckpt), "--config", str(cfg), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "resblock_updown" in err and "\n" not in err
    assert not (tmp_path / "p").exists()


def test_text_encoder_makes_a_complete_pipeline_that_generate_loads(tmp_path):
    from mvdream_platform.pipelines import MVDreamPipeline

    from jobs_helpers import compose, import_job
    from tiny_models import CLIP_DIM, write_clip

    params = dict(SD2_TINY, context_dim=CLIP_DIM)
    ckpt, cfg = write_inputs(tmp_path, full_checkpoint(params), official_config(params))
    write_clip(tmp_path / "sd21")
    out = tmp_path / "mvdream"
    cli = load_cli()
    argv = ["--ckpt", str(ckpt), "--config", str(cfg), "--out", str(out),
            "--text-encoder", str(tmp_path / "sd21")]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "codec", "conversion.json", "model_index.json", "scheduler", "text_encoder", "unet"]
    pipe = MVDreamPipeline.from_pretrained(out)
    assert pipe.codec.scaling_factor == 0.18215
    assert pipe.scheduler.config.steps_offset == 1 and not pipe.scheduler.config.set_alpha_to_one
    errors = unet_errors(pipe.unet.eval(), reference_unet(params), params)
    assert max(errors.values()) < TOLERANCE, errors

    job = import_job("generate")
    record = job.run(compose("generate", [
        "model=mvdream_official", f"model.path={out}", "steps=2", "num_views=4",
        "prompt=a red cat", 'prompt_suffix=", 3d asset"', f"out={tmp_path / 'gen'}"]))
    assert record["image_shape"] == [1, 4, 16, 16, 3]
    assert record["request"]["prompt_suffix"] == ", 3d asset"

    wrong = dict(SD2_TINY)  # context_dim 24 != the text encoder's 32
    (tmp_path / "w").mkdir()
    ckpt, cfg = write_inputs(tmp_path / "w", full_checkpoint(wrong), official_config(wrong))
    with pytest.raises(ConversionError, match="context_dim"):
        convert_checkpoint(ckpt, cfg, tmp_path / "never", text_encoder_path=tmp_path / "sd21")
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------------------------------------
# Against the real official code (local verification; skipped unless MVDREAM_OFFICIAL_REPO)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official():
    """The real official modules, imported from ``$MVDREAM_OFFICIAL_REPO`` by path."""
    repo = os.environ.get("MVDREAM_OFFICIAL_REPO")
    if not repo:
        pytest.skip("set MVDREAM_OFFICIAL_REPO to a checkout of bytedance/MVDream to compare "
                    "against the real official MultiViewUNetModel")
    package = Path(repo) / "mvdream"
    if not (package / "ldm" / "modules" / "diffusionmodules" / "openaimodel.py").is_file():
        pytest.skip(f"MVDREAM_OFFICIAL_REPO={repo} has no mvdream/ldm/.../openaimodel.py")
    pytest.importorskip("einops", reason="the official code imports einops")
    saved = {k: v for k, v in sys.modules.items() if k == "mvdream" or k.startswith("mvdream.")}
    # A bare package object skips mvdream/__init__.py (it imports open_clip and the hub client).
    stub = types.ModuleType("mvdream")
    stub.__path__ = [str(package)]
    sys.modules["mvdream"] = stub
    try:
        unet_module = importlib.import_module("mvdream.ldm.modules.diffusionmodules.openaimodel")
        vae_module = importlib.import_module("mvdream.ldm.models.autoencoder")
        yield types.SimpleNamespace(unet=unet_module.MultiViewUNetModel,
                                    vae=vae_module.AutoencoderKL, package=package)
    finally:
        for name in [k for k in sys.modules if k == "mvdream" or k.startswith("mvdream.")]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.mark.parametrize("params", [SD2_TINY, SD1_TINY], ids=["sd2", "sd1"])
def test_real_official_unet_matches_conversion_and_reference(official, params):
    real = randomize_(official.unet(**copy.deepcopy(params)), 0).eval()
    state = real.state_dict()
    ours = convert_unet(state, parse_unet_params(params))
    reference = OfficialLayoutUNet(**params).eval()
    reference.load_state_dict(state, strict=True)  # same layout, key for key
    converted = unet_errors(ours, real, params)
    with torch.no_grad():
        ref_errors = {}
        for num_frames, with_camera in parity_cases(params):
            x, t, text, camera = unet_inputs(params, num_frames, with_camera, seed=num_frames)
            ref_errors[(num_frames, with_camera)] = relative_error(
                reference(x, t, text, camera=camera, num_frames=num_frames),
                real(x, t, text, camera=camera, num_frames=num_frames),
            )
    print(f"\nmax relative error vs real official (F, camera): converted {converted}, "
          f"reference {ref_errors}")
    assert max(converted.values()) < TOLERANCE, converted
    assert max(ref_errors.values()) < TOLERANCE, ref_errors


@pytest.mark.parametrize("name", ["sd-v2-base.yaml", "sd-v1.yaml"])
def test_real_official_released_configs_convert(official, name):
    config = yaml.safe_load((official.package / "configs" / name).read_text())
    params = config["model"]["params"]["unet_config"]["params"]
    with torch.device("meta"):
        real = official.unet(**copy.deepcopy(params))
        reference = OfficialLayoutUNet(**params)
    real_shapes = {k: v.shape for k, v in real.state_dict().items()}
    assert real_shapes == {k: v.shape for k, v in reference.state_dict().items()}
    convert_unet(real.state_dict(), parse_unet_params(params))  # raises on any key problem
    assert vae_config_from_official(config)["scaling_factor"] == 0.18215


@torch.no_grad()
def test_real_official_vae_matches_conversion(official):
    real = randomize_(official.vae(**copy.deepcopy(VAE_TINY)), 2).eval()
    vae = convert_vae(real.state_dict(), vae_config_from_official(official_config(SD2_TINY)))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    encode = relative_error(vae.encode(x).latent_dist.mean, real.encode(x).mean)
    decode = relative_error(vae.decode(z).sample, real.decode(z))
    print(f"\nVAE max relative error vs real official: encode {encode:.2e}, decode {decode:.2e}")
    assert encode < TOLERANCE and decode < TOLERANCE
