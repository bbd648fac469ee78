"""FSDP and torch.compile behind config (issue 21 §5), on CPU at tiny size.

Two real gloo processes (torch.multiprocessing, no Ray: Ray Train's ``prepare_model`` refuses
FSDP without CUDA, so on CPU ``parallel.wrap_model`` builds the same wrapper itself; the Ray
path is exercised by ``test_train_job.py``). The tiny multi-view UNet is trained on fixed
synthetic batches with the loop's own pieces (``diffusion_loss``, ``build_optimizer`` with the
plain module's ndims, ``clip_grad_norm``, ``EMA``), once under FSDP and once under DDP:
- FSDP's losses and weights equal DDP's (the same maths, sharded);
- an FSDP checkpoint at step 2 resumes to the exact step-3 weights of the uninterrupted run;
- an FSDP checkpoint has the plain model's names and shapes and loads into a plain model;
- a DDP checkpoint (position-keyed optimizer state) resumes under FSDP.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from mvdream_platform.config import build
from mvdream_platform.diffusion import NoiseSchedule
from mvdream_platform.pipelines.loading import ModelConfig, build_pipeline
from mvdream_platform.training.checkpointing import load_training_state, write_training_state
from mvdream_platform.training.losses import diffusion_loss
from mvdream_platform.training.optim import (
    EMA,
    build_lr_scheduler,
    build_optimizer,
    clip_grad_norm,
    unwrap_model,
)
from mvdream_platform.training.parallel import (
    drop_unused_gradients,
    is_fsdp,
    parameter_ndims,
    training_snapshot,
    wrap_model,
)

pytestmark = pytest.mark.slow

TINY_UNET = {"block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": [1, 2],
             "norm_num_groups": 4, "sample_size": 8, "layers_per_block": 1}


def _unet():
    config = build(ModelConfig, {"name": "t", "source": "init", "camera_dim": 16,
                                 "text_encoder": {"kind": "minilm", "max_length": 8},
                                 "unet": {"in_channels": 3, "out_channels": 3, "cross_attention_dim": 384,
                                          "use_linear_projection": True, **TINY_UNET}}, "model")
    return build_pipeline(config, seed=0).unet


def _batch(step: int, rank: int, kind: str):
    """A fixed batch per (step, rank): 2 objects x 4 views with cameras, or 4 plain images."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    frames = 4 if kind == "multiview" else 1
    n = 2 * frames if frames == 4 else 4
    camera = torch.randn(n, 16, generator=g) if frames == 4 else None
    return (torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 384, generator=g), camera, frames)


KINDS = ["multiview", "image", "multiview"]


def _setup(strategy: str, world: int):
    unet = _unet()
    ndims = parameter_ndims(unet)
    if strategy == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(unet, find_unused_parameters=True)
    else:
        model = wrap_model(unet, strategy, world, torch.device("cpu"))
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.01, ndims=ndims)
    scheduler = build_lr_scheduler(optimizer, warmup_steps=1)
    return unet, model, optimizer, scheduler, EMA(model, decay=0.9)


def _step(model, optimizer, scheduler, ema, schedule, step: int, rank: int) -> float:
    x0, context, camera, frames = _batch(step, rank, KINDS[step])
    optimizer.zero_grad(set_to_none=True)
    loss, _ = diffusion_loss(model, x0, context, camera, frames, schedule,
                             generator=torch.Generator().manual_seed(step * 10 + rank))
    loss.backward()
    drop_unused_gradients(model)
    clip_grad_norm(model, 1.0)
    optimizer.step()
    scheduler.step()
    ema.update(model)
    return float(loss.detach())


