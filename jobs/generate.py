"""Text -> multi-view images.

    python jobs/generate.py prompt="a red cube" model=tiny seed=0 out=outputs/red_cube
    python jobs/generate.py model=sd21_base model.path=/models/sd21 prompt="a corgi" steps=30
"""

from __future__ import annotations

import _starting  # noqa: F401  (its first line, before the heavy imports below)

# isort: split
import logging

import hydra
from omegaconf import DictConfig

from mvdream_platform.generation import GenerationRequest, generate, write_generation
from mvdream_platform.pipelines.loading import build_pipeline, pick_device

from _common import model_config_from, save_resolved_config, warn_unknown_words

log = logging.getLogger("generate")


def run(cfg: DictConfig) -> dict:
    """Sample and write; returns the ``generation.json`` record."""
    model_cfg = model_config_from(cfg.model)
    if not model_cfg.trained:
        log.warning("model %r is UNTRAINED (random weights): the images are noise-like; "
                    "train one with jobs/train.py or point model= at real weights", model_cfg.name)
    prompts = [cfg.prompt] if isinstance(cfg.prompt, str) else list(cfg.prompt)
    warn_unknown_words(model_cfg, prompts)
    request = GenerationRequest(
        prompts=prompts,
        **{k: cfg[k] for k in ("negative_prompt", "prompt_suffix", "seed", "num_views", "elevation",
                               "azimuth_start", "steps", "guidance_scale", "guidance_rescale",
                               "height", "width")},
    )
    device = pick_device(cfg.device)
    pipe = build_pipeline(model_cfg, device=device, seed=cfg.seed)
    save_resolved_config(cfg, cfg.out)
    images, cameras, seconds = generate(pipe, request)
    info = {"name": model_cfg.name, "source": model_cfg.source, "path": model_cfg.path,
            "trained": model_cfg.trained, "device": str(device)}
    record = write_generation(cfg.out, request, images, cameras, seconds, info)
    log.info("wrote %d prompts x %d views to %s (%.2f s, %.2f views/s)", len(prompts),
             request.num_views, cfg.out, seconds, record["views_per_second"])
    return record


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
