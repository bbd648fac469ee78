"""Turn a training checkpoint into an MVDreamPipeline folder (e.g. to evaluate mid-run)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from .. import storage
from ..pipelines.loading import ModelConfig, build_pipeline
from .checkpointing import verify_checkpoint


def export_checkpoint(checkpoint_dir: str | os.PathLike, model: ModelConfig, out_uri: str, *,
                      use_ema: bool = True, prediction_type: str | None = None) -> str:
    """Write ``out_uri`` as a pipeline with the checkpoint's weights (its EMA weights if present
    and ``use_ema``); ``model`` must describe the architecture the run trained, and
    ``prediction_type`` the run's ``trainer.prediction_type`` (``None``: the model's own)."""
    folder = Path(checkpoint_dir)
    verify_checkpoint(folder)  # CorruptCheckpoint (a ValueError): incomplete or damaged
    pipe = build_pipeline(model)
    weights = load_file(folder / "model.safetensors")
    if use_ema and (folder / "ema.safetensors").is_file():
        weights.update(load_file(folder / "ema.safetensors"))  # EMA covers trainable params
    pipe.unet.load_state_dict(weights, strict=True)
    if prediction_type is not None:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config,
                                                          prediction_type=prediction_type)
    with tempfile.TemporaryDirectory(prefix="mvdream-export-") as tmp:
        pipe.save_pretrained(tmp)
        storage.put_dir(tmp, out_uri)
    return out_uri
