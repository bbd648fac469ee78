"""Data parallelism for the training loop: DDP (the default) or FSDP, behind one small interface.

``ddp`` replicates the UNet on every worker and all-reduces its gradients (Ray Train's
``prepare_model``, ``find_unused_parameters`` on: the camera MLP sits out 2D steps). ``fsdp``
shards parameters, gradients and AdamW state across the workers and gathers one block at a
time for its forward and backward (torch's ``FullyShardedDataParallel``, ``use_orig_params``
so names, the no-decay split and EMA stay per parameter). For SD-2.1's 868M UNet in fp32 that
is 3.5 GB of weights + 3.5 GB of gradients + 7 GB of AdamW moments per replica under DDP, and
1/N of it per worker under FSDP.

On GPUs the FSDP wrapper comes from Ray Train's ``prepare_model(parallel_strategy="fsdp")``.
Ray refuses FSDP without CUDA, so on CPU (the tests, this machine) we build the same wrapper
with the same arguments ourselves: torch's FSDP runs on CPU over gloo.

Checkpoints keep one format whatever the strategy: the full (unsharded) weights and EMA under
the plain module's parameter names. Under FSDP every rank takes part in gathering them
(:func:`training_snapshot`) and rank 0 writes them; the optimizer state is saved keyed by
parameter name (torch.distributed.checkpoint's full optimizer state dict), which loads under
either strategy. A DDP checkpoint's optimizer state (torch's own, keyed by position) is
translated on the way in (:func:`load_into_sharded`), so a run can switch strategy on resume.

Tested on CPU over gloo (tests/test_training_parallel.py, tests/test_train_job.py). The CUDA
path (Ray's wrapper, NCCL, ``cpu_offload`` gathering) has not run on a GPU yet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .optim import EMA, plain_name, unwrap_model

PARALLEL_STRATEGIES = ("ddp", "fsdp")
# optimizer.pt: torch's optimizer.state_dict() (keyed by position) or keyed by parameter name
OPTIMIZER_FORMATS = ("torch", "by_name")


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def fsdp_wrap_policy() -> Callable:
    """Shard unit = each ResNet block and each transformer block of the UNet (diffusers' own
    classes); what is left (conv_in/out, time and camera embeddings, up/downsamplers) forms
    the root unit."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return ModuleWrapPolicy({BasicTransformerBlock, ResnetBlock2D})


