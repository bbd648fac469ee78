"""The diffusion core: diffusers' schedule table, the eps / v / x0 algebra, prediction types."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from mvdream_platform.diffusion import (
    NoiseSchedule,
    add_noise,
    check_prediction_type,
    check_terminal_snr,
    eps_from_prediction,
    target,
    x0_from_eps,
    x0_from_prediction,
)

SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)


# ---------------------------------------------------------------------- schedule
@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize(
    "config",
    [
        SD_SCHEDULE,
        dict(num_train_timesteps=1000, beta_schedule="linear"),
        dict(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2"),
        dict(SD_SCHEDULE, rescale_betas_zero_snr=True),
    ],
    ids=["sd", "linear", "cosine", "zero-snr"],
)
def test_add_noise_and_velocity_equal_diffusers(scheduler_cls, config):
    scheduler = scheduler_cls(**config)
    schedule = NoiseSchedule.from_scheduler_config(scheduler.config)
    T = config["num_train_timesteps"]
    g = torch.Generator().manual_seed(0)
    t = torch.cat([torch.tensor([0, 1, T // 2, T - 1]), torch.randint(0, T, (60,), generator=g)])
    x0 = torch.randn(len(t), 4, 8, 8, generator=g)
    eps = torch.randn(len(t), 4, 8, 8, generator=g)

    torch.testing.assert_close(schedule.alphas_cumprod, scheduler.alphas_cumprod, atol=0, rtol=0)
    torch.testing.assert_close(
        schedule.add_noise(x0, eps, t), scheduler.add_noise(x0, eps, t), atol=0, rtol=0
    )
    torch.testing.assert_close(
        schedule.velocity(x0, eps, t), scheduler.get_velocity(x0, eps, t), atol=0, rtol=0
    )


def test_schedule_reads_like_the_formulas():
    schedule = NoiseSchedule.from_scheduler_config(SD_SCHEDULE)
    assert schedule.num_train_timesteps == 1000
    abar = schedule.alphas_cumprod
    assert abar.dtype == torch.float32 and bool((abar[1:] < abar[:-1]).all())
    t = torch.tensor([10, 900])
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a = abar[t].view(2, 1, 1, 1)
    x_t = schedule.add_noise(x0, eps, t)
    v = schedule.velocity(x0, eps, t)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    # v and x_t are a rotation of (x0, eps): x0 = sqrt(abar) x_t - sqrt(1 - abar) v.
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(schedule.snr(t), abar[t] / (1 - abar[t]))


def test_schedule_rejects_unknown_beta_schedule():
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        NoiseSchedule.from_scheduler_config({"beta_schedule": "quadratic"})


def test_predict_x0_inverts_the_forward_process():
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    abar = 0.3
    x_t = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
    torch.testing.assert_close(x0_from_eps(x_t, eps, abar), x0)


def test_v_and_x0_predicting_models_are_converted_to_eps():
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    abar = 0.4
    x_t = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
    v = math.sqrt(abar) * eps - math.sqrt(1 - abar) * x0
    torch.testing.assert_close(eps_from_prediction(v, x_t, abar, "v_prediction"), eps)
    torch.testing.assert_close(eps_from_prediction(x0, x_t, abar, "sample"), eps)
    assert eps_from_prediction(eps, x_t, abar, "epsilon") is eps


@pytest.mark.parametrize("abar", [0.4, 0.0])
def test_every_parameterisation_gives_back_x0_and_only_eps_fails_at_zero_snr(abar):
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x_t = add_noise(x0, eps, abar)
    for kind in ("v_prediction", "sample") + (("epsilon",) if abar > 0 else ()):
        torch.testing.assert_close(x0_from_prediction(target(x0, eps, abar, kind), x_t, abar, kind), x0)
    if abar == 0.0:
        with pytest.raises(ValueError, match="undefined at abar = 0"):
            x0_from_prediction(eps, x_t, abar, "epsilon")
        with pytest.raises(ValueError, match="undefined at abar = 0"):
            x0_from_prediction(eps, x_t, torch.zeros(2, 1, 1, 1), "epsilon")


def test_float_and_tensor_abar_give_the_same_algebra():
    # SDS passes one abar as a Python float (double-precision square roots), training a tensor
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    abar = 0.37
    as_tensor = torch.full((3, 1, 1, 1), abar)
    torch.testing.assert_close(add_noise(x0, eps, abar), add_noise(x0, eps, as_tensor))
    x_t = add_noise(x0, eps, abar)
    for kind, prediction in (("epsilon", eps), ("v_prediction", target(x0, eps, abar, "v_prediction")),
                             ("sample", x0)):
        torch.testing.assert_close(eps_from_prediction(prediction, x_t, abar, kind), eps,
                                   atol=1e-5, rtol=0)
    assert target(x0, eps, abar, "sample") is x0 and target(x0, eps, abar, "epsilon") is eps


def test_zero_terminal_snr_needs_a_v_or_x0_model():
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
              "rescale_betas_zero_snr": True}
    assert NoiseSchedule.from_scheduler_config(config).abar_at(999) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="needs prediction_type v_prediction"):
        check_terminal_snr(config, "epsilon")
    check_terminal_snr(config, "v_prediction")
    check_terminal_snr(dict(config, rescale_betas_zero_snr=False), "epsilon")


def test_unknown_prediction_types_are_refused_everywhere():
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        check_prediction_type("x_start")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        target(torch.zeros(1), torch.zeros(1), 0.5, "flow")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        eps_from_prediction(torch.zeros(1), torch.zeros(1), 0.5, "flow")
