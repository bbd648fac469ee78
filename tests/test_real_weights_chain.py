"""The real-weights path end to end: an official-format checkpoint at SD-2.1's layout -> convert
-> generate -> text-to-3D (latent-space SDS through the VAE) -> the Serve multi-view route.

No weights can be downloaded here, so the checkpoint has random weights. Its layout is SD-2.1's
(`configs/sd-v2-base.yaml`: four UNet levels with channel multipliers 1, 2, 4, 4, attention on
the first three, 2 res blocks, linear transformer projections, a 16-dim camera embedding; the
KL VAE with channel multipliers 1, 2, 4, 4, 8x downscale; a CLIP text model with GELU and 77
positions). Only the widths are reduced (UNet 32 channels instead of 320, heads of 16 instead
of 64, text width 64 instead of 1024, VAE 32 channels instead of 128) and the latent is 8x8
(64 px) instead of 32x32, so the chain runs in seconds on CPU. It proves the plumbing a GPU user
relies on (key mapping, folder layout, latent codec, text encoder, cameras, serving), not quality.
"""

from __future__ import annotations

import base64
import io
import socket
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import requests
import torch
import trimesh
import yaml
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from test_convert_official import SD2_FULL, load_cli

from jobs_helpers import ROOT, compose, import_job
from official_reference import OfficialLayoutUNet, OfficialLayoutVAE, randomize_
from tiny_models import write_clip_tokenizer

TEXT_DIM = 64
# SD-2.1's UNet layout at a tenth of the width and a 64 px (8x8 latent) sample size.
SD21_REDUCED_UNET = dict(SD2_FULL, image_size=8, model_channels=32, num_head_channels=16,
                         context_dim=TEXT_DIM)
# SD-2.1's VAE (ch_mult 1,2,4,4; 2 res blocks; 4 latent channels; scale 0.18215) at 32 channels.
SD21_REDUCED_VAE = dict(
    embed_dim=4, lossconfig={"target": "torch.nn.Identity"},
    ddconfig=dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32,
                  ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0),
)
PROMPT = "a red cat"


def official_checkpoint(folder: Path) -> tuple[Path, Path]:
    """``sd-v2.1-base-4view``-style files: a Lightning-nested .pt and the official YAML."""
    unet = randomize_(OfficialLayoutUNet(**SD21_REDUCED_UNET), 0)
    vae = randomize_(OfficialLayoutVAE(**SD21_REDUCED_VAE), 1)
    state = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    state["cond_stage_model.model.token_embedding.weight"] = torch.randn(10, 8)  # dropped (OpenCLIP)
    state["betas"] = torch.linspace(1e-4, 2e-2, 1000)
    ckpt = folder / "sd-v2.1-base-4view.pt"
    torch.save({"state_dict": state, "global_step": 1}, ckpt)
    config = {"model": {"target": "mvdream.ldm.interface.LatentDiffusionInterface", "params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
        "parameterization": "eps",
        "unet_config": {"target": "mvdream.ldm.modules.diffusionmodules.openaimodel.MultiViewUNetModel",
                        "params": SD21_REDUCED_UNET},
        "first_stage_config": {"target": "mvdream.ldm.models.autoencoder.AutoencoderKL",
                               "params": SD21_REDUCED_VAE},
    }}}
    config_path = folder / "sd-v2-base.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return ckpt, config_path


def sd21_text_encoder_folder(root: Path) -> Path:
    """``tokenizer/`` + ``text_encoder/`` as in a diffusers SD-2.1 folder (GELU, 77 positions)."""
    write_clip_tokenizer(root / "tokenizer", max_length=77)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
        projection_dim=TEXT_DIM, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(2)
    CLIPTextModel(config).save_pretrained(root / "text_encoder")
    return root


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """jobs/convert_official.py, exactly as the README's GPU section runs it."""
    root = tmp_path_factory.mktemp("real_weights")
    ckpt, config = official_checkpoint(root)
    sd21 = sd21_text_encoder_folder(root / "stable-diffusion-2-1-base")
    out = root / "mvdream-sd21-diffusers"
    assert load_cli().main(["--ckpt", str(ckpt), "--config", str(config), "--out", str(out),
                            "--text-encoder", str(sd21)]) == 0
    return out


def official_overrides(path: Path) -> list[str]:
    return ["model=mvdream_official", f"model.path={path}"]


