"""Score-distillation guidance: renders of a 3D scene -> a loss whose gradient pulls them
towards what the frozen diffusion model believes the prompt looks like.

Two guidances share one signature, ``guidance(rgb, c2w, prompt, step, generator)``:

* :class:`MultiViewGuidance`, MVDream's multi-view SDS (paper §3.2 and appendix A.2): groups
  of 4 views 90 degrees apart are denoised jointly by the multi-view UNet, conditioned on
  their cameras.
* :class:`DreamFusionGuidance`, the DreamFusion-style baseline: the same model in 2D mode
  (one view at a time, no camera) with view-dependent prompt suffixes.

One step, in DDPM notation (abar_t = prod (1 - beta_s); G groups of V views, N = G*V)::

    z       = codec(resize(rgb))                       (N, C, h, w), differentiable
    t       ~ U{min_step, ..., max_step}               one t for the whole batch
    x_t     = sqrt(abar_t) z + sqrt(1 - abar_t) eps    eps ~ N(0, I)
    eps_hat = eps_u + s (eps_c - eps_u)                CFG; eps_u from the negative prompt
    x0_hat  = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)
    x0_hat <- r * x0_hat * std(x0_c) / std(x0_hat) + (1 - r) * x0_hat    per group (r > 0)
    x0_hat <- dynamic_threshold(x0_hat)                                  (optional)
    loss    = 0.5 * || z - sg(x0_hat) ||^2 / G         (x0-reconstruction loss)
    or
    loss    = 0.5 * || z - sg(z - w(t) (eps_hat - eps)) ||^2 / G,  w(t) = 1 - abar_t  (SDS)

Without the rescale and thresholding the reconstruction loss's gradient is the SDS gradient
with weight sqrt((1 - abar_t) / abar_t) instead of 1 - abar_t.

Cameras: callers give camera-to-world matrices in the orbit convention
(:func:`mvdream_platform.cameras.orbit_camera_to_world`, threestudio's). The multi-view model
was trained on the same z-up world with OpenGL camera axes and cameras normalised to unit
distance (``data/datasets.py``), and samples with ``get_camera`` cameras, which are the same
matrices at ``orbit_azimuth = mvdream_azimuth - 90``. So the conditioning is simply the c2w
with its translation normalised (:func:`camera_condition`); no axis change is needed
(``tests/test_sds_guidance.py`` checks this against the pipeline's cameras).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..cameras import normalize_camera
from ..diffusion import PREDICTION_TYPES, NoiseSchedule, add_noise, eps_from_prediction, x0_from_eps

__all__ = [
    "DIRECTIONS",
    "LOSS_NORMALIZATIONS",
    "REFERENCE_NEGATIVE_PROMPT",
    "DreamFusionGuidance",
    "GuidanceConfig",
    "GuidanceOutput",
    "MultiViewGuidance",
    "annealed_percent",
    "camera_condition",
    "dynamic_threshold",
    "orbit_angles",
    "rescale_x0",
    "sample_timestep",
    "step_bounds",
    "view_directions",
]

# MVDream-threestudio's fixed negative prompt (REFERENCE.md, "Text-to-3D with multi-view SDS").
REFERENCE_NEGATIVE_PROMPT = (
    "ugly, bad anatomy, blurry, pixelated obscure, unnatural colors, poor lighting, dull, "
    "and unclear, cropped, lowres, low quality, artifacts, duplicate, morbid, mutilated, "
    "poorly drawn face, deformed, dehydrated, bad proportions"
)
# View-dependent suffixes, DreamFusion-style (appended as "<prompt>, <direction> view").
DIRECTIONS = ("front", "side", "back", "overhead")
LOSS_NORMALIZATIONS = ("groups", "views")


# ----------------------------------------------------------------------------- configuration


@dataclass
class GuidanceConfig:
    """Everything that shapes the distillation loss (plain dataclass, Hydra-friendly).

    Attributes:
        guidance_scale: CFG weight s (>= 0). 50 is MVDream's reference for SD-sized models;
            the embedded 4.6M-parameter model wants 7.5 or lower.
        num_views: V, views per group for :class:`MultiViewGuidance` (4 in MVDream).
        recon_loss: x0-reconstruction loss (True, MVDream) or plain SDS with w(t) = 1 - abar_t.
        recon_std_rescale: r in [0, 1], CFG std rescale of x0_hat per group (0.5 in the
            reference; 0 = off). Reconstruction loss only.
        dynamic_threshold: Imagen's dynamic thresholding of x0_hat at this percentile of |x0|
            per view, e.g. 0.995; None = off. Applied after the rescale. Reconstruction loss
            only. Meant for pixel-space models (it clamps to [-s, s] with s >= 1).
        min_step_percent_start, min_step_percent_end, max_step_percent_start,
        max_step_percent_end: timestep bounds as fractions of T, linearly annealed from
            ``start`` at step 0 to ``end`` at ``anneal_steps`` and constant afterwards.
        anneal_steps: length of the annealing in optimisation steps (0 = ``end`` values).
        negative_prompt: the unconditional branch of CFG ("" = the plain unconditional model).
        camera_condition: feed the cameras to the multi-view model (False: no camera term).
        view_dependent_prompting: append ", front view" etc. to the prompt per view. None = the
            guidance's own default: off for :class:`MultiViewGuidance` (the reference uses the
            plain prompt), on for :class:`DreamFusionGuidance`.
        front_azimuth_deg: orbit azimuth (degrees) that counts as the front for the suffixes.
            0 is threestudio's convention (camera on +x). The embedded model's training
            objects face MVDream azimuth 0, i.e. orbit azimuth -90.
        front_threshold_deg, back_threshold_deg: half-widths of the front and back sectors.
        overhead_threshold_deg: elevation above which a view is "overhead" (wins over all).
        loss_normalization: divide the summed loss by the number of ``groups`` (G) or of
            ``views`` (N). MVDream-threestudio's code divides by its batch size, which counts
            views; with 4 views per group ``groups`` is 4 times larger.
    """

    guidance_scale: float = 50.0
    num_views: int = 4
    recon_loss: bool = True
    recon_std_rescale: float = 0.5
    dynamic_threshold: float | None = None
    min_step_percent_start: float = 0.98
    min_step_percent_end: float = 0.02
    max_step_percent_start: float = 0.98
    max_step_percent_end: float = 0.50
    anneal_steps: int = 8000
    negative_prompt: str = REFERENCE_NEGATIVE_PROMPT
    camera_condition: bool = True
    view_dependent_prompting: bool | None = None
    front_azimuth_deg: float = 0.0
    front_threshold_deg: float = 45.0
    back_threshold_deg: float = 45.0
    overhead_threshold_deg: float = 60.0
    loss_normalization: str = "groups"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field and what is allowed."""
        _require(_is_real(self.guidance_scale) and self.guidance_scale >= 0, "guidance_scale",
                 "a number >= 0 (1 = no guidance)", self.guidance_scale)
        _require(_is_int(self.num_views) and self.num_views >= 1, "num_views",
                 "an integer >= 1", self.num_views)
        _require(isinstance(self.recon_loss, bool), "recon_loss", "True or False",
                 self.recon_loss)
        _require(_is_real(self.recon_std_rescale) and 0 <= self.recon_std_rescale <= 1,
                 "recon_std_rescale", "a number in [0, 1]", self.recon_std_rescale)
        _require(self.dynamic_threshold is None
                 or (_is_real(self.dynamic_threshold) and 0 < self.dynamic_threshold <= 1),
                 "dynamic_threshold", "None or a percentile in (0, 1], e.g. 0.995",
                 self.dynamic_threshold)
        for name in ("min_step_percent_start", "min_step_percent_end",
                     "max_step_percent_start", "max_step_percent_end"):
            value = getattr(self, name)
            _require(_is_real(value) and 0 <= value <= 1, name, "a fraction in [0, 1]", value)
        for when in ("start", "end"):
            low = getattr(self, f"min_step_percent_{when}")
            high = getattr(self, f"max_step_percent_{when}")
            _require(low <= high, f"min_step_percent_{when}",
                     f"<= max_step_percent_{when} ({high})", low)
        _require(_is_int(self.anneal_steps) and self.anneal_steps >= 0, "anneal_steps",
                 "an integer >= 0", self.anneal_steps)
        _require(isinstance(self.negative_prompt, str), "negative_prompt",
                 'a string ("" allowed)', self.negative_prompt)
        _require(isinstance(self.camera_condition, bool), "camera_condition", "True or False",
                 self.camera_condition)
        _require(self.view_dependent_prompting is None
                 or isinstance(self.view_dependent_prompting, bool),
                 "view_dependent_prompting", "None, True or False",
                 self.view_dependent_prompting)
        _require(_is_real(self.front_azimuth_deg), "front_azimuth_deg", "a number (degrees)",
                 self.front_azimuth_deg)
        for name in ("front_threshold_deg", "back_threshold_deg"):
            value = getattr(self, name)
            _require(_is_real(value) and 0 <= value <= 180, name, "degrees in [0, 180]", value)
        _require(_is_real(self.overhead_threshold_deg)
                 and -90 <= self.overhead_threshold_deg <= 90, "overhead_threshold_deg",
                 "degrees in [-90, 90]", self.overhead_threshold_deg)
        _require(self.loss_normalization in LOSS_NORMALIZATIONS, "loss_normalization",
                 f"one of {LOSS_NORMALIZATIONS}", self.loss_normalization)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, field: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"GuidanceConfig.{field} must be {allowed}, got {value!r}")


