"""Optimisation pieces of the training loop: AdamW groups, warmup/cosine LR, EMA, clipping.

Each is a small function or class over plain ``torch`` objects, usable with or without
DistributedDataParallel or FSDP: anything that keeps per-parameter state keys it by the names
of the *unwrapped* model, so a state saved from a DDP run loads into a plain model and back.
Under FSDP (``use_orig_params``) each parameter is this rank's flat shard of it: the EMA then
averages shards (elementwise, so nothing changes), and checkpoints gather them
(:mod:`.parallel`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from diffusers.optimization import get_constant_schedule_with_warmup
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

__all__ = [
    "LR_SCHEDULES",
    "EMA",
    "build_lr_scheduler",
    "build_optimizer",
    "clip_grad_norm",
    "ema_decay",
    "maybe_no_sync",
    "plain_name",
    "unwrap_model",
]

LR_SCHEDULES = ("constant", "cosine")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / ``torch.compile`` wrappers (any nesting)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


_FSDP_PREFIX = re.compile(r"(^|\.)_fsdp_wrapped_module\.")


def plain_name(name: str) -> str:
    """A parameter's name in the plain module: FSDP inserts ``_fsdp_wrapped_module.`` at every
    wrapped block (its ``use_orig_params`` parameters are otherwise the module's own)."""
    return _FSDP_PREFIX.sub(r"\1", name)


def _named_trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, param in unwrap_model(model).named_parameters():
        if param.requires_grad:
            yield plain_name(name), param


# ---------------------------------------------------------------------- optimizer
def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    ndims: dict[str, int] | None = None,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, without weight decay on biases and norm scales.

    Decay pulls weights towards zero; that regularises the matrices and kernels of linear and
    convolution layers, but a bias or a GroupNorm/LayerNorm gain pulled to zero only shifts or
    silences a channel. Every such parameter is 1-D (all matrices and kernels are >= 2-D), so
    the split is by dimension.

    Args:
        model: the model (DDP- or FSDP-wrapped or not); frozen parameters
            (``requires_grad=False``) are left out.
        ndims: each parameter's dimensionality in the plain module, by name; needed under FSDP,
            whose parameters are flat 1-D shards (:func:`.parallel.parameter_ndims`).
    Returns:
        ``AdamW`` with two param groups named ``"decay"`` and ``"no_decay"`` (empty ones
        omitted).
    """
    decay, no_decay = [], []
    for name, param in _named_trainable(model):
        ndim = param.ndim if ndims is None else ndims[name]
        (decay if ndim >= 2 else no_decay).append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


# ---------------------------------------------------------------------- learning rate
def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int = 0,
    total_steps: int = 0,
    schedule: str = "constant",
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """The library schedules; call ``.step()`` once per optimizer step.

    Linear warmup from 0 at step 0 to 1 at ``warmup_steps``, then ``constant`` (diffusers'
    ``get_constant_schedule_with_warmup``) or half a cosine down to ``min_lr_ratio`` at
    ``total_steps`` (transformers' ``get_cosine_with_min_lr_schedule_with_warmup``; diffusers'
    cosine has no floor). The settings are arguments, not state: a resumed run loads the step
    count from ``state_dict`` and takes the settings from its own configuration.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps)
    if total_steps <= warmup_steps:
        raise ValueError(
            f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps}) for a "
            f"{schedule} schedule"
        )
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
        min_lr_rate=float(min_lr_ratio))


# ---------------------------------------------------------------------- EMA
def ema_decay(num_updates: int, decay: float, warmup: bool = True) -> float:
    """The decay of the ``num_updates``-th update (1-based).

    With warmup it is min(decay, (1 + n) / (10 + n)) as in LDM's ``LitEma`` (the EMA that SD
    and MVDream were trained with): early averages forget the random start quickly.
    """
    if not warmup:
        return decay
    return min(decay, (1 + num_updates) / (10 + num_updates))


