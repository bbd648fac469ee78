"""The diffusion core: the noise schedule and the eps / v / x0 algebra, in one place.

Training (``training/losses.py``) and score distillation (``sds/guidance.py``) both stand on
this module and on nothing of each other. DDPM notation, abar_t = prod_{s<=t} (1 - beta_s)::

    x_t  = sqrt(abar) x0 + sqrt(1 - abar) eps              forward process q(x_t | x0)
    v    = sqrt(abar) eps - sqrt(1 - abar) x0              velocity (Salimans & Ho 2022)
    x0   = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
    eps  = sqrt(abar) v + sqrt(1 - abar) x_t               from a v prediction
    eps  = (x_t - sqrt(abar) x0) / sqrt(1 - abar)          from an x0 ("sample") prediction
    SNR  = abar / (1 - abar)

The table abar_t is the one diffusers' ``DDPMScheduler`` computes from the pipeline's scheduler
config (betas and their cumulative product in float32), so training, distillation and the
sampler see bit-identical noise levels. The algebra takes abar either as a tensor that
broadcasts against the samples (training: one t per sample) or as a Python float (SDS: one t
per step, whose square roots are taken in double precision, as the reference code does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "BETA_SCHEDULES",
    "PREDICTION_TYPES",
    "NoiseSchedule",
    "add_noise",
    "check_prediction_type",
    "check_terminal_snr",
    "eps_from_prediction",
    "min_snr_weight",
    "target",
    "velocity",
    "x0_from_eps",
    "x0_from_prediction",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

Abar = torch.Tensor | float


def check_prediction_type(prediction_type: str) -> str:
    """Return ``prediction_type`` if it is one of :data:`PREDICTION_TYPES`, else raise."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
        )
    return prediction_type


def check_terminal_snr(scheduler_config: Mapping[str, Any], prediction_type: str) -> None:
    """Refuse an eps model on a zero-terminal-SNR schedule (``rescale_betas_zero_snr``).

    With abar_T = 0 the last training step shows pure noise, where eps = x_T: an eps model
    learns nothing there, and its sampler's x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
    divides by zero (Lin et al. 2024 train such schedules with v prediction).
    """
    if scheduler_config.get("rescale_betas_zero_snr") and prediction_type == "epsilon":
        raise ValueError("a zero-terminal-SNR schedule (scheduler rescale_betas_zero_snr=true) needs "
                         "prediction_type v_prediction (or sample), got epsilon: set "
                         "trainer.prediction_type=v_prediction")


def _sqrt(value: Abar) -> Abar:
    return math.sqrt(value) if isinstance(value, float) else value.sqrt()


# ---------------------------------------------------------------------- the algebra
def add_noise(x0: torch.Tensor, noise: torch.Tensor, abar: Abar) -> torch.Tensor:
    """x0, eps (N, ...), abar (float or broadcastable) -> x_t = sqrt(abar) x0 + sqrt(1 - abar) eps."""
    return _sqrt(abar) * x0 + _sqrt(1.0 - abar) * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, abar: Abar) -> torch.Tensor:
    """x0, eps (N, ...), abar -> v = sqrt(abar) eps - sqrt(1 - abar) x0."""
    return _sqrt(abar) * noise - _sqrt(1.0 - abar) * x0


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, abar: Abar) -> torch.Tensor:
    """x_t, eps (N, ...), abar -> x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    return (x_t - _sqrt(1.0 - abar) * eps) / _sqrt(abar)


def eps_from_prediction(prediction: torch.Tensor, x_t: torch.Tensor, abar: Abar,
                        prediction_type: str) -> torch.Tensor:
    """The model's output (eps, v or x0) -> its eps, so CFG and x0 work in one parameterisation."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return prediction
    if prediction_type == "v_prediction":
        return _sqrt(abar) * prediction + _sqrt(1.0 - abar) * x_t
    return (x_t - _sqrt(abar) * prediction) / _sqrt(1.0 - abar)


def x0_from_prediction(prediction: torch.Tensor, x_t: torch.Tensor, abar: Abar,
                       prediction_type: str) -> torch.Tensor:
    """The model's output (eps, v or x0) -> its x0; defined at abar = 0 for v (x0 = -v) and x0
    models, where an eps model's x0 is not (it raises)."""
    check_prediction_type(prediction_type)
    if prediction_type == "v_prediction":
        return _sqrt(abar) * x_t - _sqrt(1.0 - abar) * prediction
    if prediction_type == "sample":
        return prediction
    if (abar <= 0.0) if isinstance(abar, float) else bool((abar <= 0.0).any()):
        raise ValueError("an eps model's x0 is undefined at abar = 0 (zero terminal SNR)")
    return x0_from_eps(x_t, prediction, abar)