def wrap_model(unet: nn.Module, strategy: str, world: int, device: torch.device) -> nn.Module:
    """The model the loop trains: ``unet`` itself for one worker, else DDP- or FSDP-wrapped.

    Wrap before building the optimizer: FSDP replaces the parameters by views of its shards.
    """
    if strategy not in PARALLEL_STRATEGIES:
        raise ValueError(f"parallel strategy must be one of {PARALLEL_STRATEGIES}, got {strategy!r}")
    if world <= 1:
        return unet
    import ray.train.torch

    if strategy == "ddp":
        return ray.train.torch.prepare_model(
            unet, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": True})
    kwargs = {"auto_wrap_policy": fsdp_wrap_policy(), "use_orig_params": True, "device_id": device}
    if device.type == "cuda":
        return ray.train.torch.prepare_model(unet, move_to_device=False, parallel_strategy="fsdp",
                                             parallel_strategy_kwargs=kwargs)
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(unet, **kwargs)


@torch.no_grad()
def drop_unused_gradients(model: nn.Module) -> None:
    """Under FSDP, give parameters that took no part in this step no gradient (``None``), as
    DDP's ``find_unused_parameters`` does. FSDP reports them as zeros (its gradients are views
    of one flat buffer per block), and AdamW would then keep moving them with its momentum:
    on 2D steps the camera MLP would drift (measured: 7e-3 after one 2D step at lr 1e-2).
    A used parameter whose whole shard has an exactly zero gradient is not told apart; with
    float gradients that does not happen in practice. Call after backward, before clipping."""
    if not is_fsdp(model):
        return
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return
    # One device-to-host read for all parameters: a per-parameter ``.any()`` test would be a
    # CUDA synchronisation per parameter, hundreds per step for an SD-sized UNet.
    used = torch.stack([p.grad.any() for p in params]).tolist()
    for param, is_used in zip(params, used):
        if not is_used:
            param.grad = None


def parameter_ndims(unet: nn.Module) -> dict[str, int]:
    """Each parameter's dimensionality in the plain module, in registration order (FSDP
    flattens its shards to 1-D: the no-weight-decay split is decided from this)."""
    return {name: param.ndim for name, param in unwrap_model(unet).named_parameters()}


def _full(device: torch.device):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload gathers into host memory on rank 0 only; on CPU tensors torch 2.13 crashes in
    # it (SIGSEGV, checked), and there is nothing to offload from
    return StateDictOptions(full_state_dict=True, cpu_offload=device.type == "cuda")


def training_snapshot(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None,
                      device: torch.device) -> dict[str, Any]:
    """What a checkpoint holds: ``{"weights", "ema", "ema_updates", "optimizer",
    "optimizer_format"}``, full weights and EMA keyed by the plain module's names.

    Plain or DDP model: read locally (call on the writing rank only). FSDP: a collective,
    every rank calls it; the result is complete on rank 0.
    """
    ema_updates = None if ema is None else ema.num_updates
    if not is_fsdp(model):
        return {"weights": unwrap_model(model).state_dict(),
                "ema": None if ema is None else ema.state_dict()["shadow"], "ema_updates": ema_updates,
                "optimizer": optimizer.state_dict(), "optimizer_format": "torch"}
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    return {"weights": get_model_state_dict(model, options=_full(device)),
            "ema": None if ema is None else _gathered_average(model, ema, device),
            "ema_updates": ema_updates,
            "optimizer": get_optimizer_state_dict(model, optimizer, options=_full(device)),
            "optimizer_format": "by_name"}


def _gathered_average(model: nn.Module, ema: EMA, device: torch.device) -> dict[str, torch.Tensor]:
    """Collective: the EMA's shards gathered as if they were weights, by name, in float32."""
    gathered = exported_weights(model, ema, device)
    return {name: gathered[name].float() for name in ema.shadow if name in gathered}


def exported_weights(model: nn.Module, ema: EMA | None, device: torch.device) -> dict[str, torch.Tensor]:
    """The weights the run exports (the EMA average when on), full, by name. A collective
    under FSDP; for a plain or DDP model use the module itself instead."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if ema is None:
        return get_model_state_dict(model, options=_full(device))
    with ema.swapped(model):
        return get_model_state_dict(model, options=_full(device))


def optimizer_state_by_name(saved: dict, names: list[str], ndims: dict[str, int]) -> dict:
    """A position-keyed ``optimizer.state_dict()`` from :func:`.optim.build_optimizer` (its
    ``decay`` / ``no_decay`` groups over the trainable parameters in ``names`` order),
    keyed by parameter name the way ``torch.distributed.checkpoint`` writes it."""
    members = {"decay": [n for n in names if ndims[n] >= 2], "no_decay": [n for n in names if ndims[n] < 2]}
    state, groups = {}, []
    for group in saved["param_groups"]:
        kind = group.get("name")
        if kind not in members or len(members[kind]) != len(group["params"]):
            raise ValueError(f"optimizer state group {kind!r} with {len(group['params'])} parameters "
                             "does not match this model")
        for position, name in zip(group["params"], members[kind]):
            if position in saved["state"]:
                state[name] = saved["state"][position]
        groups.append({**group, "params": list(members[kind])})
    return {"state": state, "param_groups": groups}


def load_into_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None, ema: EMA | None,
                      saved: dict[str, Any]) -> None:
    """Collective: full weights, EMA and optimizer state into an FSDP model, its optimizer and
    an EMA over its (sharded) parameters. ``saved`` as from :func:`training_snapshot`."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    if ema is not None and saved.get("ema") is not None:
        # the shadow is sharded like the parameters: load the averages as weights, keep this
        # rank's shards as the shadow, then load the raw weights over them
        set_model_state_dict(model, saved["ema"], options=StateDictOptions(full_state_dict=True, strict=False))
        ema.reset_from(model)
        ema.num_updates = int(saved["ema_updates"] or 0)
    set_model_state_dict(model, saved["weights"], options=options)
    if optimizer is not None:
        state = saved["optimizer"]
        if saved["optimizer_format"] == "torch":
            names = [plain_name(n) for n, p in model.named_parameters() if p.requires_grad]
            state = optimizer_state_by_name(state, names, {k: v.ndim for k, v in saved["weights"].items()})
        set_optimizer_state_dict(model, optimizer, state, options=options)