@dataclass
class GuidanceOutput:
    """One guidance step.

    Attributes:
        loss: scalar float32 tensor; its gradient flows to ``rgb`` (never to the model).
        t: the timestep used (shared by the whole batch).
        min_step, max_step: the annealed bounds t was drawn from (inclusive), ints of T.
        grad_norm: float, L2 norm of ``z - sg(target)`` over the batch (the gradient w.r.t.
            z before dividing by the number of groups/views).
        rescale_factor: float, mean over groups of std(x0_c) / std(x0_hat) (1.0 when the
            rescale is off or not computed).
        target: (N, C, h, w) detached target in model space (x0_hat for the reconstruction
            loss, z - w(t)(eps_hat - eps) for SDS), e.g. for decoding and logging.
        prompts: the N prompts the views were conditioned on (suffixes included).
    """

    loss: torch.Tensor
    t: int
    min_step: int
    max_step: int
    grad_norm: float
    rescale_factor: float
    target: torch.Tensor
    prompts: list[str]


# ----------------------------------------------------------------------------- pure functions


def annealed_percent(start: float, end: float, step: int, anneal_steps: int) -> float:
    """Linear from ``start`` at step 0 to ``end`` at ``anneal_steps``, constant after."""
    if anneal_steps <= 0:
        return float(end)
    progress = min(max(step / anneal_steps, 0.0), 1.0)
    return start + (end - start) * progress