def target(x0: torch.Tensor, noise: torch.Tensor, abar: Abar, prediction_type: str) -> torch.Tensor:
    """What a model of ``prediction_type`` is trained to output: eps, v or x0 (N, ...)."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(x0, noise, abar)
    return x0


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), per sample.

    The x0-space weight min(SNR, gamma) expressed for each parameterisation:
    eps: min(SNR, gamma) / SNR; v: min(SNR, gamma) / (SNR + 1); x0: min(SNR, gamma).

    Args:
        snr: (N,) abar_t / (1 - abar_t).
    Returns:
        (N,) weights.
    """
    check_prediction_type(prediction_type)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped


# ---------------------------------------------------------------------- the schedule
def _expand(coefficient: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, ..., 1), broadcastable against ``like`` (N, ...)."""
    return coefficient.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class NoiseSchedule:
    """DDPM's discrete forward process q(x_t | x_0) over a table abar_t, t = 0..T-1.

    Args:
        alphas_cumprod: (T,) abar_t, decreasing from ~1 (clean) towards 0.

    Build it from the pipeline's scheduler config (:meth:`from_scheduler_config`): the table is
    then diffusers' own. The LDM code that trained SD and MVDream computed it in float64; the
    two differ by < 1e-6 in abar_t, far below anything training can feel, and matching
    diffusers means training and the sampler see the same noise levels.
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
        if alphas_cumprod.ndim != 1 or len(alphas_cumprod) < 2:
            raise ValueError(
                f"alphas_cumprod must be a 1-D tensor of length T >= 2, got shape "
                f"{tuple(alphas_cumprod.shape)}"
            )
        self.alphas_cumprod = alphas_cumprod

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """The schedule of a diffusers scheduler config (``scheduler.config`` or its JSON dict).

        Any scheduler's config will do (DDIM, DDPM, Euler, ...): the keys that define the
        forward process (``num_train_timesteps``, ``beta_start``, ``beta_end``,
        ``beta_schedule`` in :data:`BETA_SCHEDULES`, ``trained_betas``,
        ``rescale_betas_zero_snr``) go to ``DDPMScheduler``, with diffusers' defaults for
        missing keys. SD's: ``{"beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "beta_end": 0.012}``.
        """
        from diffusers import DDPMScheduler

        kind = config.get("beta_schedule", "linear")
        if config.get("trained_betas") is None and kind not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {kind!r}")
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                "trained_betas", "rescale_betas_zero_snr")
        scheduler = DDPMScheduler(**{k: config[k] for k in keys if config.get(k) is not None})
        return cls(scheduler.alphas_cumprod)

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """A copy with its table on ``device`` (saves a small host-to-device copy per step)."""
        return NoiseSchedule(self.alphas_cumprod.to(device))

    @property
    def num_train_timesteps(self) -> int:
        """T."""
        return len(self.alphas_cumprod)

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """t (N,) integer -> abar_t (N,) float32, on t's device."""
        return self.alphas_cumprod.to(t.device)[t.long()]

    def abar_at(self, t: int) -> float:
        """abar_t of one timestep as a Python float (SDS: one t for the whole batch)."""
        return float(self.alphas_cumprod[t])

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """t (N,) -> signal-to-noise ratio abar_t / (1 - abar_t) (N,)."""
        abar = self.abar(t)
        return abar / (1.0 - abar)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0, noise (N, ...), t (N,) -> x_t (N, ...): :func:`add_noise` at each sample's t."""
        return add_noise(x0, noise, _expand(self.abar(t.to(x0.device)), x0))

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0, noise (N, ...), t (N,) -> v (N, ...): :func:`velocity` at each sample's t."""
        return velocity(x0, noise, _expand(self.abar(t.to(x0.device)), x0))

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
               prediction_type: str) -> torch.Tensor:
        """What the model is trained to output at each sample's t: eps, v or x0 (N, ...)."""
        return target(x0, noise, _expand(self.abar(t.to(x0.device)), x0), prediction_type)

    def __repr__(self) -> str:
        a = self.alphas_cumprod
        return f"NoiseSchedule(T={len(a)}, abar_0={a[0].item():.6f}, abar_T-1={a[-1].item():.6f})"
