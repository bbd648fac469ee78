"""Build an :class:`MVDreamPipeline` from a plain model description.

Three sources, chosen by ``ModelConfig.source``:

* ``pipeline``: a saved MVDreamPipeline folder (local path or fsspec URI), e.g. a trained run's
  output or a converted official checkpoint;
* ``sd``: a diffusers Stable Diffusion folder or hub id, inflated into a multi-view model
  (UNet weights inherited, camera MLP zero-initialised), with its CLIP text encoder and VAE;
* ``init``: a freshly initialised model from ``unet`` (the untrained embedded default).

This module takes dataclasses, not Hydra objects, so notebooks can use it directly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler

from ..models import MultiViewUNet
from ..models.codecs import LatentCodec, PixelCodec
from ..models.text_encoders import load_text_encoder
from ..storage import get_dir
from .pipeline_mvdream import MVDreamPipeline

log = logging.getLogger(__name__)

SOURCES = ("init", "pipeline", "sd")
# The source checkout (platform/mvdream_platform/pipelines/loading.py -> repository root):
# relative model paths such as the shipped checkpoints/tiny resolve against it too.
REPO_ROOT = Path(__file__).resolve().parents[3]
CODECS = ("pixel", "latent")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Stable Diffusion's training schedule (REFERENCE.md): scaled-linear betas 0.00085..0.012.
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


@dataclass
class ModelConfig:
    """Where a multi-view model comes from and, for ``init``, what it looks like."""

    name: str = "tiny"
    source: str = "init"
    path: str | None = None
    unet: dict[str, Any] | None = None
    camera_dim: int | None = 16
    camera_mode: str = "time"
    attention_mode: str | None = None  # None keeps the saved mode (3d for new models)
    text_encoder: dict[str, Any] = field(default_factory=lambda: {"kind": "minilm"})
    codec: str = "pixel"
    # New models (init, sd): the DDIM scheduler's arguments (None: SD's training schedule).
    # A saved pipeline keeps its own scheduler; keys given here replace its values (e.g. turning
    # a trained eps model into a zero-terminal-SNR v model to fine-tune: checkpoints/README.md).
    scheduler: dict[str, Any] | None = None
    dtype: str = "float32"
    trained: bool = False  # informational: False makes jobs say the model is untrained
    # Recommended sampling settings for this model (jobs default to them): a 4.6M-parameter
    # model wants much weaker guidance than SD-sized ones.
    guidance_scale: float = 7.5
    steps: int = 50
    # The words the model was trained on, when that is a closed set: "shapes" (the procedural
    # grammar of mvdream_platform.data.shapes) makes the jobs warn about prompt words it has
    # never read; None (real weights, open text) checks nothing.
    vocabulary: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"model.source must be one of {SOURCES}, got {self.source!r}")
        if self.source in ("pipeline", "sd") and not self.path:
            raise ValueError(f"model.path is required for model.source={self.source!r}")
        if self.source == "init" and not self.unet:
            raise ValueError("model.unet (a UNet2DConditionModel config) is required for model.source='init'")
        if self.codec not in CODECS:
            raise ValueError(f"model.codec must be one of {CODECS}, got {self.codec!r}")
        if self.codec == "latent" and self.source == "init" and not self.path:
            raise ValueError("model.codec='latent' with model.source='init' needs model.path (an SD folder with vae/)")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.vocabulary not in VOCABULARIES:
            raise ValueError(f"model.vocabulary must be one of {VOCABULARIES}, got {self.vocabulary!r}")


VOCABULARIES = (None, "shapes")


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else CPU; any other name is taken as given (``cuda:1``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_pipeline(config: ModelConfig, device: str | torch.device = "cpu", seed: int = 0) -> MVDreamPipeline:
    """Load or create the pipeline described by ``config`` on ``device``.

    ``seed`` fixes the random initialisation of ``init`` models (same seed, same weights).
    """
    if config.source == "pipeline":
        pipe = MVDreamPipeline.from_pretrained(resolve_model_dir(config.path))
        if config.scheduler:
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **config.scheduler)
    elif config.source == "sd":
        pipe = _inflate_stable_diffusion(config)
    else:
        pipe = _initialise(config, seed)
    if pipe.config.get("recommended_guidance_scale") is None:  # a saved recommendation wins
        pipe.recommend(guidance_scale=config.guidance_scale, steps=config.steps)
    if config.attention_mode is not None:
        pipe.unet.set_attention_mode(config.attention_mode)
    pipe = pipe.to(device)
    if DTYPES[config.dtype] != torch.float32:
        cast_components(pipe, DTYPES[config.dtype])
    return pipe


def cast_components(pipe: MVDreamPipeline, dtype: torch.dtype) -> None:
    """Cast every model component of ``pipe`` to ``dtype``, in place.

    Through ``nn.Module.to``: diffusers 0.42's ``ModelMixin.to`` warns "There are modules in
    <class> that should be kept in float32: []" on every dtype cast, even with no such module
    (it tests the list it has just defaulted to ``[]`` against None), three lines per load for
    any bf16/fp16 user. None of our components keeps float32 modules, so the plain cast is the
    same cast without the noise.
    """
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            torch.nn.Module.to(component, dtype=dtype)


def _initialise(config: ModelConfig, seed: int) -> MVDreamPipeline:
    text_encoder = load_text_encoder(**config.text_encoder)
    unet_config = dict(config.unet)
    unet_config.setdefault("cross_attention_dim", text_encoder.dim)
    if unet_config["cross_attention_dim"] != text_encoder.dim:
        raise ValueError(
            f"model.unet.cross_attention_dim ({unet_config['cross_attention_dim']}) must equal the "
            f"text encoder's width ({text_encoder.dim})"
        )
    if config.codec == "latent":
        codec = LatentCodec.from_vae_folder(resolve_model_dir(config.path))
    else:
        codec = PixelCodec()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = MultiViewUNet(
            unet_config=unet_config,
            camera_dim=config.camera_dim,
            camera_mode=config.camera_mode,
            attention_mode=config.attention_mode or "3d",
        )
    return MVDreamPipeline(unet=unet, text_encoder=text_encoder, codec=codec,
                           scheduler=DDIMScheduler(**(config.scheduler or SD_SCHEDULER)))


def _inflate_stable_diffusion(config: ModelConfig) -> MVDreamPipeline:
    root = resolve_model_dir(config.path)
    unet = MultiViewUNet.from_sd_unet(
        root,
        camera_dim=config.camera_dim,
        camera_mode=config.camera_mode,
        attention_mode=config.attention_mode or "3d",
    )
    text_options = {k: v for k, v in config.text_encoder.items() if k not in ("kind", "path")}
    text_encoder = load_text_encoder("clip", root, **text_options)
    codec = LatentCodec.from_vae_folder(root)
    return MVDreamPipeline(unet=unet, text_encoder=text_encoder, codec=codec,
                           scheduler=DDIMScheduler(**(config.scheduler or SD_SCHEDULER)))


def resolve_model_dir(path: str) -> str:
    """A local folder for ``path``: a local folder as is, an fsspec URI copied locally, or a
    Hugging Face hub id through the hub cache (which works offline once cached)."""
    if os.path.isdir(path) or "://" in path:
        return get_dir(path)
    in_repo = REPO_ROOT / path  # e.g. checkpoints/tiny from a source checkout, any cwd
    if not os.path.isabs(path) and in_repo.is_dir():
        return str(in_repo)
    if os.path.exists(path) or path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model.path {path!r} is not a folder")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path)
    except Exception as error:  # offline, unknown id, no access: say what was tried
        raise FileNotFoundError(
            f"model.path {path!r} is neither a local folder, an fsspec URI nor a reachable or "
            f"cached hub id ({type(error).__name__}: {error})"
        ) from error
