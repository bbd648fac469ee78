"""Batched multi-view sampling: many clients' requests, one pipeline call per compatible group.

Each request's initial noise is drawn from its own seed (``latents=`` of the pipeline), so a
request's images are the same whether it ran alone or batched with others (up to float
round-off of batched matmuls), and equal to ``jobs/generate.py`` with that prompt and seed.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import astuple, dataclass
from typing import Any

import numpy as np
import torch

from .. import storage
from ..generation import make_grid


@dataclass(frozen=True)
class SamplingKey:
    """Options that must be equal for requests to share one pipeline call."""

    num_views: int
    elevation: float
    azimuth_start: float
    steps: int
    guidance_scale: float
    guidance_rescale: float
    resolution: int | None
    negative_prompt: str


@dataclass
class SampleItem:
    """One prompt of one HTTP request."""

    prompt: str
    seed: int
    key: SamplingKey

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SampleItem:
        return cls(prompt=values["prompt"], seed=int(values["seed"]), key=SamplingKey(**values["key"]))


def initial_noise(pipe, item: SampleItem, device) -> torch.Tensor:
    """(F, C, h, w) noise from the item's own seed (what a one-prompt pipeline call draws)."""
    size = item.key.resolution or pipe.default_size
    factor = pipe.codec.downscale_factor
    shape = (item.key.num_views, pipe.codec.latent_channels, size // factor, size // factor)
    generator = torch.Generator(device="cpu").manual_seed(item.seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=pipe.unet.dtype)


def sample_items(pipe, items: list[SampleItem]) -> list[dict[str, Any]]:
    """Sample every item; returns, per item in order, ``{"pngs": [bytes] * F, "cameras",
    "batch_size", "group_size", "seconds"}``. Items with equal :class:`SamplingKey` share one
    pipeline call."""
    groups: dict[SamplingKey, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[item.key].append(index)
    results: list[dict[str, Any] | None] = [None] * len(items)
    device = pipe._execution_device
    for key, indices in groups.items():
        began = time.perf_counter()
        members = [items[i] for i in indices]
        latents = torch.cat([initial_noise(pipe, m, device) for m in members])
        out = pipe([m.prompt for m in members], negative_prompt=key.negative_prompt,
                   num_views=key.num_views, elevation=key.elevation, azimuth_start=key.azimuth_start,
                   num_inference_steps=key.steps, guidance_scale=key.guidance_scale,
                   guidance_rescale=key.guidance_rescale, height=key.resolution, width=key.resolution,
                   latents=latents, output_type="np")
        seconds = time.perf_counter() - began
        cameras = out.cameras.tolist()
        for i, views in zip(indices, out.images):
            results[i] = {"pngs": [png_bytes(v) for v in views], "cameras": cameras,
                          "batch_size": len(items), "group_size": len(indices), "seconds": seconds}
    return results  # type: ignore[return-value]


def png_bytes(view: np.ndarray) -> bytes:
    """(H, W, 3) floats in [0, 1] -> PNG bytes."""
    return storage.encode_png(make_grid(view[None, None]))


def key_dict(key: SamplingKey) -> dict[str, Any]:
    return dict(zip(SamplingKey.__dataclass_fields__, astuple(key)))