def _worker(rank: int, world: int, port: int, out: str, scenario: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        schedule = NoiseSchedule.from_scheduler_config({"num_train_timesteps": 1000})
        strategy, _, resume = scenario.partition(":")
        unet, model, optimizer, scheduler, ema = _setup(strategy, world)
        start = 0
        if resume:  # a checkpoint written at step 2 by another run (either strategy)
            start = load_training_state(os.path.join(out, resume), model=model, optimizer=optimizer,
                                        lr_scheduler=scheduler, ema=ema)["step"]
        losses = []
        for step in range(start, 3):
            losses.append(_step(model, optimizer, scheduler, ema, schedule, step, rank))
            if step == 1 and not resume:
                snapshot = training_snapshot(model, optimizer, ema, torch.device("cpu"))  # all ranks
                if rank == 0:
                    write_training_state(os.path.join(out, f"{strategy}-ckpt"), snapshot,
                                         lr_scheduler=scheduler, step=2)
        final = training_snapshot(model, optimizer, ema, torch.device("cpu"))
        if rank == 0:
            torch.save({"losses": losses, "weights": final["weights"], "ema": final["ema"],
                        "fsdp": is_fsdp(model)}, os.path.join(out, scenario.replace(":", "-") + ".pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(scenario: str, out) -> dict:
    mp.spawn(_worker, args=(2, _free_port(), str(out), scenario), nprocs=2, join=True)
    return torch.load(out / (scenario.replace(":", "-") + ".pt"), weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    return out, {name: _run(name, out) for name in ("ddp", "fsdp")}


def _close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol), name


def test_fsdp_trains_like_ddp(runs):
    _, results = runs
    ddp, fsdp = results["ddp"], results["fsdp"]
    assert fsdp["fsdp"] and not ddp["fsdp"]
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-5)
    _close(fsdp["weights"], ddp["weights"], atol=1e-5)
    _close(fsdp["ema"], ddp["ema"], atol=1e-5)
    plain = _unet()  # full weights under the plain module's names and shapes
    assert {k: v.shape for k, v in fsdp["weights"].items()} == {k: v.shape for k, v in plain.state_dict().items()}
    # the multi-view and the 2D steps both trained: weights moved from the seeded start
    assert any(not torch.equal(fsdp["weights"][k], v) for k, v in plain.state_dict().items())


def test_an_fsdp_checkpoint_resumes_exactly(runs):
    out, results = runs
    resumed = _run("fsdp:fsdp-ckpt", out)
    assert len(resumed["losses"]) == 1 and resumed["losses"][0] == results["fsdp"]["losses"][2]
    _close(resumed["weights"], results["fsdp"]["weights"], atol=0)
    _close(resumed["ema"], results["fsdp"]["ema"], atol=0)


def test_an_fsdp_checkpoint_loads_into_a_plain_model_and_ddp_resumes_under_fsdp(runs):
    out, results = runs
    folder = out / "fsdp-ckpt"
    assert load_file(folder / "model.safetensors").keys() == _unet().state_dict().keys()
    unet = _unet()
    optimizer = build_optimizer(unet, lr=1e-2, weight_decay=0.01)
    scheduler = build_lr_scheduler(optimizer, warmup_steps=1)
    ema = EMA(unet, decay=0.9)
    state = load_training_state(folder, model=unet, optimizer=optimizer, lr_scheduler=scheduler, ema=ema)
    assert state["step"] == 2 and state["optimizer_format"] == "by_name"
    assert ema.num_updates == 2
    assert all(len(s) == 3 for s in optimizer.state.values()) and len(optimizer.state) > 0
    # a DDP-written checkpoint (position-keyed optimizer state) continues under FSDP
    shutil.copytree(out / "ddp-ckpt", out / "ddp-ckpt-copy")
    switched = _run("fsdp:ddp-ckpt-copy", out)
    assert switched["losses"][0] == pytest.approx(results["ddp"]["losses"][2], rel=1e-5)
    _close(switched["weights"], results["ddp"]["weights"], atol=1e-5)


def test_compiled_unet_matches_eager_and_keeps_its_names():
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("torch.compile's CPU backend needs a C++ compiler")
    eager, compiled = _unet(), _unet()
    compiled.compile()
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    assert unwrap_model(compiled) is compiled
    schedule = NoiseSchedule.from_scheduler_config({"num_train_timesteps": 1000})
    for step in range(2):  # a multi-view and a 2D batch: two graphs
        x0, context, camera, frames = _batch(step, 0, KINDS[step])
        losses = []
        for model in (eager, compiled):
            model.zero_grad()
            loss, _ = diffusion_loss(model, x0, context, camera, frames, schedule,
                                     generator=torch.Generator().manual_seed(step))
            loss.backward()
            losses.append(float(loss.detach()))
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            if a.grad is not None:
                assert torch.allclose(a.grad, b.grad, atol=1e-6), name
