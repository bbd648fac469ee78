"""Glue shared by the Hydra entry points: config -> library dataclasses, device, run records.

Lives beside the jobs (not in the library) because it is the only code that touches OmegaConf.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from mvdream_platform import storage
from mvdream_platform.config import build
from mvdream_platform.pipelines.loading import ModelConfig

log = logging.getLogger("jobs")


def model_config_from(node: DictConfig) -> ModelConfig:
    """The ``model`` config group as a :class:`ModelConfig` (unknown keys are an error)."""
    return build(ModelConfig, OmegaConf.to_container(node, resolve=True, throw_on_missing=True), "model")


def warn_unknown_words(model: ModelConfig, prompts: list[str]) -> list[str]:
    """One warning line per prompt with words a closed-vocabulary model never read; returns them."""
    if model.vocabulary != "shapes":
        return []
    from mvdream_platform.data.shapes import ADJECTIVES, COLOURS, SHAPES, unknown_words

    lines = []
    for prompt in prompts:
        words = unknown_words(prompt)
        if words:
            lines.append(f"model {model.name!r} has never read {', '.join(repr(w) for w in words)} in "
                         f"{prompt!r}: it knows {len(SHAPES)} shapes ({', '.join(SHAPES)}), {len(COLOURS)} "
                         f"colours, {'/'.join(ADJECTIVES)}, 'on top of', 'next to', 'with a ... front' "
                         f"(README: what the embedded default knows); expect a generic blob")
    for line in lines:
        log.warning(line)
    return lines


def save_resolved_config(cfg: DictConfig, out: str) -> None:
    """Write the fully resolved config as ``config.yaml`` into the job's output folder."""
    storage.write_text(storage.join(out, "config.yaml"), OmegaConf.to_yaml(cfg, resolve=True))
