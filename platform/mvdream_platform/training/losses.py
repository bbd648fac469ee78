"""The latent-diffusion training objective, multi-view (MVDream paper §3.1, DDPM/LDM notation).

For an object with F views x0 (F, C, H, W) and its caption y:

    t ~ U{0, ..., T-1}                         one noise level per object, shared by its views
    eps ~ N(0, I)                              independent per view
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    L = || model(x_t, t, y, cameras) - target ||^2
        target = eps                           (epsilon prediction: SD, MVDream)
               = sqrt(abar_t) eps - sqrt(1 - abar_t) x0   (v prediction, Salimans & Ho 2022)

A 2D text-image batch (the paper's 30% of LAION steps) is the same with F = 1 and no camera.
Classifier-free guidance is trained by dropping the caption (:func:`drop_text`).

Everything here is a small pure function of tensors; the noise schedule and the eps / v / x0
algebra are the diffusion core's (``mvdream_platform.diffusion``), shared with score distillation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..diffusion import NoiseSchedule, check_prediction_type, min_snr_weight

__all__ = [
    "ParameterPreservation",
    "diffusion_loss",
    "drop_text",
    "sample_timesteps",
    "timestep_weights",
]


def _check_views(n: int, num_frames: int) -> int:
    """Number of objects B in a batch of n = B*F images; raises if F does not divide n."""
    if not isinstance(num_frames, int) or num_frames < 1 or n % num_frames:
        raise ValueError(
            f"num_frames must be a positive integer dividing the batch size {n}, got {num_frames!r}"
        )
    return n // num_frames


# ---------------------------------------------------------------------- sampling t, eps, captions
def timestep_weights(
    num_train_timesteps: int, bias_range: Sequence[int] | None, multiplier: float
) -> torch.Tensor | None:
    """Relative sampling weights of t: ``multiplier`` on ``[begin, end)``, 1 elsewhere.

    The "range" timestep bias of diffusers' SDXL training example. ``p(t)`` changes, the loss
    does not: the biased range is simply seen more often. MVDream's camera alone tells the views
    apart only at high noise (at t near T the image carries no view content), so a fine-tune
    that must teach the camera can spend more of its steps there.

    Args:
        num_train_timesteps: T.
        bias_range: ``[begin, end)`` with ``0 <= begin < end <= T``, or ``None`` (uniform).
        multiplier: > 0; 1 is uniform.
    Returns:
        (T,) float32 weights (unnormalised), or ``None`` for the uniform distribution.
    """
    if multiplier <= 0:
        raise ValueError(f"timestep bias multiplier must be > 0, got {multiplier!r}")
    if bias_range is None or multiplier == 1.0:
        return None
    begin, end = (int(v) for v in bias_range)
    if not 0 <= begin < end <= num_train_timesteps:
        raise ValueError(f"timestep bias range must satisfy 0 <= begin < end <= "
                         f"{num_train_timesteps}, got {list(bias_range)}")
    weights = torch.ones(num_train_timesteps)
    weights[begin:end] = multiplier
    return weights


def sample_timesteps(
    batch_objects: int,
    num_frames: int,
    num_train_timesteps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """One timestep per object, repeated for each of its views.

    Args:
        batch_objects: B, number of objects.
        num_frames: F, views per object (1 for 2D text-image data).
        num_train_timesteps: T; t is uniform on {0, ..., T-1} unless ``weights`` is given.
        generator: random source (draws on its own device); ``None`` uses the global RNG.
        device: where the result goes (default: the generator's device, else CPU).
        weights: (T,) relative probabilities of each t (:func:`timestep_weights`), or ``None``.
    Returns:
        t (B*F,) int64, ``t[b*F + f] == t[b*F]`` for every view f of object b.
    """
    # All views of one object share t: at sampling time the pipeline denoises the F views
    # jointly, one noise level for all, and the 3D self-attention mixes their tokens, so
    # training must see views at equal noise too. The official MVDream repository is
    # inference-only (no training code to check against); sharing t across the frames of a
    # sample is the convention of video diffusion models, whose inflated attention MVDream
    # borrows, and it is our design choice here.
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if weights is None:
        t = torch.randint(
            0, num_train_timesteps, (batch_objects,), generator=generator, device=gen_device
        )
    else:
        if weights.shape != (num_train_timesteps,):
            raise ValueError(f"timestep weights must have shape ({num_train_timesteps},), "
                             f"got {tuple(weights.shape)}")
        t = torch.multinomial(weights.to(gen_device, torch.float32), batch_objects,
                              replacement=True, generator=generator)
    return t.repeat_interleave(num_frames).to(device if device is not None else gen_device)


def drop_text(
    captions: Sequence[str],
    p: float = 0.1,
    generator: torch.Generator | None = None,
    num_frames: int = 1,
) -> list[str]:
    """Replace captions by "" with probability ``p`` for classifier-free guidance.

    Args:
        captions: B*F captions, the F views of each object contiguous (F = 1: one per image).
        p: drop probability per object (SD and MVDream train with 0.1).
        generator: CPU ``torch.Generator`` for reproducible drops; ``None`` uses the global RNG.
        num_frames: F. All views of an object are dropped together: the unconditional
            branch at sampling time sees "" for every view, so training must too.
    Returns:
        A new list of B*F captions.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p!r}")
    num_objects = _check_views(len(captions), num_frames)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    drop = torch.rand(num_objects, generator=generator, device=gen_device) < p
    drop = drop.repeat_interleave(num_frames).tolist()
    return ["" if dropped else caption for caption, dropped in zip(captions, drop)]