def test_converted_folder_is_a_latent_sd21_pipeline(converted):
    from mvdream_platform.pipelines import MVDreamPipeline

    pipe = MVDreamPipeline.from_pretrained(converted)
    assert pipe.default_size == 64 and pipe.codec.downscale_factor == 8
    assert pipe.codec.scaling_factor == pytest.approx(0.18215)
    assert pipe.unet.config["camera_dim"] == 16 and pipe.unet.config["attention_mode"] == "3d"
    unet = pipe.unet.config["unet_config"]
    assert tuple(unet["block_out_channels"]) == (32, 64, 128, 128)
    assert tuple(unet["down_block_types"]) == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert unet["cross_attention_dim"] == TEXT_DIM and unet["use_linear_projection"]
    assert pipe.text_encoder.max_length == 77 and pipe.text_encoder.dim == TEXT_DIM


def test_generate_then_text_to_3d_through_the_vae(converted, tmp_path):
    record = import_job("generate").run(compose("generate", official_overrides(converted) + [
        "steps=2", "num_views=4", f"prompt={PROMPT}", f"out={tmp_path / 'gen'}"]))
    assert record["image_shape"] == [1, 4, 64, 64, 3]

    # latent-space SDS: 64 px renders -> VAE encoder (8x8x4 latents) -> the converted UNet
    out = tmp_path / "t23d"
    result = import_job("text_to_3d").run(compose("text_to_3d", official_overrides(converted) + [
        f"prompt={PROMPT}", "steps=3", "seed=0", "logger=disabled", "progress=false",
        "sds.schedule_steps=null", "sds.guidance.anneal_steps=3", "sds.optim.orient_end_step=3",
        "sds.shading.ambient_only_steps=3", "sds.cameras.resolution=64",
        "sds.field.n_levels=4", "sds.field.log2_hashmap_size=10", "sds.field.hidden_dim=16",
        "sds.render.num_samples_per_ray=16", "sds.export.mesh_resolution=32",
        "sds.export.mesh_threshold=0.5", "sds.export.turntable_frames=2",
        "sds.export.turntable_resolution=16", "sds.export.quality_views=2",
        "sds.checkpoint_every=3", "sds.log_every=1", "sds.render_every=100", f"out={out}"]))
    metrics = result.to_json()
    assert metrics["steps"] == 3 and np.isfinite(metrics["final"]["loss"])
    assert metrics["final"]["loss"] > 0  # the VAE-encoded renders got a non-zero SDS gradient
    assert "quality" not in metrics or metrics["quality"] is None  # "a red cat": not procedural
    assert len(trimesh.load(out / "mesh.glb", force="mesh").faces) > 0
    fields = [k for k in load_file(next((out / "checkpoints").glob("*.safetensors")))]
    assert any(k.startswith("field.") for k in fields)


@pytest.mark.slow
def test_serve_multiview_route_runs_the_converted_model(converted, tmp_path):
    import ray
    from ray import serve

    from mvdream_platform.pipelines import MVDreamPipeline
    from mvdream_platform.serve.app import build_app

    from conftest import shutdown_ray

    model = yaml.safe_load((ROOT / "conf" / "model" / "mvdream_official.yaml").read_text())
    model["path"] = str(converted)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({
            "model": model, "logger": "disabled", "storage": str(tmp_path / "serve"),
            "auth_token_env": "MVDREAM_TEST_REAL_WEIGHTS_TOKEN",
            "limits": {"resolution_choices": [64], "max_sampling_steps": 10},
            "generator": {"num_cpus": 1, "max_batch_size": 4, "batch_wait_timeout_s": 0.1},
            "worker": {"num_replicas": 1, "num_cpus": 1},
        }), name="real-weights", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        assert requests.get(url + "/healthz", timeout=30).json()["model"] == "mvdream_official"
        r = requests.post(url + "/v1/multiview", timeout=300, json={
            "prompts": [PROMPT], "steps": 2, "seed": 5, "guidance_scale": 7.5, "resolution": 64})
        assert r.status_code == 200, r.text
        first = r.json()["results"][0]
        views = [np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB"))
                 for b in first["images"]]
        assert [v.shape for v in views] == [(64, 64, 3)] * 4
        assert np.array(first["cameras"]).shape == (4, 16)
    finally:
        serve.shutdown()
        shutdown_ray()
    pipe = MVDreamPipeline.from_pretrained(converted)
    direct = pipe(PROMPT, num_views=4, num_inference_steps=2, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    assert np.abs(views[1].astype(float) - direct[1] * 255).max() <= 1.0
