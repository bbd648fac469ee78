"""Optimisation pieces: AdamW groups, LR schedule, EMA (incl. under DDP), gradient clipping."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from mvdream_platform.models import MultiViewUNet
from mvdream_platform.training.optim import (
    EMA,
    build_lr_scheduler,
    build_optimizer,
    clip_grad_norm,
    ema_decay,
    maybe_no_sync,
    unwrap_model,
)

from conftest import tiny_sd_unet_config


class Small(nn.Module):
    """Linear + GroupNorm + LayerNorm + a frozen layer: every kind of parameter the split sees."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.GroupNorm(2, 8)
        self.linear = nn.Linear(8, 4)
        self.layer_norm = nn.LayerNorm(4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        h = self.norm(self.conv(x)).mean(dim=(2, 3))
        return self.frozen(self.layer_norm(self.linear(h)))


# ---------------------------------------------------------------------- optimizer
def test_no_weight_decay_on_biases_and_norms():
    model = MultiViewUNet(unet_config=tiny_sd_unet_config(in_channels=3, out_channels=3))
    model.camera_embedding.requires_grad_(False)
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05)
    assert isinstance(optimizer, torch.optim.AdamW)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    decay = {id(p) for p in groups["decay"]["params"]}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}

    norms = (nn.GroupNorm, nn.LayerNorm)
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                assert id(p) not in decay | no_decay, f"{name}.{pname} is frozen"
            elif pname == "bias" or isinstance(module, norms):
                assert id(p) in no_decay, f"{name}.{pname} must not decay"
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                assert id(p) in decay, f"{name}.{pname} must decay"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8


def test_build_optimizer_without_trainable_parameters_fails_clearly():
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), lr=1e-3)


# ---------------------------------------------------------------------- learning rate
def lr_multipliers(steps: int, *args, **kwargs) -> list[float]:
    """lr / base lr after 0, 1, ..., steps optimizer steps of build_lr_scheduler(*args)."""
    optimizer = build_optimizer(nn.Linear(2, 2), lr=1.0)
    scheduler = build_lr_scheduler(optimizer, *args, **kwargs)
    seen = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        seen.append(optimizer.param_groups[0]["lr"])
    return seen


def test_lr_schedules_key_steps():
    constant = lr_multipliers(1000, 10, 110)
    assert constant[0] == 0.0 and constant[5] == 0.5 and constant[10] == 1.0 and constant[1000] == 1.0
    cos = lr_multipliers(110, 10, 110, "cosine", min_lr_ratio=0.1)
    assert cos[0] == 0.0 and cos[10] == pytest.approx(1.0)
    assert cos[60] == pytest.approx(0.55)  # midpoint: halfway to min_lr_ratio
    assert cos[35] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert cos[110] == pytest.approx(0.1)
    assert lr_multipliers(1, 0, 100, "cosine")[0] == 1.0  # no warmup: full rate from the first step


def test_lr_scheduler_drives_the_optimizer_and_round_trips():
    def make():
        model = nn.Linear(2, 2)
        optimizer = build_optimizer(model, lr=1e-3)
        return optimizer, build_lr_scheduler(optimizer, 4, 20, "cosine", min_lr_ratio=0.0)

    optimizer, scheduler = make()
    seen = [optimizer.param_groups[0]["lr"]]
    for _ in range(7):
        optimizer.step()
        scheduler.step()
        seen.append(optimizer.param_groups[0]["lr"])
    expected = [1e-3 * m for m in lr_multipliers(7, 4, 20, "cosine")]
    assert seen == pytest.approx(expected)
    assert all(g["lr"] == seen[-1] for g in optimizer.param_groups)

    state = scheduler.state_dict()
    optimizer2, scheduler2 = make()
    scheduler2.load_state_dict(state)
    optimizer2.load_state_dict(optimizer.state_dict())
    for opt, sched in ((optimizer, scheduler), (optimizer2, scheduler2)):
        opt.step()
        sched.step()
    assert scheduler2.get_last_lr() == pytest.approx(scheduler.get_last_lr())
    assert scheduler2.last_epoch == 8
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_multipliers(8, 4, 20, "cosine")[8])


def test_lr_scheduler_rejects_bad_settings():
    optimizer = build_optimizer(nn.Linear(2, 2), lr=1e-3)
    with pytest.raises(ValueError, match="schedule must be one of"):
        build_lr_scheduler(optimizer, 0, 10, "step")
    with pytest.raises(ValueError, match="total_steps"):
        build_lr_scheduler(optimizer, 10, 10, "cosine")


