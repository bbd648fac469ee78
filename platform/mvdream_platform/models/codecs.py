"""Codecs: the space the diffusion model denoises in.

One interface for pixel-space and latent-space models::

    codec.encode(images)  # (N, 3, H, W) in [-1, 1] -> z (N, C, H / f, W / f)
    codec.decode(z)       # (N, C, h, w)            -> images (N, 3, h * f, w * f) in [-1, 1]
    codec.latent_channels   # C
    codec.downscale_factor  # f

- :class:`PixelCodec`: identity (C = 3, f = 1), no weights; the embedded tiny default model.
- :class:`LatentCodec`: Stable Diffusion's ``AutoencoderKL`` with its latent scaling factor
  (0.18215 for SD), for real models.

Codecs are frozen (``requires_grad=False``, eval mode) but NOT run under ``no_grad``: score
distillation back-propagates through ``encode`` into the rendered images, so gradients flow to
the inputs. Wrap calls in ``torch.no_grad()`` where none are needed (data preparation,
sampling). Both classes are diffusers ``ModelMixin, ConfigMixin`` subclasses, so a
``DiffusionPipeline`` saves and loads them as components.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .component_io import ConfigOnlyComponent, existing_dir, loading_defaults, read_own_config

__all__ = ["CODEC_KINDS", "Codec", "LatentCodec", "PixelCodec", "load_codec"]

PathLike = str | os.PathLike

# SD 1.x / 2.x latent scale: makes the VAE latents roughly unit-variance. Used when neither the
# caller nor the VAE config says otherwise.
SD_SCALING_FACTOR = 0.18215


class Codec(ModelMixin, ConfigMixin):
    """Interface shared by all codecs (see the module docstring)."""

    @property
    def latent_channels(self) -> int:
        """C: channels of z."""
        raise NotImplementedError

    @property
    def downscale_factor(self) -> int:
        """f: image side / latent side."""
        raise NotImplementedError

    def encode(
        self,
        images: torch.Tensor,
        *,
        sample: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(N, 3, H, W) images in [-1, 1] -> (N, C, H / f, W / f) z."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
        """(N, C, h, w) z -> (N, 3, h * f, w * f) images, clamped to [-1, 1] unless ``clamp=False``."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> Codec:
        # Frozen by design: the codec is a fixed coordinate change, never a trained part.
        return super().train(False)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected shape (N, 3, H, W), got {tuple(images.shape)}")
        f = self.downscale_factor
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(
                f"images: height and width must be multiples of downscale_factor={f}, "
                f"got {tuple(images.shape[-2:])}"
            )

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(
                f"z: expected shape (N, {self.latent_channels}, h, w), got {tuple(z.shape)}"
            )