class EMA:
    """Exponential moving average of a model's trainable parameters, kept in float32.

    shadow <- d * shadow + (1 - d) * param after every optimizer step, d = :func:`ema_decay`.

    Ours rather than diffusers' ``EMAModel``, for two checked reasons: ``EMAModel`` uses decay 0
    at its first update (a plain copy) and then LDM's (1 + k) / (10 + k) one update behind
    ``LitEma``, the EMA SD and MVDream were trained with (so its averages differ from step 1
    on, and resuming our existing checkpoints with it would not reproduce them); and it keeps
    its state as a list in parameter order, where ours is keyed by the unwrapped model's
    parameter names, so a state saved under DDP loads into a plain model and back.

    Args:
        model: the model (DDP-wrapped or not); the shadow starts as a copy of its trainable
            parameters, on their devices.
        decay: the long-run decay.
        warmup: use the LDM warmup of the decay.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in self._trainable(model)
        }
        self._stored: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        return _named_trainable(model)

    @torch.no_grad()
    def reset_from(self, model: nn.Module) -> None:
        """Make the model's current parameters the average (under FSDP: this rank's shards)."""
        self.shadow = {name: p.detach().float().clone() for name, p in self._trainable(model)}

    def _pairs(self, model: nn.Module) -> Iterator[tuple[torch.Tensor, nn.Parameter]]:
        for name, param in self._trainable(model):
            if name not in self.shadow:
                raise KeyError(f"EMA: parameter {name!r} is not tracked (was it unfrozen later?)")
            yield self.shadow[name], param

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Fold the model's current parameters into the average; returns the decay used."""
        self.num_updates += 1
        d = ema_decay(self.num_updates, self.decay, self.warmup)
        for shadow, param in self._pairs(model):
            shadow.mul_(d).add_(param.detach().float(), alpha=1.0 - d)
        return d

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's trainable parameters with the average."""
        for shadow, param in self._pairs(model):
            param.copy_(shadow)

    @torch.no_grad()
    def store(self, model: nn.Module) -> None:
        """Keep a copy of the model's current parameters (for :meth:`restore`)."""
        self._stored = {name: p.detach().clone() for name, p in self._trainable(model)}

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put back the parameters saved by :meth:`store`."""
        if self._stored is None:
            raise RuntimeError("EMA.restore called without a matching EMA.store")
        for name, param in self._trainable(model):
            param.copy_(self._stored[name])
        self._stored = None

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """``with ema.swapped(model):`` evaluate or save the averaged weights, then swap back."""
        self.store(model)
        self.copy_to(model)
        try:
            yield model
        finally:
            self.restore(model)

    def state_dict(self) -> dict:
        """``{"num_updates": int, "shadow": {name: float32 tensor}}`` (decay is configuration)."""
        return {"num_updates": self.num_updates, "shadow": dict(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load :meth:`state_dict` output; parameter names must match exactly."""
        shadow = state["shadow"]
        missing, unexpected = self.shadow.keys() - shadow.keys(), shadow.keys() - self.shadow.keys()
        if missing or unexpected:
            raise KeyError(
                f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        for name, tensor in shadow.items():
            self.shadow[name].copy_(tensor)
        self.num_updates = int(state["num_updates"])


# ---------------------------------------------------------------------- gradients
def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the global L2 norm of the gradients to ``max_norm``; returns the norm before.

    ``max_norm <= 0`` disables clipping but still returns the norm (worth logging). With a
    fp16 ``GradScaler``, call ``scaler.unscale_(optimizer)`` first. A non-finite result means
    the step should be skipped. Under FSDP the norm is the global one (FSDP's own
    ``clip_grad_norm_`` reduces the shards' norms across ranks).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        return float(model.clip_grad_norm_(max_norm if max_norm > 0 else float("inf")))
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    elif hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    else:
        norms = [torch.linalg.vector_norm(p.grad) for p in params]
        norm = torch.linalg.vector_norm(torch.stack(norms))
    return float(norm)


def maybe_no_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Gradient accumulation under DDP: skip the all-reduce on all but the last micro-batch.

    ``with maybe_no_sync(model, sync=(micro == accum - 1)): loss.backward()``
    """
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()
