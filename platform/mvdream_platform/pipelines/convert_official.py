"""Official MVDream checkpoints -> model folders or complete MVDreamPipeline folders.

The key-for-key conversion lives in :mod:`mvdream_platform.models.convert_official`; this
module assembles its models into a pipeline and writes the result, atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from .. import storage
from ..models.codecs import LatentCodec
from ..models.convert_official import ConversionError, ConversionResult, convert_models
from .pipeline_mvdream import MVDreamPipeline

log = logging.getLogger(__name__)

__all__ = ["assemble_pipeline", "convert_checkpoint", "write_conversion"]


def convert_checkpoint(ckpt_path: str | os.PathLike, config_path: str | os.PathLike,
                       out_dir: str | os.PathLike | None = None, *, overwrite: bool = False,
                       dtype: torch.dtype = torch.float32,
                       text_encoder_path: str | os.PathLike | None = None) -> ConversionResult:
    """Convert an official MVDream checkpoint + config; optionally write it to ``out_dir``.

    ``out_dir`` is a local folder or an fsspec URI. Writes ``out_dir/unet``
    (``MultiViewUNet.from_pretrained``), ``out_dir/vae`` when the checkpoint has a VAE, and
    ``out_dir/conversion.json``, all at once (see :func:`write_conversion`). An existing
    non-empty ``out_dir`` is an error unless ``overwrite``. With ``text_encoder_path`` (an SD
    folder whose text encoder matches the checkpoint) and a VAE in the checkpoint, ``out_dir``
    becomes a complete ``MVDreamPipeline`` folder (``model_index.json``, ``unet/``, ``codec/``
    holding the VAE, ``text_encoder/``, ``scheduler/``) instead of ``unet/`` + ``vae/``.

    Raises:
        ConversionError: (a ``ValueError``) unreadable or mismatched checkpoint, unsupported
            config; its subclasses say which.
        FileNotFoundError: a missing input file. FileExistsError: an existing output.
    """
    if out_dir is not None:
        _check_target(out_dir, overwrite)  # fail before the expensive part
    result = convert_models(ckpt_path, config_path, dtype=dtype, text_encoder_path=text_encoder_path)
    if out_dir is not None:
        write_conversion(result, out_dir, overwrite=overwrite)
    return result


def write_conversion(result: ConversionResult, out_dir: str | os.PathLike, *,
                     overwrite: bool = False) -> str:
    """Write ``unet/``, ``vae/`` and ``conversion.json`` into ``out_dir`` (path or fsspec URI).

    Everything is written into a hidden sibling folder first and renamed into place only when
    complete, so a crash never leaves a partial output under ``out_dir``. Remote targets are
    staged locally and uploaded by :func:`mvdream_platform.storage.put_dir`.
    """
    _check_target(out_dir, overwrite)
    if not storage.is_local(out_dir):
        with tempfile.TemporaryDirectory(prefix="mvdream-convert-") as staging:
            _write_folder(result, Path(staging) / "out")
            storage.put_dir(Path(staging) / "out", out_dir)
    else:
        target = Path(storage.local_path(out_dir))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            _write_folder(result, tmp)
            _replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    result.out_dir = os.fspath(out_dir)
    log.info("wrote %s", out_dir)
    return result.out_dir


def _write_folder(result: ConversionResult, folder: Path) -> None:
    folder.mkdir()
    if result.vae is not None and result.text_encoder is not None:
        assemble_pipeline(result).save_pretrained(folder)
        result.record["layout"] = "pipeline"
    else:
        result.unet.save_pretrained(folder / "unet")
        if result.vae is not None:
            result.vae.save_pretrained(folder / "vae")
        result.record["layout"] = "unet+vae" if result.vae is not None else "unet"
    (folder / "conversion.json").write_text(json.dumps(result.record, indent=2) + "\n")


def assemble_pipeline(result: ConversionResult) -> MVDreamPipeline:
    """An :class:`MVDreamPipeline` from a conversion that has a VAE and a text encoder.

    The scheduler is DDIM on the checkpoint's schedule with the official sampler's choices:
    timesteps 1, 1+c, ... (``steps_offset=1``), the final step to alpha_bar[0]
    (``set_alpha_to_one=False``) and no clipping of x0 (latent space).
    """
    if result.vae is None or result.text_encoder is None:
        raise ConversionError("a pipeline needs both a VAE (in the checkpoint) and a text encoder")
    codec = LatentCodec.from_vae(result.vae)  # scaling_factor from the config's scale_factor
    scheduler = DDIMScheduler(**result.scheduler_config, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return MVDreamPipeline(unet=result.unet, text_encoder=result.text_encoder, codec=codec,
                           scheduler=scheduler)


def _check_target(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to replace an existing output (an empty local folder does not count)."""
    if overwrite or not storage.exists(out_dir):
        return
    if storage.is_local(out_dir):
        local = Path(storage.local_path(out_dir))
        if local.is_dir() and not any(local.iterdir()):
            return
    raise FileExistsError(f"output {os.fspath(out_dir)} already exists (use overwrite=True / --overwrite)")


def _replace_dir(src: Path, target: Path) -> None:
    """Rename ``src`` to ``target``, moving an existing ``target`` aside first."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
    try:
        src.rename(target)
    except BaseException:
        if old is not None:  # put the previous output back
            old.rename(target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
