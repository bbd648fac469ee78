"""Shared fixtures: tiny random configurations of the real models (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

# Never reach a model hub from tests; everything is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

# Real meshes users bring (glTF, OBJ+MTL+texture, PLY, STL), copied from the project's shared
# data with their attributions (tests/data/meshes/README.md) so tests never depend on a folder
# outside the checkout.
MESHES = Path(__file__).resolve().parent / "data" / "meshes"


def tiny_sd_unet_config(**overrides) -> dict:
    """A Stable-Diffusion-shaped UNet2DConditionModel config small enough for CPU tests.

    Two levels (cross-attention then plain), linear projections as in SD 2.x, 2 and 4 heads.
    """
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=8,
    )
    config.update(overrides)
    return config


@pytest.fixture
def sd_unet():
    """A randomly initialised tiny SD UNet (seeded)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_sd_unet_config()).eval()


def tiny_pixel_unet_config(**overrides) -> dict:
    """A pixel-space (RGB) multi-view UNet config for 8x8 views, text width 384 (MiniLM)."""
    return tiny_sd_unet_config(in_channels=3, out_channels=3, cross_attention_dim=384, **overrides)


def make_tiny_pipeline(seed: int = 0, max_length: int = 8):
    """A real MVDreamPipeline: tiny random MultiViewUNet, the real MiniLM, pixel codec, DDIM."""
    from mvdream_platform.pipelines.loading import ModelConfig, build_pipeline

    config = ModelConfig(
        name="test-tiny",
        source="init",
        unet=tiny_pixel_unet_config(),
        text_encoder={"kind": "minilm", "max_length": max_length},
    )
    return build_pipeline(config, seed=seed)


@pytest.fixture(scope="session")
def tiny_pipeline():
    return make_tiny_pipeline()


def shutdown_ray() -> None:
    """``ray.shutdown()`` after a full garbage collection.

    Ray handles (object refs, actor handles, placement groups) that sit in reference cycles
    (a traceback, a trainer's result) are otherwise freed by a later collection, after the core
    worker is gone; their finalizers then reach the dead core worker and Ray aborts the whole
    pytest process ("Check failed: core_worker_process"), in whatever test happens to run then.
    """
    import gc

    import ray

    gc.collect()
    ray.shutdown()
    gc.collect()


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group (reuses one that is already up)."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
