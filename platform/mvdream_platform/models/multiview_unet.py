"""MultiViewUNet: Stable Diffusion's UNet inflated into MVDream's multi-view diffusion model.

It is the stock diffusers ``UNet2DConditionModel`` (held as ``self.unet``, never forked) plus
the two things MVDream adds (paper §3.1):

* inflated 3D self-attention, as an attention processor (:mod:`.attention`);
* a camera embedding ``Linear(16, T) -> SiLU -> Linear(T, T)`` (T = time-embedding width),
  either added to the time embedding (``camera_mode="time"``, the paper's choice) or projected
  to the text width and appended to the text tokens (``camera_mode="text"``, the ablation).

For ``camera_mode="time"`` the inner UNet is built with ``class_embed_type="identity"``: the UNet
then adds whatever arrives as ``class_labels`` to its time embedding, exactly where the
official model adds ``camera_embed(camera)``. The camera MLP itself lives here, so the inner UNet
gains no parameters and SD weights load into it unchanged.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel, UNet2DConditionOutput
from torch import nn

from .attention import MultiViewAttnProcessor, check_attention_mode
from .component_io import loading_defaults

CAMERA_MODES = ("time", "text")


def _plain_unet_config(config: Any) -> dict:
    """A UNet2DConditionModel config as plain kwargs (private ``_keys`` dropped)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


