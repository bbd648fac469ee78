"""The training loop's instruments: timed gradient all-reduce and periodic sample grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mvdream_platform.training.comm_timing import AllReduceTimer, attach_allreduce_timer
from mvdream_platform.training.optim import EMA
from mvdream_platform.training.samples import SampleConfig, sample_grid

from conftest import make_tiny_pipeline


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 3))


def test_timed_allreduce_hook_gives_the_same_gradients_and_counts_time(process_group):
    plain, hooked = nn.parallel.DistributedDataParallel(_net(0)), nn.parallel.DistributedDataParallel(_net(0))
    timer = attach_allreduce_timer(hooked)
    x = torch.randn(5, 6)
    for model in (plain, hooked):
        model(x).square().mean().backward()
    for a, b in zip(plain.parameters(), hooked.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    seconds, buckets = timer.take()
    assert buckets >= 1 and seconds > 0.0
    assert timer.take() == (0.0, 0)  # take() resets


def test_allreduce_timer_accumulates_and_resets():
    timer = AllReduceTimer()
    timer._add(0.25)
    timer._add(0.5)
    assert timer.take() == (0.75, 2)
    assert timer.take() == (0.0, 0)


def test_sample_grid_shape_determinism_and_no_side_effects():
    pipe = make_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet.train()
    ema = EMA(unet, decay=0.5, warmup=False)
    with torch.no_grad():  # make the average differ from the live weights
        for p in unet.parameters():
            p.add_(0.01)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    settings = SampleConfig(captions=["a red cube", "a blue sphere"], num_views=4, steps=2, seed=3)

    grid = sample_grid(pipe, unet, ema, settings, settings.captions, guidance_scale=2.0)
    h = w = 8  # tiny_pixel_unet_config: 8x8 views
    assert grid.shape == (2 * h, 4 * w, 3) and grid.dtype == np.uint8
    assert unet.training  # back in train mode
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k]), k  # EMA weights were swapped back out

    again = sample_grid(pipe, unet, ema, settings, settings.captions, guidance_scale=2.0)
    np.testing.assert_array_equal(grid, again)
    live = sample_grid(pipe, unet, None, settings, settings.captions, guidance_scale=2.0)
    assert not np.array_equal(grid, live)  # the EMA average really was what sampled


def test_sample_config_defaults_to_held_out_captions_and_validates():
    from mvdream_platform.data.shapes import make_object
    from mvdream_platform.evaluation import HELD_OUT_START

    captions = SampleConfig(num_captions=3).resolved_captions()
    assert captions == [make_object(HELD_OUT_START + i, seed=0).caption for i in range(3)]
    assert SampleConfig(captions=["a cube"]).resolved_captions() == ["a cube"]
    with pytest.raises(ValueError, match="samples.every"):
        SampleConfig(every=-1).validate()
    with pytest.raises(ValueError, match="samples.steps"):
        SampleConfig(steps=0).validate()
