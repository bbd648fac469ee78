"""Multi-view sample grids during training: what the model draws for held-out captions.

Rank 0 calls :func:`sample_grid` every ``samples.every`` steps. It samples with the weights the
run would export (the EMA average when EMA is on, swapped in and back out), in eval mode and
without gradients, then puts the model back exactly as it was, so sampling never changes
training (a test checks the weights and the train flag afterwards).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from ..generation import make_grid
from .optim import unwrap_model


@dataclass
class SampleConfig:
    """Periodic sample grids. ``every=0`` turns them off."""

    every: int = 250
    # Captions to draw; empty = the first ``num_captions`` held-out procedural captions (indices
    # the training set never uses, see mvdream_platform.data.shapes.HELD_OUT_START).
    captions: list[str] = field(default_factory=list)
    num_captions: int = 4
    num_views: int = 4
    elevation: float = 15.0
    steps: int = 20
    guidance_scale: float | None = None  # None: the model config's recommendation
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.every < 0:
            raise ValueError(f"samples.every must be >= 0 (0 = off), got {self.every}")
        for name in ("num_captions", "num_views", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"samples.{name} must be >= 1, got {getattr(self, name)}")

    def resolved_captions(self) -> list[str]:
        if self.captions:
            return [str(c) for c in self.captions]
        from ..data.shapes import HELD_OUT_START, make_object

        # The training set's own caption distribution (composites included), unseen objects.
        return [make_object(HELD_OUT_START + i).caption for i in range(self.num_captions)]


@torch.no_grad()
def sample_grid(pipe, unet: torch.nn.Module, ema, settings: SampleConfig, captions: list[str],
                guidance_scale: float, resolution: int | None = None, autocast=None) -> np.ndarray:
    """Sample ``captions`` x ``num_views`` with the exportable weights.

    Args:
        pipe: the run's MVDreamPipeline (its ``unet`` is the training model, unwrapped).
        unet: the training model (plain or DDP-wrapped).
        ema: the run's EMA or None.
        resolution: pixels per side (the training data's); None = the model's default.
    Returns:
        (len(captions) * H, num_views * W, 3) uint8 grid: captions as rows, views as columns.
    """
    model = unwrap_model(unet)
    was_training = model.training
    swap = ema.swapped(model) if ema is not None else contextlib.nullcontext()
    # The sampler's noise comes from its own generator; the training RNG is not touched.
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    try:
        model.eval()
        with swap, (autocast or contextlib.nullcontext()):
            images = pipe(captions, num_views=settings.num_views, elevation=settings.elevation,
                          num_inference_steps=settings.steps, guidance_scale=guidance_scale,
                          height=resolution, width=resolution,
                          generator=generator, output_type="np").images
    finally:
        model.train(was_training)
    return make_grid(np.asarray(images, dtype=np.float32))