# ---------------------------------------------------------------------- the loss
def diffusion_loss(
    model: nn.Module,
    x0: torch.Tensor,
    context: torch.Tensor,
    camera: torch.Tensor | None,
    num_frames: int,
    schedule: NoiseSchedule,
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    snr_gamma: float | None = None,
    t_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The denoising loss of one batch of multi-view (or 2D) samples.

    Args:
        model: called as ``model(x_t, t, encoder_hidden_states=..., camera=..., num_frames=F)``
            and returning ``.sample`` (a ``MultiViewUNet``, possibly DDP-wrapped) or a tensor.
        x0: (B*F, C, H, W) clean latents (or pixels in [-1, 1]), views of an object contiguous.
        context: (B*F, L, D) text tokens per view, or (B, L, D) per object (repeated F times).
        camera: (B*F, 16) camera vectors, or ``None`` for 2D data (then F is normally 1).
        num_frames: F.
        schedule: the forward process.
        prediction_type: ``epsilon`` (SD, MVDream), ``v_prediction`` or ``sample``.
        generator: random source for t and eps (t drawn first); ``None`` uses the global RNG.
        timesteps: (B*F,) fixed timesteps instead of :func:`sample_timesteps`.
        noise: (B*F, C, H, W) fixed eps instead of a fresh draw.
        snr_gamma: Min-SNR-gamma weighting (gamma = 5 in the paper); ``None`` is the plain mean.
        t_weights: (T,) relative probabilities of t (:func:`timestep_weights`);
            ``None`` is uniform.
    Returns:
        loss: scalar float32, mean squared error over every element (weighted per sample when
            ``snr_gamma`` is set).
        info: ``timesteps`` (B*F,), ``loss_per_sample`` (B*F,) detached unweighted MSE per image
            (for loss-versus-t logging), and ``snr_weight`` (B*F,) when ``snr_gamma`` is set.
    """
    check_prediction_type(prediction_type)
    n = x0.shape[0]
    num_objects = _check_views(n, num_frames)
    if context.shape[0] == num_objects and num_frames > 1:
        context = context.repeat_interleave(num_frames, dim=0)

    gen_device = generator.device if generator is not None else x0.device
    if timesteps is None:
        t = sample_timesteps(num_objects, num_frames, schedule.num_train_timesteps, generator,
                             weights=t_weights)
    else:
        t = timesteps
    t = t.to(x0.device)
    if t.shape != (n,):
        raise ValueError(f"timesteps must have shape ({n},), got {tuple(t.shape)}")
    if noise is None:
        # Independent eps per view: each view is its own image, and the sampler starts every
        # view from its own independent Gaussian.
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype)
    noise = noise.to(x0.device)
    if noise.shape != x0.shape:
        raise ValueError(
            f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}"
        )

    x_t = schedule.add_noise(x0, noise, t)
    out = model(x_t, t, encoder_hidden_states=context, camera=camera, num_frames=num_frames)
    prediction = out if isinstance(out, torch.Tensor) else out[0]
    target = schedule.target(x0, noise, t, prediction_type)

    # The squared error in float32 even under autocast: a half-precision mean over millions
    # of elements loses the small differences training lives on.
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (B*F,)
    info = {"timesteps": t, "loss_per_sample": per_sample.detach()}
    if snr_gamma is None:
        return per_sample.mean(), info
    weight = min_snr_weight(schedule.snr(t), snr_gamma, prediction_type)
    info["snr_weight"] = weight
    return (weight * per_sample).mean(), info


# ---------------------------------------------------------------------- DreamBooth
class ParameterPreservation:
    """Multi-view DreamBooth's preservation loss: ``weight * distance(theta, theta_0) / N_theta``.

    ``theta_0`` is a frozen copy of the trainable parameters taken at construction (the weights
    the fine-tuning starts from: build it before a checkpoint is restored, so a resumed run still
    measures the distance to the original model, not to its last checkpoint). ``l1`` sums
    ``|theta - theta_0|`` (the paper's reading), ``l2`` sums ``(theta - theta_0)^2``; both are
    divided by ``N_theta``, the number of trainable scalars.
    """

    def __init__(self, module: torch.nn.Module, weight: float = 1.0, distance: str = "l1"):
        if distance not in ("l1", "l2"):
            raise ValueError(f"distance must be 'l1' or 'l2', got {distance!r}")
        self.weight, self.distance = float(weight), distance
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.reference = [p.detach().clone() for p in self.params]
        self.count = sum(p.numel() for p in self.params)

    def __call__(self) -> torch.Tensor:
        """The weighted loss (a scalar that back-propagates into the live parameters)."""
        total = sum(((p - r).abs().sum() if self.distance == "l1" else (p - r).pow(2).sum())
                    for p, r in zip(self.params, self.reference))
        return self.weight * total / self.count

    @torch.no_grad()
    def add_gradient(self) -> float:
        """Add this loss's gradient to every parameter's ``.grad`` in place; returns the loss.

        The training loop uses this instead of back-propagating ``self()``: under DDP with
        ``find_unused_parameters`` a parameter that the step's forward did not use (the camera
        MLP on a 2D step) is already marked ready, and a second autograd hook from this term
        would fire "marked as ready twice". The gradient is analytic and identical on every rank
        (same weights), so it is added after the all-reduce, once per optimiser step:
        ``weight / N * sign(theta - theta_0)`` (l1; 0 where unmoved, like autograd's ``abs``) or
        ``weight / N * 2 (theta - theta_0)`` (l2).
        """
        scale = self.weight / self.count
        total = 0.0
        for param, reference in zip(self.params, self.reference):
            delta = param - reference
            if self.distance == "l1":
                total += delta.abs().sum().item()
                grad = delta.sign_().mul_(scale)
            else:
                total += delta.pow(2).sum().item()
                grad = delta.mul_(2.0 * scale)
            if param.grad is None:
                param.grad = grad
            else:
                param.grad.add_(grad)
        return scale * total
