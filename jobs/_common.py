"""Glue shared by the Hydra entry points: config -> library dataclasses, device, run records.

Lives beside the jobs (not in the library) because it is the only code that touches OmegaConf.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mvdream_platform import storage
from mvdream_platform.config import build
from mvdream_platform.pipelines.loading import ModelConfig

log = logging.getLogger("jobs")
MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "conf" / "model"


def expand_model_overrides(overrides: list[str]) -> list[str]:
    """Let ``model=`` name a pipeline folder as well as a conf/model/ config.

    Hydra reads ``model=X`` as "the config group option X", so ``model=outputs/runs/r/pipeline``
    or ``model=s3://bucket/model`` would fail to compose. Any ``model=X`` where X is not a
    conf/model/ name becomes ``model=trained model.path=X`` (a saved MVDreamPipeline).
    """
    names = {p.stem for p in MODEL_CONFIGS.glob("*.yaml")}
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key == "model" and value and value not in names:
            out += ["model=trained", f"model.path={value}"]
        else:
            out.append(item)
    return out


def expand_model_argv() -> None:
    """Apply :func:`expand_model_overrides` to this process's command line (before Hydra)."""
    sys.argv[1:] = expand_model_overrides(sys.argv[1:])


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