class PixelCodec(ConfigOnlyComponent, Codec):
    """Identity codec for pixel-space models: C = 3, f = 1, no weights.

    ``encode`` returns the images as they are (no copy); ``decode`` clamps to [-1, 1] because a
    model's x0 estimate can overshoot. ``save_pretrained`` writes only ``config.json``.
    """

    @register_to_config
    def __init__(self):
        super().__init__()
        # An empty, unsaved buffer so .device / .dtype (which diffusers reads from a module's
        # parameters or buffers, e.g. in DiffusionPipeline.device) work and follow .to().
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)
        self.train(False)

    @property
    def latent_channels(self) -> int:
        return 3

    @property
    def downscale_factor(self) -> int:
        return 1

    def encode(
        self,
        images: torch.Tensor,
        *,
        sample: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(N, 3, H, W) -> the same tensor; ``sample`` / ``generator`` are accepted and ignored."""
        self._check_images(images)
        return images

    def decode(self, z: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 3, H, W), clamped to [-1, 1] unless ``clamp=False``."""
        self._check_latents(z)
        return z.clamp(-1.0, 1.0) if clamp else z

    def _cast_after_load(self, dtype: torch.dtype) -> None:
        # Only .dtype reports it; set the anchor directly (ModelMixin.to(dtype) logs a
        # spurious fp32-modules warning).
        self._device_anchor = self._device_anchor.to(dtype)


class LatentCodec(Codec):
    """Stable Diffusion's ``AutoencoderKL`` as a codec.

    ``z = (mean_or_sample(posterior) - shift_factor) * scaling_factor`` and
    ``images = vae.decode(z / scaling_factor + shift_factor)``. SD 1.x/2.x VAEs have
    scaling_factor 0.18215 and no shift.

    The VAE's own config is stored, as a nested dict, in this codec's config (``vae_config``),
    so the standard ModelMixin ``save_pretrained`` / ``from_pretrained`` round-trip it: one
    ``config.json`` plus one safetensors file with keys ``vae.*``. To start from existing VAE
    weights use :meth:`from_vae` (a loaded ``AutoencoderKL``) or :meth:`from_vae_folder`
    (a diffusers SD folder's ``vae/``, or a VAE folder).

    Posterior: ``encode`` uses the posterior mean by default (deterministic; what SD-style
    fine-tuning and SDS commonly use); pass ``sample=True`` (optionally with a
    ``torch.Generator``), or set ``sample_posterior=True`` in the config, to draw a sample.
    """

    @register_to_config
    def __init__(
        self,
        vae_config: dict[str, Any],
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        sample_posterior: bool = False,
    ):
        """
        Args:
            vae_config: ``AutoencoderKL`` config (``dict(vae.config)``); builds a VAE with
                random weights (``from_vae`` / ``from_pretrained`` then supply real ones).
            scaling_factor: latent scale; None reads the VAE config's ``scaling_factor`` when
                present, else 0.18215 (SD).
            shift_factor: latent shift; None reads the VAE config's ``shift_factor`` when
                present and not null, else 0.
            sample_posterior: default of ``encode(sample=...)``.
        """
        super().__init__()
        vae_config = {k: v for k, v in dict(vae_config).items() if not k.startswith("_")}
        if scaling_factor is None:
            scaling_factor = vae_config.get("scaling_factor") or SD_SCALING_FACTOR
        if shift_factor is None:
            shift_factor = vae_config.get("shift_factor") or 0.0
        if not scaling_factor > 0:
            raise ValueError(f"scaling_factor={scaling_factor}: must be > 0")
        # Record the resolved values (and a clean VAE config) so the saved config says exactly
        # what this codec does, independent of library defaults at load time.
        self.register_to_config(
            vae_config=vae_config,
            scaling_factor=float(scaling_factor),
            shift_factor=float(shift_factor),
        )
        self.vae = AutoencoderKL.from_config(vae_config)
        self._freeze()

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.train(False)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downscale_factor(self) -> int:
        # Every encoder block but the last halves the resolution (diffusers' VaeImageProcessor
        # uses the same rule for its vae_scale_factor).
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(self.config.shift_factor)

    def encode(
        self,
        images: torch.Tensor,
        *,
        sample: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Encode images into scaled latents.

        Args:
            images: (N, 3, H, W) in [-1, 1]; H and W multiples of ``downscale_factor``.
            sample: draw from the posterior instead of taking its mean; None uses the config's
                ``sample_posterior`` (default False).
            generator: random source for ``sample=True``.

        Returns:
            (N, C, H / f, W / f) z, in the dtype of ``images`` (computed in the VAE's dtype).
        """
        self._check_images(images)
        if sample is None:
            sample = bool(self.config.sample_posterior)
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator) if sample else posterior.mean
        z = (latents - self.shift_factor) * self.scaling_factor
        return z.to(images.dtype)

    def decode(self, z: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
        """Decode scaled latents.

        Args:
            z: (N, C, h, w) scaled latents.
            clamp: clamp the output to [-1, 1] (the VAE can overshoot slightly).

        Returns:
            (N, 3, h * f, w * f) images, in the dtype of ``z``.
        """
        self._check_latents(z)
        latents = z.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        images = self.vae.decode(latents).sample
        if clamp:
            images = images.clamp(-1.0, 1.0)
        return images.to(z.dtype)

    @classmethod
    def from_vae(cls, vae: AutoencoderKL, **kwargs: Any) -> LatentCodec:
        """Wrap a loaded ``AutoencoderKL`` (shared, not copied; it is frozen in place).

        Args:
            vae: the VAE.
            **kwargs: ``scaling_factor``, ``shift_factor``, ``sample_posterior``.
        """
        if not isinstance(vae, AutoencoderKL):
            raise TypeError(f"vae: expected a diffusers AutoencoderKL, got {type(vae).__name__}")
        # Build the wrapper on the meta device (no memory, no random init of a second VAE),
        # then put the given VAE in place of the placeholder.
        with torch.device("meta"):
            codec = cls(vae_config=dict(vae.config), **kwargs)
        codec.vae = vae
        codec._freeze()
        return codec

    @classmethod
    def from_vae_folder(
        cls,
        path: PathLike,
        torch_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> LatentCodec:
        """Load the VAE of a local diffusers SD folder (its ``vae/``) or a VAE folder itself.

        Args:
            path: a folder with a ``vae/`` subfolder, or one holding the VAE's config.json.
            torch_dtype: parameter dtype (default: as saved).
            **kwargs: see :meth:`from_vae`.
        """
        folder = existing_dir(path, f"{cls.__name__}.from_vae_folder")
        if (folder / "vae").is_dir():
            folder = folder / "vae"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{cls.__name__}.from_vae_folder: no VAE found under {str(path)!r} "
                "(expected a vae/ subfolder or a config.json)"
            )
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=torch_dtype,
                                            **loading_defaults())
        return cls.from_vae(vae, **kwargs)


CODEC_KINDS = ("pixel", "latent")


def load_codec(kind: str, path: PathLike | None = None, **kwargs: Any) -> Codec:
    """Build a codec by name.

    Args:
        kind: "pixel" or "latent".
        path: "latent" only, required: a folder written by ``LatentCodec.save_pretrained``, a
            diffusers SD folder (its ``vae/`` is used) or a VAE folder.
        **kwargs: passed to the codec's loader (e.g. ``scaling_factor``, ``torch_dtype``).

    Raises:
        ValueError: unknown ``kind``, or "latent" without a path.
        FileNotFoundError: ``path`` is not an existing local folder.
    """
    if kind not in CODEC_KINDS:
        raise ValueError(f"codec kind={kind!r}: allowed values are {list(CODEC_KINDS)}")
    if kind == "pixel":
        return PixelCodec(**kwargs)
    if path is None:
        raise ValueError(
            "codec kind='latent' needs path= (a saved LatentCodec, a diffusers SD folder or a "
            "VAE folder)"
        )
    folder = existing_dir(path, "load_codec('latent', path=...)")
    if read_own_config(folder, LatentCodec.__name__) is not None:
        return LatentCodec.from_pretrained(folder, **kwargs)
    return LatentCodec.from_vae_folder(folder, **kwargs)
