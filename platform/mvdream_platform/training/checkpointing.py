"""Training-state checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint folder holds::

    model.safetensors      the trainable model's weights (full, unwrapped from DDP / FSDP)
    ema.safetensors        the EMA weights, when EMA is on
    optimizer.pt           optimizer state (torch.save; tensors + per-parameter-group settings;
                           keyed by position, or by parameter name when written under FSDP)
    state.json             step, lr-scheduler state, data-loader position, RNG states,
                           the optimizer state's format
    manifest.json          size and SHA-256 of each file above
    COMPLETE               written last (holds the step): a folder without it is never loaded

Ray Train copies the folder to the run's storage and registers it only after the copy, and
we refuse folders without ``COMPLETE`` as a second line of defence, so a crash mid-write can
never produce a checkpoint that loads as if it were whole. A checkpoint damaged *after* it was
written (a truncated copy, a disk fault) fails :func:`verify_checkpoint` before anything is
loaded from it, and :func:`restore_newest_good` resumes from the newest intact checkpoint of
the run instead (Ray Train's own list of checkpoints is left as it is).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..storage import jsonable
from .optim import unwrap_model
from .parallel import OPTIMIZER_FORMATS, is_fsdp, load_into_sharded, training_snapshot

COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


class CorruptCheckpoint(ValueError):
    """A checkpoint folder that is incomplete or does not match its manifest."""


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
    """Write a complete checkpoint of a plain or DDP model into ``folder`` (created).

    Under FSDP gathering the state is a collective: every rank calls
    :func:`.parallel.training_snapshot`, then one rank :func:`write_training_state`.
    """
    snapshot = training_snapshot(model, optimizer, ema, torch.device("cpu"))
    return write_training_state(folder, snapshot, lr_scheduler=lr_scheduler, step=step,
                                loader_state=loader_state, extra=extra)


def write_training_state(folder: str | os.PathLike, snapshot: dict[str, Any], *, lr_scheduler: Any,
                         step: int, loader_state: dict | None = None, extra: dict | None = None) -> Path:
    """Write ``snapshot`` (:func:`.parallel.training_snapshot`) as a checkpoint folder (created);
    ``COMPLETE`` goes last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in snapshot["weights"].items()}
    save_file(weights, folder / "model.safetensors")
    if snapshot["ema"] is not None:
        save_file({k: v.cpu().contiguous() for k, v in snapshot["ema"].items()}, folder / "ema.safetensors")
    torch.save(snapshot["optimizer"], folder / "optimizer.pt")
    state = {
        "step": int(step),
        "lr_scheduler": lr_scheduler.state_dict(),
        "loader": loader_state or {},
        "rng": rng_state(),
        "ema": None if snapshot["ema"] is None else {"num_updates": snapshot["ema_updates"]},
        "optimizer_format": snapshot["optimizer_format"],
        "extra": extra or {},
    }
    (folder / "state.json").write_text(json.dumps(state, default=partial(jsonable, strict=True)))
    manifest = {f.name: _describe(f) for f in sorted(folder.iterdir()) if f.name not in (MANIFEST, COMPLETE)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    (folder / COMPLETE).write_text(str(step))
    return folder


def _describe(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def verify_checkpoint(folder: str | os.PathLike) -> int:
    """Check a checkpoint folder against its manifest; returns its step.

    Raises:
        CorruptCheckpoint: no ``COMPLETE`` marker, an unreadable manifest, or a file that is
            missing or whose size or SHA-256 differs (the message names the file). Folders
            written before manifests existed are checked for ``COMPLETE`` only.
    """
    folder = Path(folder)
    try:
        step = int((folder / COMPLETE).read_text().strip() or -1)
    except FileNotFoundError:
        raise CorruptCheckpoint(f"checkpoint {folder} is incomplete (no {COMPLETE} marker); "
                                "refusing to load it") from None
    except ValueError:
        raise CorruptCheckpoint(f"checkpoint {folder}: {COMPLETE} does not hold a step") from None
    if not (folder / MANIFEST).is_file():
        return step  # an older checkpoint: nothing more to compare against
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptCheckpoint(f"checkpoint {folder}: {MANIFEST} is unreadable ({error})") from None
    for name, expected in sorted(manifest.items()):
        path = folder / name
        if not path.is_file():
            raise CorruptCheckpoint(f"checkpoint {folder}: {name} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CorruptCheckpoint(f"checkpoint {folder}: {name} has {size} bytes, "
                                    f"the manifest says {expected['bytes']}")
        if _describe(path)["sha256"] != expected["sha256"]:
            raise CorruptCheckpoint(f"checkpoint {folder}: {name} does not match its SHA-256")
    return step


def restore_newest_good(latest: Any, siblings: Callable[[], list[Any]],
                        load: Callable[[str], dict[str, Any]]) -> tuple[dict[str, Any], Any]:
    """Load the newest intact checkpoint: ``latest`` first, then older ones, newest first.

    ``latest`` and the items of ``siblings()`` are ``ray.train.Checkpoint``-like objects
    (``.path`` and ``.as_directory()``); ``load(folder)`` verifies and loads one folder and
    returns its state. A checkpoint that fails verification or loading is skipped with a
    warning naming why; ``siblings`` is only listed when ``latest`` is bad.

    Returns (state, the checkpoint it came from). Raises ``RuntimeError`` listing every reason
    when no checkpoint of the run is intact.
    """
    problems: list[str] = []
    candidates = [latest]
    tried: set[str] = set()
    listed = False
    while True:
        while candidates:
            checkpoint = candidates.pop(0)
            if str(checkpoint.path) in tried:
                continue
            tried.add(str(checkpoint.path))
            try:
                with checkpoint.as_directory() as folder:
                    state = load(folder)
            except Exception as error:  # verification, or a loader refusing damaged bytes
                problems.append(f"{checkpoint.path}: {error}")
                log.warning("skipping damaged checkpoint %s (%s); trying an older one", checkpoint.path, error)
                continue
            if problems:
                log.warning("resumed from %s (step %s), the newest intact checkpoint", checkpoint.path,
                            state.get("step"))
            return state, checkpoint
        if listed:
            raise RuntimeError("no intact checkpoint to resume from:\n  " + "\n  ".join(problems))
        candidates, listed = list(siblings()), True


def read_training_state(folder: str | os.PathLike) -> dict[str, Any]:
    """Verify a checkpoint folder, then read it: ``{"weights", "ema", "ema_updates",
    "optimizer", "optimizer_format", "state"}`` (``state`` is ``state.json``).

    Raises :class:`CorruptCheckpoint` (a ``ValueError``) for a folder that is incomplete or
    does not match its manifest (:func:`verify_checkpoint`).
    """
    folder = Path(folder)
    verify_checkpoint(folder)
    state = json.loads((folder / "state.json").read_text())
    has_ema = (folder / "ema.safetensors").is_file()
    optimizer_format = state.get("optimizer_format", "torch")  # older checkpoints: torch's own
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise CorruptCheckpoint(f"checkpoint {folder}: unknown optimizer_format {optimizer_format!r}")
    return {"weights": load_file(folder / "model.safetensors"),
            "ema": load_file(folder / "ema.safetensors") if has_ema else None,
            "ema_updates": (state.get("ema") or {}).get("num_updates", 0),
            "optimizer": torch.load(folder / "optimizer.pt", weights_only=True),
            "optimizer_format": optimizer_format, "state": state}


def load_training_state(folder: str | os.PathLike, *, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer | None = None, lr_scheduler: Any = None,
                        ema: Any = None, restore_rng: bool = True) -> dict[str, Any]:
    """Restore what :func:`write_training_state` wrote; returns ``state.json`` (step, loader, ...).

    ``model`` may be plain, DDP- or FSDP-wrapped (then every rank calls this: loading into
    shards is a collective); the optimizer state loads whichever strategy wrote it. Raises
    :class:`CorruptCheckpoint` (a ``ValueError``) for a folder that is incomplete or does not
    match its manifest, before anything is loaded.
    """
    saved = read_training_state(folder)
    if is_fsdp(model):
        load_into_sharded(model, optimizer, ema, saved)
    else:
        unwrap_model(model).load_state_dict(saved["weights"], strict=True)
        if optimizer is not None and saved["optimizer_format"] == "torch":
            optimizer.load_state_dict(saved["optimizer"])
        elif optimizer is not None:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            set_optimizer_state_dict(model, optimizer, saved["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        if ema is not None and saved["ema"] is not None:
            ema.load_state_dict({"num_updates": saved["ema_updates"], "shadow": saved["ema"]})
    state = saved["state"]
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return state