def step_bounds(config: GuidanceConfig, step: int, num_train_timesteps: int) -> tuple[int, int]:
    """The inclusive timestep range ``(min_step, max_step)`` at optimisation ``step``.

    Fractions become ``int(T * p)`` like threestudio, with a 1e-6 allowance so that a fraction
    such as 0.5 reached by float arithmetic as 0.4999999 still gives 500 and not 499; the
    maximum is clipped to T - 1 (p = 1 would otherwise name a timestep that does not exist).
    """
    T = num_train_timesteps

    def to_int(p: float) -> int:
        return min(int(T * p + 1e-6), T - 1)

    low = annealed_percent(config.min_step_percent_start, config.min_step_percent_end, step,
                           config.anneal_steps)
    high = annealed_percent(config.max_step_percent_start, config.max_step_percent_end, step,
                            config.anneal_steps)
    return to_int(low), to_int(high)


def sample_timestep(min_step: int, max_step: int,
                    generator: torch.Generator | None = None) -> int:
    """t ~ U{min_step, ..., max_step} (inclusive), drawn on the CPU from ``generator``."""
    return int(torch.randint(min_step, max_step + 1, (1,), generator=generator).item())


def rescale_x0(x0: torch.Tensor, x0_cond: torch.Tensor, group_size: int, r: float,
               eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """CFG std rescale of x0_hat, per group of views (MVDream appendix A.2).

    Args:
        x0: (G*V, C, h, w) x0 from the guided prediction.
        x0_cond: (G*V, C, h, w) x0 from the text-only prediction.
        group_size: V, views per group (contiguous).
        r: mixing weight; r * rescaled + (1 - r) * x0.

    Returns:
        (G*V, C, h, w) the mixed x0 and (G,) the factors std(x0_cond) / std(x0), each std taken
        over one group's views, channels and pixels.
    """
    groups = x0.shape[0] // group_size
    std = x0.reshape(groups, -1).std(dim=1)
    std_cond = x0_cond.reshape(groups, -1).std(dim=1)
    factor = (std_cond + eps) / (std + eps)  # eps: a flat (constant) x0 must not divide by 0
    rescaled = x0 * factor.repeat_interleave(group_size).reshape(-1, 1, 1, 1)
    return r * rescaled + (1.0 - r) * x0, factor


def dynamic_threshold(x0: torch.Tensor, percentile: float) -> torch.Tensor:
    """Imagen's dynamic thresholding, per sample.

    s = max(percentile of |x0| over the sample, 1); x0 -> clamp(x0, -s, s) / s. Samples already
    inside [-1, 1] pass unchanged.

    Args:
        x0: (N, C, h, w). Returns the same shape.
    """
    flat = x0.reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs().float(), percentile, dim=1).clamp(min=1.0).to(x0.dtype)
    s = s.reshape(-1, 1, 1, 1)
    return torch.maximum(torch.minimum(x0, s), -s) / s


