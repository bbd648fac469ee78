"""MVDreamPipeline: text to F consistent views of one object, as a diffusers DiffusionPipeline.

The denoising loop is written out here, diffusers-style: encode the prompts once, make the F
cameras of an orbit, then for each timestep run ONE batched UNet forward over every prompt,
every view and both classifier-free-guidance branches (the camera goes to both branches, as in
the official sampler), and let the scheduler step. Any diffusers scheduler can be swapped in
(``pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..cameras import get_camera
from ..models import codecs as _codecs  # noqa: F401
from ..models import multiview_unet as _multiview_unet  # noqa: F401
from ..models import text_encoders as _text_encoders  # noqa: F401

# diffusers finds a saved component's class through sys.modules, so the modules of every
# component class we save must be imported before MVDreamPipeline.from_pretrained runs.
from ..models.component_io import loading_defaults

OUTPUT_TYPES = ("pil", "np", "pt")
# For model folders that record no recommendation (Stable Diffusion's defaults).
DEFAULT_GUIDANCE_SCALE = 7.5
DEFAULT_STEPS = 50


@dataclass
class MVDreamPipelineOutput(BaseOutput):
    """Images grouped per prompt.

    Attributes:
        images: ``pil``: list (B) of lists (F) of PIL images; ``np``: (B, F, H, W, 3) float32 in
            [0, 1]; ``pt``: (B, F, 3, H, W) float32 in [0, 1].
        cameras: (F, 16) the camera-to-world matrices used for the views (row-major).
    """

    images: list[list[PIL.Image.Image]] | np.ndarray | torch.Tensor
    cameras: torch.Tensor


class MVDreamPipeline(DiffusionPipeline):
    """Multi-view text-to-image sampling.

    Components:
        unet: :class:`~mvdream_platform.models.MultiViewUNet`.
        text_encoder: an encoder with ``encode(list[str]) -> (B, L, D)`` (CLIP or MiniLM).
        codec: image <-> model space (``LatentCodec`` for SD's VAE, ``PixelCodec`` for pixels).
        scheduler: any diffusers scheduler (DDIM by default).
    """

    model_cpu_offload_seq = "text_encoder->unet->codec"

    def __init__(self, unet, text_encoder, codec, scheduler, recommended_guidance_scale: float | None = None,
                 recommended_steps: int | None = None):
        """``recommended_*``: the sampling settings this model was validated with, saved in
        ``model_index.json`` and used by :meth:`__call__` when the caller gives none (a 4.6M
        parameter model wants far weaker guidance than SD-sized ones: 2.0, not 7.5)."""
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, codec=codec, scheduler=scheduler)
        self.register_to_config(recommended_guidance_scale=recommended_guidance_scale,
                                recommended_steps=recommended_steps)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader, with :func:`~mvdream_platform.models.component_io.loading_defaults`
        (the caller's keywords win)."""
        return super().from_pretrained(pretrained_model_name_or_path, **(loading_defaults() | kwargs))

    def recommend(self, guidance_scale: float | None = None, steps: int | None = None) -> None:
        """Record the model's recommended sampling settings (saved with the pipeline)."""
        self.register_to_config(recommended_guidance_scale=guidance_scale, recommended_steps=steps)

    @property
    def default_guidance_scale(self) -> float:
        """The model's recommended guidance, or 7.5 (SD's default) when the folder has none."""
        value = self.config.get("recommended_guidance_scale")
        return DEFAULT_GUIDANCE_SCALE if value is None else float(value)

    @property
    def default_steps(self) -> int:
        value = self.config.get("recommended_steps")
        return DEFAULT_STEPS if value is None else int(value)

    # ------------------------------------------------------------------ helpers
    @property
    def default_size(self) -> int:
        """The resolution the UNet was configured for, in pixels."""
        return self.unet.sample_size * self.codec.downscale_factor

    @property
    def size_multiple(self) -> int:
        return self.codec.downscale_factor * self.unet.downsample_factor

    def check_inputs(self, prompts, negative_prompts, num_views, num_inference_steps,
                     guidance_scale, height, width, output_type) -> None:
        """Raise ``ValueError`` naming the bad argument and what is allowed."""
        if len(prompts) == 0:
            raise ValueError("prompt must be a non-empty string or a non-empty list of strings")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a list of strings")
        if len(negative_prompts) != len(prompts):
            raise ValueError(
                f"negative_prompt must be one string or a list of {len(prompts)} strings "
                f"(one per prompt), got {len(negative_prompts)}"
            )
        if not isinstance(num_views, int) or num_views < 1:
            raise ValueError(f"num_views must be an integer >= 1, got {num_views!r}")
        if self.unet.config.camera_dim is None and num_views > 1:
            raise ValueError("num_views must be 1 for a model without camera conditioning")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (1 disables guidance), got {guidance_scale}")
        multiple = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < multiple or value % multiple:
                raise ValueError(
                    f"{name} must be a positive multiple of {multiple} for this model "
                    f"(codec factor {self.codec.downscale_factor} x UNet factor "
                    f"{self.unet.downsample_factor}), got {value!r}"
                )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")

    def encode_prompts(self, prompts: list[str], num_views: int) -> torch.Tensor:
        """list (B) -> (B*F, L, D): each prompt's tokens repeated for its F views."""
        tokens = self.text_encoder.encode(prompts).to(device=self._execution_device, dtype=self.unet.dtype)
        return tokens.repeat_interleave(num_views, dim=0)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        num_views: int = 4,
        elevation: float = 15.0,
        azimuth_start: float = 0.0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> MVDreamPipelineOutput | tuple:
        """Sample ``num_views`` views around each prompt's object.

        Args:
            prompt: one prompt or a list of B prompts.
            negative_prompt: one string for all prompts or one per prompt ("" = unconditional).
            num_views: F, views evenly spaced over 360 degrees of azimuth.
            elevation, azimuth_start: degrees, in MVDream's camera convention
                (:func:`mvdream_platform.cameras.get_camera`).
            num_inference_steps, guidance_scale: None (the default) uses the model's recommended
                settings (:attr:`default_steps`, :attr:`default_guidance_scale`); a value given
                always wins. ``guidance_scale`` 1 means no guidance (one branch only).
            guidance_rescale: CFG rescale phi of Lin et al. (0 = off).
            height, width: pixels; default is the UNet's sample size times the codec factor.
            generator: seeds the initial noise (and DDIM's noise when ``eta > 0``).
            eta: DDIM eta (ignored by schedulers that do not take it).
            latents: (B*F, C, h, w) initial noise instead of drawing it from ``generator``
                (the Serve batcher draws each request's noise from its own seed, so a
                request's images do not depend on what it was batched with).
        """
        num_inference_steps = self.default_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        self.check_inputs(prompts, negatives, num_views, num_inference_steps, guidance_scale,
                          height, width, output_type)
        device, dtype = self._execution_device, self.unet.dtype
        batch = len(prompts) * num_views
        use_cfg = guidance_scale != 1.0

        context = self.encode_prompts(prompts, num_views)
        if use_cfg:  # one forward: [unconditional; conditional]
            context = torch.cat([self.encode_prompts(negatives, num_views), context])
        views = get_camera(num_views, elevation=elevation, azimuth_start=azimuth_start)
        camera = None
        if self.unet.config.camera_dim is not None:
            camera = views.repeat(len(prompts), 1).to(device=device, dtype=dtype)
            if use_cfg:
                camera = torch.cat([camera, camera])

        factor = self.codec.downscale_factor
        shape = (batch, self.codec.latent_channels, height // factor, width // factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (B*F, C, h, w), got {tuple(latents.shape)}")
        else:
            latents = latents.to(device=device, dtype=dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if use_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            pred = self.unet(model_input, t, context, camera=camera, num_frames=num_views).sample
            if use_cfg:
                pred_uncond, pred_text = pred.chunk(2)
                pred = pred_uncond + guidance_scale * (pred_text - pred_uncond)
                if guidance_rescale > 0:
                    pred = _rescale_noise_cfg(pred, pred_text, guidance_rescale)
            latents = self.scheduler.step(pred, t, latents, **step_kwargs).prev_sample

        images = (self.codec.decode(latents).float() / 2 + 0.5).clamp(0, 1)  # (B*F, 3, H, W)
        images = images.reshape(len(prompts), num_views, *images.shape[1:]).cpu()
        self.maybe_free_model_hooks()
        if output_type == "pt":
            out = images
        else:
            arrays = images.permute(0, 1, 3, 4, 2).numpy()
            out = arrays if output_type == "np" else [self.numpy_to_pil(group) for group in arrays]
        if not return_dict:
            return (out, views)
        return MVDreamPipelineOutput(images=out, cameras=views)

    def prepare_extra_step_kwargs(self, generator, eta: float) -> dict:
        """Pass ``eta``/``generator`` only to schedulers whose ``step`` accepts them."""
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs


def _rescale_noise_cfg(pred, pred_text, guidance_rescale: float):
    """diffusers' CFG rescale (Lin et al.), imported only when used: its module is Stable
    Diffusion's pipeline, whose import pulls transformers' image processors and their two
    "requires torchvision" warnings into every job that samples."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    return rescale_noise_cfg(pred, pred_text, guidance_rescale=guidance_rescale)
