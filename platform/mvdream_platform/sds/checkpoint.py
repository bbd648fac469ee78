"""Field checkpoints of a text-to-3D run: resumable, never half-written.

Layout under ``<out>/checkpoints/`` (any fsspec URI):

* ``modules-<step>.safetensors``: field, background (and any other module) weights, keys
  prefixed by module name (``field.``, ``background.``);
* ``optimizer-<step>.pt``: the optimizer state (torch.save bytes);
* ``latest.json``: ``{"step": int, "modules": name, "optimizer": name}``, written last and
  atomically. It is the commit: a crash before it leaves the previous checkpoint in force,
  and files of an uncommitted step are simply overwritten or removed later.
"""

from __future__ import annotations

import io
import logging

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .. import storage

log = logging.getLogger(__name__)

LATEST = "latest.json"


def save_checkpoint(folder: str, step: int, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer, keep: int = 1) -> None:
    """Write step ``step``'s weights and optimizer state, commit it, drop older ones."""
    tensors = {f"{name}.{key}": value.detach().cpu().contiguous()
               for name, module in modules.items() for key, value in module.state_dict().items()}
    weights, optim = f"modules-{step:07d}.safetensors", f"optimizer-{step:07d}.pt"
    storage.write_bytes(storage.join(folder, weights), save_safetensors(tensors))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    storage.write_bytes(storage.join(folder, optim), buffer.getvalue())
    previous = read_latest(folder)
    storage.write_json(storage.join(folder, LATEST), {"step": step, "modules": weights, "optimizer": optim})
    if previous is not None and previous["step"] != step and keep <= 1:
        _remove(folder, previous["modules"], previous["optimizer"])


def read_latest(folder: str) -> dict | None:
    """The committed checkpoint's record, or None when there is none."""
    path = storage.join(folder, LATEST)
    return storage.read_json(path) if storage.exists(path) else None


def load_checkpoint(folder: str, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None) -> int:
    """Restore the committed checkpoint into ``modules``/``optimizer``; returns its step (0 if none).

    Raises:
        ValueError: naming the module whose weights do not match (a different field config).
    """
    latest = read_latest(folder)
    if latest is None:
        return 0
    tensors = load_safetensors(storage.read_bytes(storage.join(folder, latest["modules"])))
    for name, module in modules.items():
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"checkpoint {folder}/{latest['modules']} does not fit the {name!r} "
                             f"of this config (was the run started with other settings?): {error}") from error
    if optimizer is not None:
        state = torch.load(io.BytesIO(storage.read_bytes(storage.join(folder, latest["optimizer"]))),
                           map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state)
    return int(latest["step"])


def _remove(folder: str, *names: str) -> None:
    for name in names:
        try:
            storage.remove(storage.join(folder, name))
        except Exception as error:  # an old file left behind costs disk, never correctness
            log.debug("could not remove %s/%s: %s", folder, name, error)
