"""Training-state checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint folder holds::

    model.safetensors      the trainable model's weights (unwrapped from DDP)
    ema.safetensors        the EMA weights, when EMA is on
    optimizer.pt           optimizer state (torch.save; tensors + per-parameter-group settings)
    state.json             step, lr-scheduler state, data-loader position, RNG states
    COMPLETE               written last: a folder without it is never loaded

Ray Train copies the folder to the run's storage and registers it only after the copy, and
we refuse folders without ``COMPLETE`` as a second line of defence, so a crash mid-write can
never produce a checkpoint that loads as if it were whole.
"""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .optim import unwrap_model

COMPLETE = "COMPLETE"


def rng_state() -> dict[str, str]:
    """Python, numpy and torch RNG states, JSON-able (base64 for the binary ones)."""
    import pickle

    return {
        "python": base64.b64encode(pickle.dumps(random.getstate())).decode(),
        "numpy": base64.b64encode(pickle.dumps(np.random.get_state())).decode(),
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }


def set_rng_state(state: dict[str, str]) -> None:
    import pickle

    random.setstate(pickle.loads(base64.b64decode(state["python"])))  # noqa: S301 - our own file
    np.random.set_state(pickle.loads(base64.b64decode(state["numpy"])))  # noqa: S301
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))


def save_training_state(folder: str | os.PathLike, *, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, lr_scheduler: Any, step: int,
                        ema: Any = None, loader_state: dict | None = None,
                        extra: dict | None = None) -> Path:
    """Write a complete checkpoint into ``folder`` (created); ``COMPLETE`` goes last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in unwrap_model(model).state_dict().items()}
    save_file(weights, folder / "model.safetensors")
    if ema is not None:
        save_file({k: v.cpu().contiguous() for k, v in ema.state_dict()["shadow"].items()},
                  folder / "ema.safetensors")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    state = {
        "step": int(step),
        "lr_scheduler": lr_scheduler.state_dict(),
        "loader": loader_state or {},
        "rng": rng_state(),
        "ema": None if ema is None else {k: v for k, v in ema.state_dict().items() if k != "shadow"},
        "extra": extra or {},
    }
    (folder / "state.json").write_text(json.dumps(state, default=_jsonable))
    (folder / COMPLETE).write_text(str(step))
    return folder


def load_training_state(folder: str | os.PathLike, *, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer | None = None, lr_scheduler: Any = None,
                        ema: Any = None, restore_rng: bool = True) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote; returns ``state.json`` (step, loader, ...).

    Raises ``ValueError`` for an incomplete folder (no ``COMPLETE`` marker).
    """
    folder = Path(folder)
    if not (folder / COMPLETE).is_file():
        raise ValueError(f"checkpoint {folder} is incomplete (no {COMPLETE} marker); refusing to load it")
    unwrap_model(model).load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    state = json.loads((folder / "state.json").read_text())
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    if ema is not None and (folder / "ema.safetensors").is_file():
        ema.load_state_dict({**(state.get("ema") or {}), "shadow": load_file(folder / "ema.safetensors")})
    if restore_rng:
        set_rng_state(state["rng"])
    return state


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.generic,)):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in state.json")