def camera_condition(c2w: torch.Tensor) -> torch.Tensor:
    """Orbit-convention c2w (N, 4, 4) -> (N, 16) camera vectors the multi-view model expects.

    Our orbit cameras and the model's training/sampling cameras share the z-up world and
    OpenGL camera axes, so only the distance differs: the model saw unit-distance cameras.
    """
    return normalize_camera(c2w)


def orbit_angles(c2w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 4, 4) c2w -> elevation (N,) and azimuth (N,) in degrees, orbit convention.

    Azimuth is measured from +x towards +y, in (-180, 180]; elevation above the xy plane.
    """
    position = c2w[:, :3, 3].double()
    x, y, z = position.unbind(-1)
    azimuth = torch.rad2deg(torch.atan2(y, x))
    elevation = torch.rad2deg(torch.atan2(z, torch.sqrt(x * x + y * y)))
    return elevation.float(), azimuth.float()


def _wrap_deg(angle: torch.Tensor) -> torch.Tensor:
    """Degrees -> [-180, 180)."""
    return torch.remainder(angle + 180.0, 360.0) - 180.0


def view_directions(elevation: torch.Tensor, azimuth: torch.Tensor,
                    config: GuidanceConfig) -> list[str]:
    """DreamFusion's direction of each view: ``front``/``side``/``back``/``overhead``.

    Like threestudio: ``side`` unless the azimuth (relative to ``front_azimuth_deg``, wrapped
    to [-180, 180)) is strictly within ``front_threshold_deg`` of 0 (front) or of 180 (back);
    ``overhead`` above ``overhead_threshold_deg`` elevation wins over all.

    Args:
        elevation, azimuth: (N,) degrees, orbit convention.
    """
    relative = _wrap_deg(azimuth.double() - config.front_azimuth_deg)
    front = relative.abs() < config.front_threshold_deg
    back = relative.abs() > 180.0 - config.back_threshold_deg
    overhead = elevation.double() > config.overhead_threshold_deg
    names = []
    for is_front, is_back, is_over in zip(front.tolist(), back.tolist(), overhead.tolist()):
        if is_over:
            names.append("overhead")
        elif is_back:
            names.append("back")
        elif is_front:
            names.append("front")
        else:
            names.append("side")
    return names


# ----------------------------------------------------------------------------- guidance


class _ScoreDistillation:
    """What both guidances share: the frozen model, the text cache and the loss.

    Subclasses say how views are grouped (``group_size``), which prompts and cameras the views
    get, and in which attention mode the UNet runs.
    """

    default_view_dependent = False

    def __init__(self, pipe, config: GuidanceConfig | None = None):
        self.config = config if config is not None else GuidanceConfig()
        self.unet = pipe.unet
        self.text_encoder = pipe.text_encoder
        self.codec = pipe.codec
        self.scheduler = pipe.scheduler
        for module in (self.unet, self.text_encoder, self.codec):
            module.requires_grad_(False)  # frozen: gradients go to the renders only
            module.eval()
        scheduler_config = self.scheduler.config
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type must be one of {PREDICTION_TYPES}, "
                             f"got {self.prediction_type!r}")
        self.schedule = NoiseSchedule.from_scheduler_config(scheduler_config)
        self.size = self.unet.sample_size * self.codec.downscale_factor  # model pixels
        self._text_cache: dict[str, torch.Tensor] = {}

    # -------------------------------------------------------------- what subclasses decide
    @property
    def group_size(self) -> int:
        raise NotImplementedError

    @property
    def view_dependent(self) -> bool:
        flag = self.config.view_dependent_prompting
        return self.default_view_dependent if flag is None else flag

    def _cameras(self, c2w: torch.Tensor) -> torch.Tensor | None:
        """(N, 4, 4) -> (N, 16) camera vectors or None."""
        raise NotImplementedError

    @contextmanager
    def _attention(self) -> Iterator[None]:
        yield

    # -------------------------------------------------------------- building blocks
    @property
    def device(self) -> torch.device:
        return self.unet.device

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """list (N) of prompts -> (N, L, D) token states, each prompt encoded once and cached."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            tokens = self.text_encoder.encode(missing)
            for prompt, state in zip(missing, tokens):
                self._text_cache[prompt] = state
        # Moved on the way out (a no-op once there), so the cache survives pipe.to(device).
        tokens = torch.stack([self._text_cache[p] for p in prompts])
        return tokens.to(device=self.device, dtype=self.unet.dtype)

    def view_prompts(self, prompt: str, c2w: torch.Tensor,
                     angles: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[str]:
        """The N prompts of the views: the prompt itself or with a ``", <direction> view"``.

        ``angles``: the (N,) elevations and azimuths (degrees, orbit convention) the cameras
        were sampled with; without them they are read back from ``c2w``.
        """
        if not self.view_dependent:
            return [prompt] * c2w.shape[0]
        elevation, azimuth = angles if angles is not None else orbit_angles(c2w)
        return [f"{prompt}, {d} view" for d in view_directions(elevation, azimuth, self.config)]

    def encode_renders(self, rgb: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) in [0, 1] -> z (N, C, h, w) at the model's resolution, differentiable."""
        images = rgb.permute(0, 3, 1, 2)
        if images.shape[-2:] != (self.size, self.size):
            # Antialias when shrinking (e.g. 256-px renders into a 32-px pixel model); plain
            # bilinear would alias and give the field a noisy gradient.
            shrink = images.shape[-2] > self.size or images.shape[-1] > self.size
            images = F.interpolate(images, (self.size, self.size), mode="bilinear",
                                   align_corners=False, antialias=shrink)
        images = (images * 2.0 - 1.0).to(dtype=self.codec.dtype)
        return self.codec.encode(images).float()

    @torch.no_grad()
    def predict_eps(self, x_t: torch.Tensor, t: int, prompts: list[str],
                    cameras: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One batched UNet forward over both CFG branches.

        Args:
            x_t: (N, C, h, w) noisy latents (float32).
            prompts: N prompts; the negative prompt is the unconditional branch.
            cameras: (N, 16) or None, given to both branches (as the pipeline does).

        Returns:
            eps_cond, eps_uncond: (N, C, h, w) float32 (eps_uncond = eps_cond when s == 1).
        """
        use_cfg = self.config.guidance_scale != 1.0
        context = self.text_embeddings(prompts)
        model_in, camera = x_t, cameras
        if use_cfg:
            negative = self.text_embeddings([self.config.negative_prompt] * len(prompts))
            context = torch.cat([context, negative])
            model_in = torch.cat([x_t, x_t])
            camera = None if cameras is None else torch.cat([cameras, cameras])
        dtype = self.unet.dtype
        timesteps = torch.full((model_in.shape[0],), t, dtype=torch.long, device=self.device)
        if camera is not None:
            camera = camera.to(device=self.device, dtype=dtype)
        with self._attention():
            pred = self.unet(model_in.to(dtype), timesteps, context, camera=camera,
                             num_frames=self.group_size).sample.float()
        eps = eps_from_prediction(pred, model_in, self.schedule.abar_at(t), self.prediction_type)
        if not use_cfg:
            return eps, eps
        eps_cond, eps_uncond = eps.chunk(2)
        return eps_cond, eps_uncond

    # -------------------------------------------------------------- the step
    def __call__(self, rgb: torch.Tensor, c2w: torch.Tensor, prompt: str, step: int,
                 generator: torch.Generator | None = None, *,
                 angles: tuple[torch.Tensor, torch.Tensor] | None = None) -> GuidanceOutput:
        """Distillation loss of one batch of renders.

        Args:
            rgb: (N, H, W, 3) renders in [0, 1], requiring grad; N = G * group_size with the
                views of a group contiguous.
            c2w: (N, 4, 4) camera-to-world in the orbit convention
                (:func:`mvdream_platform.cameras.orbit_camera_to_world`).
            prompt: the text prompt.
            step: optimisation step (>= 0), for the timestep annealing.
            generator: CPU ``torch.Generator``; t is drawn first, then eps (N, C, h, w).
                None uses the global RNG.
            angles: the cameras' (N,) elevations and azimuths in degrees (orbit convention),
                as sampled (:class:`mvdream_platform.cameras.CameraGroups`), for the
                view-dependent prompts; None reads them back from ``c2w``.

        Returns:
            :class:`GuidanceOutput`.
        """
        self._check_call(rgb, c2w, prompt, step)
        cfg = self.config
        z = self.encode_renders(rgb)  # (N, C, h, w), carries the graph back to rgb
        min_step, max_step = step_bounds(cfg, step, self.schedule.num_train_timesteps)
        t = sample_timestep(min_step, max_step, generator)
        noise = torch.randn(z.shape, generator=generator, dtype=torch.float32).to(z.device)
        abar = self.schedule.abar_at(t)
        prompts = self.view_prompts(prompt, c2w, angles)
        cameras = self._cameras(c2w)

        with torch.no_grad():
            x_t = add_noise(z.detach(), noise, abar)
            eps_cond, eps_uncond = self.predict_eps(x_t, t, prompts, cameras)
            eps_hat = eps_uncond + cfg.guidance_scale * (eps_cond - eps_uncond)
            target, factor = self._target(z.detach(), x_t, noise, eps_hat, eps_cond, abar)

        groups = z.shape[0] // self.group_size
        divisor = groups if cfg.loss_normalization == "groups" else z.shape[0]
        difference = z - target  # target is constant: d loss / d z = difference / divisor
        loss = 0.5 * difference.pow(2).sum() / divisor
        return GuidanceOutput(
            loss=loss, t=t, min_step=min_step, max_step=max_step,
            grad_norm=float(difference.detach().norm()),
            rescale_factor=float(factor.mean()) if factor is not None else 1.0,
            target=target, prompts=prompts,
        )

    def _target(self, z: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor,
                eps_hat: torch.Tensor, eps_cond: torch.Tensor,
                abar: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The constant the loss pulls z towards, and the rescale factors (G,) if computed."""
        cfg = self.config
        if not cfg.recon_loss:
            # SDS: z - target = w(t) (eps_hat - eps), the score-distillation gradient.
            return z - (1.0 - abar) * (eps_hat - noise), None
        x0 = x0_from_eps(x_t, eps_hat, abar)
        factor = None
        if cfg.recon_std_rescale > 0:
            x0_cond = x0_from_eps(x_t, eps_cond, abar)
            x0, factor = rescale_x0(x0, x0_cond, self.group_size, cfg.recon_std_rescale)
        if cfg.dynamic_threshold is not None:
            x0 = dynamic_threshold(x0, cfg.dynamic_threshold)
        return x0, factor

    def _check_call(self, rgb: torch.Tensor, c2w: torch.Tensor, prompt: str, step: int) -> None:
        if not isinstance(rgb, torch.Tensor) or rgb.ndim != 4 or rgb.shape[-1] != 3:
            shape = tuple(rgb.shape) if isinstance(rgb, torch.Tensor) else type(rgb).__name__
            raise ValueError(f"rgb must be a (N, H, W, 3) tensor in [0, 1], got {shape}")
        n = rgb.shape[0]
        if n == 0 or n % self.group_size:
            raise ValueError(f"rgb must hold a positive multiple of {self.group_size} views "
                             f"(groups of contiguous views), got N={n}")
        if not isinstance(c2w, torch.Tensor) or tuple(c2w.shape) != (n, 4, 4):
            shape = tuple(c2w.shape) if isinstance(c2w, torch.Tensor) else type(c2w).__name__
            raise ValueError(f"c2w must have shape (N, 4, 4) = ({n}, 4, 4), got {shape}")
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        if not _is_int(step) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")


class MultiViewGuidance(_ScoreDistillation):
    """MVDream's multi-view score distillation (x0-reconstruction loss by default).

    Args:
        pipe: an :class:`~mvdream_platform.pipelines.MVDreamPipeline` (or anything with
            ``unet``, ``text_encoder``, ``codec`` and ``scheduler``); its unet, text encoder
            and codec are frozen in place (``requires_grad=False``, eval mode).
        config: :class:`GuidanceConfig` (default: the reference settings).

    Call with ``(rgb (N, H, W, 3), c2w (N, 4, 4), prompt, step, generator)``; N = G * V with
    each group's V views contiguous (V = ``config.num_views``, 4 views 90 degrees apart).
    """

    def __init__(self, pipe, config: GuidanceConfig | None = None):
        super().__init__(pipe, config)
        if self.config.camera_condition and self.unet.config.camera_dim is None:
            raise ValueError("GuidanceConfig.camera_condition must be False for a model without "
                             "camera embedding (unet camera_dim=None)")

    @property
    def group_size(self) -> int:
        return self.config.num_views

    def _cameras(self, c2w: torch.Tensor) -> torch.Tensor | None:
        return camera_condition(c2w) if self.config.camera_condition else None


class DreamFusionGuidance(_ScoreDistillation):
    """DreamFusion-style baseline: the same model as a 2D prior, one view at a time.

    Each view is its own group of one (``num_frames=1``, self-attention in ``2d`` mode for the
    call, then the previous mode is restored), no camera, and by default a view-dependent
    suffix (", front view" / ", side view" / ", back view" / ", overhead view") from each
    camera's orbit azimuth and elevation. Same loss options as :class:`MultiViewGuidance`
    (with groups of one view, ``loss_normalization`` makes no difference).
    """

    default_view_dependent = True

    @property
    def group_size(self) -> int:
        return 1

    def _cameras(self, c2w: torch.Tensor) -> None:
        return None

    @contextmanager
    def _attention(self) -> Iterator[None]:
        previous = self.unet.attention_mode
        self.unet.set_attention_mode("2d")
        try:
            yield
        finally:
            self.unet.set_attention_mode(previous)
