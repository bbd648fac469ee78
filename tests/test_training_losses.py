"""The diffusion objective: schedule vs diffusers, shared timesteps, loss values, text dropout."""

from __future__ import annotations

import pytest
import torch

from mvdream_platform.diffusion import NoiseSchedule, min_snr_weight
from mvdream_platform.models import MultiViewUNet
from mvdream_platform.training.losses import (
    diffusion_loss,
    drop_text,
    sample_timesteps,
    timestep_weights,
)

from conftest import tiny_sd_unet_config

SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)
CONTEXT_DIM = 16  # tiny_sd_unet_config's cross_attention_dim


def tiny_model(seed: int = 0) -> MultiViewUNet:
    """A pixel-space (RGB, 8x8) multi-view UNet with the camera MLP, ~100K parameters."""
    torch.manual_seed(seed)
    return MultiViewUNet(unet_config=tiny_sd_unet_config(in_channels=3, out_channels=3))


def tiny_batch(objects: int = 2, views: int = 4, seed: int = 0):
    """x0 (B*F, 3, 8, 8) in [-1, 1], context (B*F, 5, 16) shared by views, camera (B*F, 16)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(objects * views, 3, 8, 8, generator=g) * 2 - 1
    context = torch.randn(objects, 5, CONTEXT_DIM, generator=g).repeat_interleave(views, dim=0)
    camera = torch.randn(objects * views, 16, generator=g)
    return x0, context, camera


# ---------------------------------------------------------------------- timesteps
def test_timesteps_shared_within_objects_in_range_and_deterministic():
    t = sample_timesteps(64, 4, 1000, torch.Generator().manual_seed(1))
    assert t.shape == (256,) and t.dtype == torch.int64
    per_object = t.view(64, 4)
    assert bool((per_object == per_object[:, :1]).all())
    assert int(t.min()) >= 0 and int(t.max()) <= 999
    assert len(per_object[:, 0].unique()) > 32  # different objects, different noise levels
    again = sample_timesteps(64, 4, 1000, torch.Generator().manual_seed(1))
    other = sample_timesteps(64, 4, 1000, torch.Generator().manual_seed(2))
    assert torch.equal(t, again) and not torch.equal(t, other)
    assert sample_timesteps(3, 1, 10, torch.Generator().manual_seed(0)).shape == (3,)


def test_timesteps_cover_the_range():
    t = sample_timesteps(20000, 1, 10, torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=10)
    assert len(counts) == 10 and int(counts.min()) > 1800  # ~2000 each


def test_timestep_bias_draws_the_range_multiplier_times_as_often():
    weights = timestep_weights(1000, [800, 1000], 4.0)
    assert weights.shape == (1000,) and float(weights[799]) == 1.0 and float(weights[800]) == 4.0
    t = sample_timesteps(20000, 4, 1000, torch.Generator().manual_seed(0), weights=weights)
    per_object = t.view(20000, 4)
    assert bool((per_object == per_object[:, :1]).all())
    high = float((per_object[:, 0] >= 800).float().mean())
    assert abs(high - 0.5) < 0.02  # 200 x 4 of 800 + 800: half the draws
    # inside each part t stays uniform
    low_counts = torch.bincount(per_object[:, 0][per_object[:, 0] < 800] // 100, minlength=8)
    assert float(low_counts.min()) > 0.85 * float(low_counts.max())
    again = sample_timesteps(20000, 4, 1000, torch.Generator().manual_seed(0), weights=weights)
    assert torch.equal(t, again)
    assert timestep_weights(1000, None, 4.0) is None and timestep_weights(1000, [0, 10], 1.0) is None


@pytest.mark.parametrize("bias_range, multiplier, match", [
    ([800, 1200], 4.0, "range"), ([500, 500], 4.0, "range"), ([800, 1000], 0.0, "multiplier"),
])
def test_timestep_bias_rejects_bad_settings(bias_range, multiplier, match):
    with pytest.raises(ValueError, match=match):
        timestep_weights(1000, bias_range, multiplier)


def test_trainer_config_rejects_a_bad_timestep_bias():
    from mvdream_platform.training.config import TrainerConfig

    with pytest.raises(ValueError, match="timestep_bias_range"):
        TrainerConfig(timestep_bias_range=[900, 100])
    with pytest.raises(ValueError, match="timestep_bias_multiplier"):
        TrainerConfig(timestep_bias_multiplier=-1.0)


def test_biased_timesteps_reach_the_loss():
    model = tiny_model().eval()
    schedule = NoiseSchedule.from_scheduler_config(SD_SCHEDULE)
    x0, context, camera = tiny_batch(objects=8)
    weights = timestep_weights(1000, [990, 1000], 1e6)  # practically always t >= 990
    with torch.no_grad():
        _, info = diffusion_loss(model, x0, context, camera, 4, schedule,
                                 generator=torch.Generator().manual_seed(0), t_weights=weights)
    assert int(info["timesteps"].min()) >= 990


# ---------------------------------------------------------------------- loss
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_equals_hand_computation(prediction_type):
    model = tiny_model().eval()
    schedule = NoiseSchedule.from_scheduler_config(SD_SCHEDULE)
    x0, context, camera = tiny_batch()
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([7, 7, 7, 7, 901, 901, 901, 901])
    eps = torch.randn(x0.shape, generator=g)

    with torch.no_grad():
        loss, info = diffusion_loss(
            model, x0, context, camera, 4, schedule,
            prediction_type=prediction_type, timesteps=t, noise=eps,
        )
        a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        target = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        out = model(x_t, t, context, camera=camera, num_frames=4).sample
    assert loss.ndim == 0
    torch.testing.assert_close(loss, ((out - target) ** 2).mean(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(info["loss_per_sample"], ((out - target) ** 2).mean(dim=(1, 2, 3)))
    assert torch.equal(info["timesteps"], t)

    # The per-object (B, L, D) context form is the same as the per-view one.
    with torch.no_grad():
        loss_b, _ = diffusion_loss(
            model, x0, context[::4], camera, 4, schedule,
            prediction_type=prediction_type, timesteps=t, noise=eps,
        )
    torch.testing.assert_close(loss_b, loss)


def test_loss_draws_shared_t_independent_noise_deterministically():
    model = tiny_model().eval()
    schedule = NoiseSchedule.from_scheduler_config(SD_SCHEDULE)
    x0, context, camera = tiny_batch()
    with torch.no_grad():
        loss1, info1 = diffusion_loss(
            model, x0, context, camera, 4, schedule, generator=torch.Generator().manual_seed(5)
        )
        loss2, info2 = diffusion_loss(
            model, x0, context, camera, 4, schedule, generator=torch.Generator().manual_seed(5)
        )
    assert torch.equal(loss1, loss2) and torch.equal(info1["timesteps"], info2["timesteps"])
    assert bool((info1["timesteps"].view(2, 4) == info1["timesteps"].view(2, 4)[:, :1]).all())
    # t first, then eps: the same generator state reproduces the loss's noise.
    g = torch.Generator().manual_seed(5)
    t = sample_timesteps(2, 4, 1000, g)
    eps = torch.randn(x0.shape, generator=g)
    assert torch.equal(t, info1["timesteps"])
    assert not torch.allclose(eps[0], eps[1])  # independent noise per view
    with torch.no_grad():
        loss3, _ = diffusion_loss(model, x0, context, camera, 4, schedule, timesteps=t, noise=eps)
    torch.testing.assert_close(loss3, loss1)


def test_min_snr_weighting():
    model = tiny_model().eval()
    schedule = NoiseSchedule.from_scheduler_config(SD_SCHEDULE)
    x0, context, camera = tiny_batch()
    t = torch.tensor([5, 5, 5, 5, 800, 800, 800, 800])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain, info = diffusion_loss(
            model, x0, context, camera, 4, schedule, timesteps=t, noise=eps
        )
        weighted, info_w = diffusion_loss(
            model, x0, context, camera, 4, schedule, timesteps=t, noise=eps, snr_gamma=5.0
        )
    snr = schedule.snr(t)
    weight = torch.clamp(snr, max=5.0) / snr
    assert weight[0] < 1 and weight[-1] == 1  # low-noise (high-SNR) steps are down-weighted
    torch.testing.assert_close(info_w["snr_weight"], weight)
    torch.testing.assert_close(weighted, (weight * info["loss_per_sample"]).mean())
    assert plain != weighted
    torch.testing.assert_close(
        min_snr_weight(snr, 5.0, "v_prediction"), torch.clamp(snr, max=5.0) / (snr + 1)
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_decreases_on_a_fixed_batch(prediction_type):
    model = tiny_model().train()
    schedule = NoiseSchedule.from_scheduler_config(SD_SCHEDULE)
    x0, context, camera = tiny_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g_eval = torch.Generator().manual_seed(100)
    t_eval = sample_timesteps(16, 4, 1000, g_eval)
    eps_eval = torch.randn(64, 3, 8, 8, generator=g_eval)
    # 8 fixed draws of (t, eps) per image: a low-variance estimate of the expected loss.
    x0_eval, context_eval = x0.repeat(8, 1, 1, 1), context.repeat(8, 1, 1)
    camera_eval = camera.repeat(8, 1)

    def evaluate() -> float:
        with torch.no_grad():
            loss, _ = diffusion_loss(
                model, x0_eval, context_eval, camera_eval, 4, schedule,
                prediction_type=prediction_type, timesteps=t_eval, noise=eps_eval,
            )
        return loss.item()

    before = evaluate()
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss, _ = diffusion_loss(
            model, x0, context, camera, 4, schedule, prediction_type=prediction_type, generator=g
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate()
    assert after < 0.75 * before, (before, after)  # measured: eps 0.17x, v 0.56x


def test_2d_batch_leaves_the_camera_mlp_without_gradient():
    model = tiny_model()
    schedule = NoiseSchedule.from_scheduler_config(SD_SCHEDULE)
    x0, context, _ = tiny_batch(objects=4, views=1)
    loss, info = diffusion_loss(
        model, x0, context, None, 1, schedule, generator=torch.Generator().manual_seed(0)
    )
    loss.backward()
    assert all(p.grad is None for p in model.camera_embedding.parameters())
    assert model.unet.conv_in.weight.grad is not None
    assert info["timesteps"].shape == (4,)


def test_loss_rejects_bad_arguments():
    model = tiny_model()
    schedule = NoiseSchedule.from_scheduler_config(SD_SCHEDULE)
    x0, context, camera = tiny_batch()
    with pytest.raises(ValueError, match="num_frames"):
        diffusion_loss(model, x0, context, camera, 3, schedule)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        diffusion_loss(model, x0, context, camera, 4, schedule, prediction_type="x0")


# ---------------------------------------------------------------------- text dropout
def test_drop_text_rate_and_per_object_consistency():
    objects, views = 5000, 4
    captions = [f"object {i}" for i in range(objects) for _ in range(views)]
    def drop(seed):
        return drop_text(captions, 0.1, torch.Generator().manual_seed(seed), num_frames=views)

    dropped = drop(0)
    assert len(dropped) == len(captions)
    groups = [dropped[i : i + views] for i in range(0, len(dropped), views)]
    for i, group in enumerate(groups):
        assert group == [""] * views or group == [f"object {i}"] * views
    rate = sum(group[0] == "" for group in groups) / objects
    assert abs(rate - 0.1) < 0.015  # binomial std ~0.004

    assert drop(0) == dropped and drop(1) != dropped
    assert drop_text(captions[:8], p=0.0, num_frames=4) == captions[:8]
    assert drop_text(captions[:8], p=1.0, num_frames=4) == [""] * 8


def test_drop_text_rejects_bad_arguments():
    with pytest.raises(ValueError, match="p must be in"):
        drop_text(["a"], p=1.5)
    with pytest.raises(ValueError, match="num_frames"):
        drop_text(["a", "a", "a"], p=0.1, num_frames=2)