# ---------------------------------------------------------------------- EMA
def _set_params(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def test_ema_math_exact_for_two_updates():
    model = Small()
    _set_params(model, 0)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ema = EMA(model, decay=0.9999)
    assert set(ema.shadow) == set(start)  # the frozen layer is not averaged

    _set_params(model, 1)
    p1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert ema.update(model) == pytest.approx(2 / 11)
    _set_params(model, 2)
    p2 = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert ema.update(model) == pytest.approx(3 / 12)

    d1, d2 = 2 / 11, 3 / 12
    for name, s0 in start.items():
        s1 = d1 * s0 + (1 - d1) * p1[name]
        s2 = d2 * s1 + (1 - d2) * p2[name]
        torch.testing.assert_close(ema.shadow[name], s2, atol=1e-6, rtol=1e-6)
        assert ema.shadow[name].dtype == torch.float32
    assert ema.num_updates == 2

    assert ema_decay(1, 0.9999) == pytest.approx(2 / 11)
    assert ema_decay(10**6, 0.9999) == 0.9999
    assert ema_decay(1, 0.9, warmup=False) == 0.9
    no_warmup = EMA(model, decay=0.5, warmup=False)
    assert no_warmup.update(model) == 0.5


def test_ema_copy_to_and_swapped():
    model = Small()
    _set_params(model, 0)
    ema = EMA(model, decay=0.5, warmup=False)
    _set_params(model, 1)
    ema.update(model)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}

    with ema.swapped(model) as swapped:
        assert swapped is model
        for name, shadow in ema.shadow.items():
            assert torch.equal(dict(model.named_parameters())[name], shadow)
    for name, p in model.named_parameters():
        assert torch.equal(p, trained[name])  # restored

    ema.copy_to(model)
    assert torch.equal(model.linear.weight, ema.shadow["linear.weight"])
    with pytest.raises(RuntimeError, match="store"):
        ema.restore(model)


def test_ema_state_round_trip(tmp_path):
    model = Small()
    ema = EMA(model, decay=0.99)
    for seed in range(3):
        _set_params(model, seed)
        ema.update(model)
    path = tmp_path / "ema.pt"
    torch.save(ema.state_dict(), path)

    fresh = EMA(Small(), decay=0.99)
    fresh.load_state_dict(torch.load(path))
    assert fresh.num_updates == 3
    for name, tensor in ema.shadow.items():
        assert torch.equal(fresh.shadow[name], tensor)
    _set_params(model, 9)
    assert fresh.update(model) == ema.update(model)
    for name, tensor in ema.shadow.items():
        assert torch.equal(fresh.shadow[name], tensor)

    with pytest.raises(KeyError, match="does not match"):
        EMA(nn.Linear(2, 2)).load_state_dict(ema.state_dict())


def test_ema_keeps_fp32_shadow_of_half_model():
    model = nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(model, decay=0.9, warmup=False)
    assert ema.shadow["weight"].dtype == torch.float32
    ema.update(model)
    ema.copy_to(model)
    assert model.weight.dtype == torch.bfloat16


def test_ema_and_optimizer_unwrap_ddp(process_group):
    model = Small()
    ddp = nn.parallel.DistributedDataParallel(model)
    assert unwrap_model(ddp) is model
    ema = EMA(ddp, decay=0.5, warmup=False)
    assert set(ema.shadow) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(name.startswith("module.") for name in ema.shadow)

    optimizer = build_optimizer(ddp, lr=1e-2)
    ddp(torch.randn(2, 3, 6, 6)).sum().backward()
    optimizer.step()
    ema.update(ddp)
    plain = EMA(model, decay=0.5, warmup=False)
    plain.load_state_dict(ema.state_dict())  # a DDP-run state loads into a plain model's EMA
    ema.copy_to(ddp)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, ema.shadow[name])

    # Accumulation: DDP skips its gradient all-reduce inside no_sync; plain models need nothing.
    with maybe_no_sync(ddp, sync=False):
        assert ddp.require_backward_grad_sync is False
    assert ddp.require_backward_grad_sync is True
    assert isinstance(maybe_no_sync(ddp, sync=True), contextlib.nullcontext)
    assert isinstance(maybe_no_sync(model, sync=False), contextlib.nullcontext)


# ---------------------------------------------------------------------- clipping
def test_clip_returns_the_pre_clip_norm():
    model = Small()
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 2.0)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = 2.0 * math.sqrt(count)

    assert clip_grad_norm(model, 0.0) == pytest.approx(expected, rel=1e-6)  # disabled: no clip
    assert model.linear.weight.grad[0, 0] == 2.0
    assert clip_grad_norm(model, 1.0) == pytest.approx(expected, rel=1e-6)
    clipped = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
    )
    assert float(clipped) == pytest.approx(1.0, rel=1e-4)
    assert clip_grad_norm(nn.Linear(2, 2), 1.0) == 0.0  # no gradients yet
