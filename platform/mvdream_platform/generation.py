"""Sample multi-view images for prompts and write them to an output folder (path or URI).

The output folder holds, per prompt ``i``: ``prompt_{i:03d}/view_{j:02d}.png`` and a row of the
grid ``grid.png`` (prompts as rows, views as columns), plus ``generation.json`` describing the
request, the model and the cameras. Everything goes through :mod:`mvdream_platform.storage`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from . import storage
from .pipelines import MVDreamPipeline


@dataclass
class GenerationRequest:
    """What to sample; field names are the job's config keys."""

    prompts: list[str]
    negative_prompt: str = ""
    prompt_suffix: str = ""
    seed: int = 0
    num_views: int = 4
    elevation: float = 15.0
    azimuth_start: float = 0.0
    steps: int = 50
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    height: int | None = None
    width: int | None = None


def make_grid(images: np.ndarray) -> np.ndarray:
    """(B, F, H, W, 3) floats in [0, 1] -> (B*H, F*W, 3) uint8: prompts as rows, views as columns."""
    b, f, h, w, c = images.shape
    grid = images.transpose(0, 2, 1, 3, 4).reshape(b * h, f * w, c)
    return (grid * 255).round().clip(0, 255).astype(np.uint8)


def generate(pipe: MVDreamPipeline, request: GenerationRequest) -> tuple[np.ndarray, torch.Tensor, float]:
    """Run the pipeline: returns images (B, F, H, W, 3) in [0, 1], cameras (F, 16), seconds."""
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    start = time.perf_counter()
    out = pipe(
        [p + request.prompt_suffix for p in request.prompts],
        negative_prompt=request.negative_prompt,
        num_views=request.num_views,
        elevation=request.elevation,
        azimuth_start=request.azimuth_start,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        guidance_rescale=request.guidance_rescale,
        height=request.height,
        width=request.width,
        generator=generator,
        output_type="np",
    )
    return out.images, out.cameras, time.perf_counter() - start


def write_generation(out_uri: str, request: GenerationRequest, images: np.ndarray,
                     cameras: torch.Tensor, seconds: float, model_info: dict) -> dict:
    """Write views, grid and ``generation.json`` under ``out_uri``; returns the JSON record."""
    files = []
    for i, views in enumerate(images):
        for j, view in enumerate(views):
            name = f"prompt_{i:03d}/view_{j:02d}.png"
            storage.write_bytes(storage.join(out_uri, name), storage.encode_png(make_grid(view[None, None])))
            files.append(name)
    storage.write_bytes(storage.join(out_uri, "grid.png"), storage.encode_png(make_grid(images)))
    record = {
        "request": asdict(request),
        "model": model_info,
        "cameras": cameras.tolist(),
        "image_shape": list(images.shape),
        "seconds": round(seconds, 3),
        "views_per_second": round(images.shape[0] * images.shape[1] / max(seconds, 1e-9), 3),
        "files": files + ["grid.png"],
    }
    storage.write_json(storage.join(out_uri, "generation.json"), record)
    return record
