"""A sweep objective without ground truth: ask the prior how plausible the NeRF's renders are.

The multi-view model is a denoiser; its denoising error on an image is (up to weighting) a
bound on that image's negative log-likelihood under the model. So for a NeRF state we

1. render ``views`` views at fixed cameras: ``views / 4`` groups of 4 views 90 degrees apart on
   the evaluation orbit (``sds.cameras.eval_*``), albedo over white, at the model's size;
2. encode them (``z``, as the guidance does) and noise them at fixed timesteps ``t_k`` with
   fixed noise ``eps`` (drawn once from ``noise_seed``: the same for every trial and step);
3. predict ``eps`` with the multi-view model, conditioned on the prompt and the cameras, and
   also unconditionally (empty prompt), in one batched forward per timestep
   (:meth:`~mvdream_platform.sds.guidance.MultiViewGuidance.predict_eps`);

and report, averaged over timesteps and noise draws:

* ``prior_text_gain`` = mean ||eps_uncond - eps||^2 - mean ||eps_cond - eps||^2 (higher is
  better; the default objective): how much the prompt lowers the prior's denoising error on
  the renders, i.e. how much the renders look like *this prompt* rather than like anything;
* ``prior_eps_mse`` = mean ||eps_cond - eps||^2 (lower is better), the plain conditional
  denoising error. Beware: a blank or blurry field is easy to denoise, so it scores well here
  (the untrained blob beats finished objects); it is reported, not recommended.

Measured on the embedded model (4.6M-parameter pixel-space prior; 8 views, timesteps 0.25,
0.5, 0.75, 2 noise draws), fields after 400 steps of "a red cube" and "a green cylinder" and
the untrained blob, each scored against four prompts: the matching prompt had the highest
``prior_text_gain`` for both trained fields (+0.0015 and +0.0016, every other prompt < 0), the
blob had negative gains for all prompts; ``prior_eps_mse`` also ranked the matching prompt
first for each field, but rated the blob (0.0103) better than both finished objects
(0.0150, 0.0122).

Everything is deterministic (eval-mode renders, fixed noise), so the same field gives the same
numbers, and trials differ only by their fields. The score does not depend on the trial's
guidance settings (it uses the plain empty prompt as the unconditional branch and no CFG).

Optionally :class:`ClipScore` adds ``clip_score``: the cosine similarity between CLIP's
embeddings of the renders and of the prompt (``transformers.CLIPModel`` from a local folder).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..cameras import orbit_groups
from ..config import build
from ..sds.checkpoint import load_checkpoint, read_latest
from ..sds.config import SDSConfig
from ..sds.guidance import GuidanceConfig, MultiViewGuidance, camera_condition
from ..sds.optimize import Scene, build_scene, render_orbit

__all__ = ["METRICS", "ClipScore", "ObjectiveConfig", "PriorScore", "metric_mode"]

# metric -> mode (what "better" means); the sweep optimises one of these.
METRICS = {
    "prior_text_gain": "max",
    "prior_eps_mse": "min",
    "clip_score": "max",
}


def metric_mode(metric: str) -> str:
    """``"min"`` or ``"max"`` for an objective metric (ValueError naming the allowed ones)."""
    if metric not in METRICS:
        raise ValueError(f"tune.objective.metric must be one of {sorted(METRICS)}, got {metric!r}")
    return METRICS[metric]


@dataclass
class ObjectiveConfig:
    """How (and how often) trials are scored.

    Attributes:
        metric: what ASHA and the best-trial pick optimise (see :data:`METRICS`).
        timesteps: fractions of T at which the renders are noised (mid-range: where the
            prior's shape and colour knowledge lives).
        noise_draws: noise samples per timestep (more: less variance, more forwards).
        noise_seed: the fixed noise; the same for every trial.
        views: cameras per evaluation, a multiple of the model's group size (4).
        resolution: render size; None = the model's input size (32 for the embedded model).
        every: steps between evaluations; None = at every checkpoint (``sds.checkpoint_every``).
            Must be a multiple of the checkpoint interval (the score reads the committed field).
        clip_model: a local ``CLIPModel`` folder (with its tokenizer and image processor);
            None = no CLIP score.
        clip_resolution: render size for the CLIP score (the processor resizes it).
    """

    metric: str = "prior_text_gain"
    timesteps: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    noise_draws: int = 2
    noise_seed: int = 0
    views: int = 4
    resolution: int | None = None
    every: int | None = None
    clip_model: str | None = None
    clip_resolution: int = 64

    def __post_init__(self) -> None:
        self.validate()

    @property
    def mode(self) -> str:
        return metric_mode(self.metric)

    def validate(self, where: str = "tune.objective") -> None:
        metric_mode(self.metric)
        if self.metric == "clip_score" and not self.clip_model:
            raise ValueError(f"{where}.metric=clip_score needs {where}.clip_model (a local CLIPModel folder)")
        if not self.timesteps or not all(isinstance(t, (int, float)) and 0 < t < 1 for t in self.timesteps):
            raise ValueError(f"{where}.timesteps must be fractions of T in (0, 1), got {self.timesteps!r}")
        for name in ("noise_draws", "views", "clip_resolution"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}.{name} must be an integer >= 1, got {value!r}")
        if self.resolution is not None and (not isinstance(self.resolution, int) or self.resolution < 8):
            raise ValueError(f"{where}.resolution must be null or an integer >= 8, got {self.resolution!r}")
        if self.every is not None and (not isinstance(self.every, int) or self.every < 1):
            raise ValueError(f"{where}.every must be null or an integer >= 1, got {self.every!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> ObjectiveConfig:
        return build(cls, values, "tune.objective")


class PriorScore:
    """The prior's denoising error on a NeRF's renders (see the module docstring).

    Args:
        pipe: the trial's MVDreamPipeline (the frozen prior).
        sds: the trial's SDSConfig (field/render settings to rebuild its scene, eval cameras).
        prompt: the trial's prompt.
        config: :class:`ObjectiveConfig`.
        seed: the trial's seed (the scoring scene starts as the trial's step-0 field).
        device: where the scene and the model live.
    """

    def __init__(self, pipe, sds: SDSConfig, prompt: str, config: ObjectiveConfig, seed: int = 0,
                 device: torch.device | str = "cpu"):
        self.sds, self.prompt, self.config = sds, prompt, config
        # The plain prior: empty unconditional prompt, no CFG mixing (scale only switches the
        # unconditional branch on), the trial's camera conditioning (a model property).
        self.guidance = MultiViewGuidance(pipe, GuidanceConfig(
            guidance_scale=2.0, num_views=sds.guidance.num_views, negative_prompt="",
            camera_condition=sds.guidance.camera_condition))
        self.resolution = config.resolution or self.guidance.size
        cams = sds.cameras
        if config.views % self.guidance.group_size:
            raise ValueError(f"tune.objective.views must be a multiple of the model's group size "
                             f"{self.guidance.group_size}, got {config.views}")
        self.c2w = orbit_groups(config.views, self.guidance.group_size, cams.eval_elevation,
                                cams.eval_distance)
        T = self.guidance.schedule.num_train_timesteps
        self.timesteps = [min(max(int(round(f * T)), 1), T - 1) for f in config.timesteps]
        self.scene: Scene = build_scene(sds, seed=seed, device=device)  # step 0 of the trial
        self._noise: torch.Tensor | None = None
        self.initial = self.score_scene(self.scene)  # the trial's reports before its 1st checkpoint

    @torch.no_grad()
    def renders(self, scene: Scene, resolution: int | None = None) -> np.ndarray:
        """(views, H, W, 3) uint8 albedo renders over white at the fixed cameras."""
        return render_orbit(scene, self.sds, len(self.c2w), resolution or self.resolution,
                            shading="albedo", c2w=self.c2w).rgb

    @torch.no_grad()
    def score_renders(self, rgb: np.ndarray) -> dict[str, float]:
        """Scores of (views, H, W, 3) uint8 renders at the fixed cameras."""
        g = self.guidance
        images = torch.from_numpy(np.ascontiguousarray(rgb)).float().div(255.0).to(g.device)
        z = g.encode_renders(images)  # (V, C, h, w)
        draws = self.config.noise_draws
        if self._noise is None:
            generator = torch.Generator().manual_seed(self.config.noise_seed)
            self._noise = torch.randn((len(self.timesteps), draws, *z.shape), generator=generator)
        cameras = camera_condition(self.c2w.to(g.device)) if g.config.camera_condition else None
        if cameras is not None:
            cameras = cameras.repeat(draws, 1)
        prompts = [self.prompt] * (draws * z.shape[0])
        cond, uncond = [], []
        for k, t in enumerate(self.timesteps):
            abar = float(g.schedule.alphas_cumprod[t])
            eps = self._noise[k].to(z.device).reshape(-1, *z.shape[1:])  # (draws*V, C, h, w)
            x_t = math.sqrt(abar) * z.repeat(draws, 1, 1, 1) + math.sqrt(1.0 - abar) * eps
            eps_cond, eps_uncond = g.predict_eps(x_t, t, prompts, cameras)
            cond.append(float((eps_cond - eps).pow(2).mean()))
            uncond.append(float((eps_uncond - eps).pow(2).mean()))
        mse, mse_uncond = float(np.mean(cond)), float(np.mean(uncond))
        return {"prior_text_gain": mse_uncond - mse, "prior_eps_mse": mse}

    def score_scene(self, scene: Scene) -> dict[str, float]:
        return self.score_renders(self.renders(scene))

    def score_checkpoint(self, folder: str) -> tuple[int, dict[str, float]]:
        """Load the committed checkpoint in ``folder`` into the scoring scene and score it;
        returns (its step, scores). A folder without a checkpoint scores the step-0 field."""
        step = load_checkpoint(folder, self.scene.modules(), None) if read_latest(folder) else 0
        return step, self.score_scene(self.scene)


class ClipScore:
    """CLIP similarity of renders to the prompt, from a local ``CLIPModel`` folder.

    The folder holds what ``save_pretrained`` writes for the model, a tokenizer and an image
    processor (e.g. a local copy of ``openai/clip-vit-base-patch32``). No downloads.
    """

    def __init__(self, path: str, device: torch.device | str = "cpu"):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(path).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.processor = CLIPImageProcessor.from_pretrained(path)
        self._text: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_embedding(self, prompt: str) -> torch.Tensor:
        if prompt not in self._text:
            tokens = self.tokenizer([prompt], padding=True, truncation=True, return_tensors="pt")
            tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
            features = self.model.get_text_features(**tokens)
            features = getattr(features, "pooler_output", features)  # tensor or model output
            self._text[prompt] = torch.nn.functional.normalize(features.float(), dim=-1)[0]
        return self._text[prompt]

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray, prompt: str) -> float:
        """Mean cosine similarity of (V, H, W, 3) uint8 renders to ``prompt``."""
        pixels = self.processor(images=list(rgb), return_tensors="pt")["pixel_values"].to(self.device)
        features = self.model.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)
        image = torch.nn.functional.normalize(features.float(), dim=-1)
        return float((image @ self.text_embedding(prompt)).mean())
