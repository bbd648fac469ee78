"""Training checkpoints verify themselves: a damaged one is refused before anything loads, and a
resume falls back to the newest intact checkpoint of the run."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mvdream_platform.training.checkpointing import (
    MANIFEST,
    CorruptCheckpoint,
    load_training_state,
    restore_newest_good,
    save_training_state,
    verify_checkpoint,
)
from mvdream_platform.training.optim import build_lr_scheduler, build_optimizer


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))


def _save(folder, seed: int, step: int):
    model = _model(seed)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler = build_lr_scheduler(optimizer, warmup_steps=1, total_steps=10)
    save_training_state(folder, model=model, optimizer=optimizer, lr_scheduler=scheduler, step=step)
    return model


def _fresh():
    model = _model(99)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    return model, optimizer, build_lr_scheduler(optimizer, warmup_steps=1, total_steps=10)


def test_manifest_names_every_file_and_a_damaged_file_is_refused_before_loading(tmp_path):
    _save(tmp_path / "c", seed=0, step=7)
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert set(manifest) == {"model.safetensors", "optimizer.pt", "state.json"}
    assert verify_checkpoint(tmp_path / "c") == 7

    model, optimizer, scheduler = _fresh()
    before = [p.detach().clone() for p in model.parameters()]
    weights = tmp_path / "c" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a truncated copy
    with pytest.raises(CorruptCheckpoint, match="model.safetensors has .* bytes"):
        load_training_state(tmp_path / "c", model=model, optimizer=optimizer, lr_scheduler=scheduler)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(CorruptCheckpoint, match="model.safetensors does not match its SHA-256"):
        verify_checkpoint(tmp_path / "c")
    (tmp_path / "c" / "optimizer.pt").unlink()
    with pytest.raises(CorruptCheckpoint, match="optimizer.pt is missing|model.safetensors"):
        verify_checkpoint(tmp_path / "c")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing was loaded
    (tmp_path / "c" / "COMPLETE").unlink()
    with pytest.raises(CorruptCheckpoint, match="incomplete"):
        verify_checkpoint(tmp_path / "c")


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    from ray.train import Checkpoint

    older = _save(tmp_path / "checkpoint_1", seed=1, step=2)
    _save(tmp_path / "checkpoint_2", seed=2, step=4)
    (tmp_path / "checkpoint_2" / "model.safetensors").write_bytes(b"")  # the newest is damaged
    checkpoints = [Checkpoint(str(tmp_path / n)) for n in ("checkpoint_2", "checkpoint_1")]
    model, optimizer, scheduler = _fresh()

    def load(folder):
        return load_training_state(folder, model=model, optimizer=optimizer, lr_scheduler=scheduler)

    listed = []

    def siblings():
        listed.append(True)
        return checkpoints

    state, used = restore_newest_good(checkpoints[0], siblings, load)
    assert state["step"] == 2 and used.path == checkpoints[1].path and listed == [True]
    assert all(torch.equal(a, b) for a, b in zip(older.parameters(), model.parameters()))

    # an intact newest checkpoint is used without listing the others
    listed.clear()
    state, used = restore_newest_good(checkpoints[1], siblings, load)
    assert state["step"] == 2 and listed == []

    # none intact: one error that names every checkpoint and why
    (tmp_path / "checkpoint_1" / "state.json").write_text("{}")
    with pytest.raises(RuntimeError, match="no intact checkpoint(.|\n)*checkpoint_2(.|\n)*checkpoint_1"):
        restore_newest_good(checkpoints[0], siblings, load)