class MultiViewUNet(ModelMixin, ConfigMixin):
    """Multi-view diffusion UNet.

    Args:
        unet_config: kwargs of a plain ``UNet2DConditionModel`` (as in SD's ``unet/config.json``).
        camera_dim: length of the camera vector (16: a flattened 4x4 camera-to-world matrix);
            ``None`` builds a model without camera conditioning.
        camera_mode: ``time`` (add to the time embedding) or ``text`` (extra text token).
        attention_mode: self-attention across views: ``3d`` (MVDream), ``temporal`` or ``2d``.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        unet_config: dict,
        camera_dim: int | None = 16,
        camera_mode: str = "time",
        attention_mode: str = "3d",
    ):
        super().__init__()
        if camera_mode not in CAMERA_MODES:
            raise ValueError(f"camera_mode must be one of {CAMERA_MODES}, got {camera_mode!r}")
        check_attention_mode(attention_mode)
        inner = _plain_unet_config(unet_config)
        if inner.get("class_embed_type") not in (None,) or inner.get("num_class_embeds"):
            raise ValueError("unet_config: class-conditional UNets are not supported (class_embed_type set)")
        if camera_dim is not None and camera_mode == "time":
            inner["class_embed_type"] = "identity"
        self.unet = UNet2DConditionModel(**inner)

        self.camera_embedding = None
        self.camera_to_token = None
        if camera_dim is not None:
            width = self.time_embed_dim
            self.camera_embedding = nn.Sequential(
                nn.Linear(camera_dim, width), nn.SiLU(), nn.Linear(width, width)
            )
            if camera_mode == "text":
                self.camera_to_token = nn.Linear(width, self.unet.config.cross_attention_dim)
        self.set_attention_mode(attention_mode)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_sd_unet(
        cls,
        unet_or_path: UNet2DConditionModel | str | os.PathLike,
        camera_dim: int | None = 16,
        camera_mode: str = "time",
        attention_mode: str = "3d",
        **load_kwargs: Any,
    ) -> MultiViewUNet:
        """Inflate a pretrained SD UNet (a model, a local folder or a hub id).

        Every SD weight is inherited unchanged. The camera MLP's last layer starts at zero, so
        in ``time`` mode the new model computes exactly what SD computed until training moves
        it. (In ``text`` mode the extra, all-zero token still takes part in the softmax, so
        the start is close to SD but not identical.)
        """
        base = unet_or_path
        if not isinstance(base, UNet2DConditionModel):
            base = _load_sd_unet(os.fspath(unet_or_path), **load_kwargs)
        model = cls(
            unet_config=_plain_unet_config(base.config),
            camera_dim=camera_dim,
            camera_mode=camera_mode,
            attention_mode=attention_mode,
        )
        model.unet.load_state_dict(base.state_dict(), strict=True)
        if model.camera_embedding is not None:
            nn.init.zeros_(model.camera_embedding[2].weight)
            nn.init.zeros_(model.camera_embedding[2].bias)
        return model if base.dtype == model.dtype else model.to(dtype=base.dtype)

    # ------------------------------------------------------------------ properties
    @property
    def time_embed_dim(self) -> int:
        """T, the width of the time embedding (1280 for SD)."""
        return self.unet.time_embedding.linear_2.out_features

    @property
    def in_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def sample_size(self) -> int:
        return self.unet.config.sample_size

    @property
    def downsample_factor(self) -> int:
        """Spatial sizes must be divisible by this (2 ** number of down-samplings)."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def set_attention_mode(self, mode: str) -> None:
        """Switch the self-attention across views at run time (``3d``/``temporal``/``2d``)."""
        check_attention_mode(mode)
        self.unet.set_attn_processor(MultiViewAttnProcessor(mode))
        # Keep the saved config truthful about the mode the weights were last used in.
        self.register_to_config(attention_mode=mode)

    @property
    def attention_mode(self) -> str:
        return self.config.attention_mode

    # ------------------------------------------------------------------ forward
    def embed_camera(self, camera: torch.Tensor) -> torch.Tensor:
        """camera (N, camera_dim) -> (N, T)."""
        weight = self.camera_embedding[0].weight
        return self.camera_embedding(camera.to(device=weight.device, dtype=weight.dtype))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        camera: torch.Tensor | None = None,
        num_frames: int = 1,
        return_dict: bool = True,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        """Predict noise (or v) for a batch of multi-view samples.

        Args:
            sample: (B*F, C, H, W) noisy samples, the F views of each object contiguous.
            timestep: scalar or (B*F,) diffusion timesteps.
            encoder_hidden_states: (B*F, L, D) text tokens, repeated per view.
            camera: (B*F, camera_dim) flattened camera-to-world matrices, or ``None`` for no
                camera term (2D data, or the unconditional model).
            num_frames: F; the batch must be divisible by it.
        Returns:
            ``UNet2DConditionOutput`` whose ``.sample`` is (B*F, C, H, W), or a 1-tuple.
        """
        self._check_inputs(sample, encoder_hidden_states, camera, num_frames)
        n = sample.shape[0]
        class_labels = None
        if self.config.camera_dim is not None and self.config.camera_mode == "time":
            if camera is None:
                # The identity class embedding needs an input; adding exact zeros is a no-op.
                class_labels = torch.zeros(n, self.time_embed_dim, device=sample.device, dtype=sample.dtype)
            else:
                class_labels = self.embed_camera(camera)
        elif camera is not None:  # text mode: one extra token per view
            token = self.camera_to_token(self.embed_camera(camera))
            encoder_hidden_states = torch.cat(
                [encoder_hidden_states, token[:, None].to(encoder_hidden_states.dtype)], dim=1
            )
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            class_labels=class_labels,
            cross_attention_kwargs={"num_frames": num_frames},
            return_dict=return_dict,
        )

    def _check_inputs(self, sample, encoder_hidden_states, camera, num_frames) -> None:
        if sample.ndim != 4:
            raise ValueError(f"sample must be (B*F, C, H, W), got shape {tuple(sample.shape)}")
        n = sample.shape[0]
        if not isinstance(num_frames, int) or num_frames < 1 or n % num_frames:
            raise ValueError(
                f"num_frames must be a positive integer dividing the batch size {n}, got {num_frames!r}"
            )
        if encoder_hidden_states.shape[0] != n:
            raise ValueError(
                f"encoder_hidden_states must have batch {n} (one entry per view), "
                f"got {encoder_hidden_states.shape[0]}"
            )
        if camera is not None:
            if self.config.camera_dim is None:
                raise ValueError("camera was given but this model has no camera embedding (camera_dim=None)")
            if camera.shape != (n, self.config.camera_dim):
                raise ValueError(
                    f"camera must be (B*F, {self.config.camera_dim}) = ({n}, {self.config.camera_dim}), "
                    f"got {tuple(camera.shape)}"
                )


def _load_sd_unet(path: str, **load_kwargs: Any) -> UNet2DConditionModel:
    """Load an SD UNet from a UNet folder, an SD pipeline folder (``unet/``) or a hub id."""
    if os.path.isdir(path) and os.path.isdir(os.path.join(path, "unet")):
        load_kwargs.setdefault("subfolder", "unet")
    elif os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"unet_or_path must be a folder or hub id, got the file {path!r}")
    return UNet2DConditionModel.from_pretrained(path, **(loading_defaults() | load_kwargs))
