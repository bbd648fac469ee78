"""Multi-view self-attention as a diffusers attention processor.

MVDream's one architectural change to Stable Diffusion is in the self-attention of every
transformer block: the tokens of the F views of one object are joined so that each token
attends to every view ("inflated 3D attention", paper §3.1). No weights are added; SD's own
``to_q/to_k/to_v/to_out`` are reused. Cross-attention and the feed-forward stay per view.

The algorithm lives in a processor (diffusers' swappable attention hook), so the UNet stays
the stock ``UNet2DConditionModel``. The processor is installed on *every* ``Attention`` module:
on self-attention it applies the view mode, on cross-attention it is plain per-view attention.
Installing it everywhere lets ``num_frames`` travel through ``cross_attention_kwargs`` without
diffusers warning that a processor does not accept it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

ATTENTION_MODES = ("3d", "temporal", "2d")


def check_attention_mode(mode: str) -> str:
    """Return ``mode`` if it is a known view-attention mode, else raise ``ValueError``."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {mode!r}")
    return mode


def group_views(tokens: torch.Tensor, num_frames: int, mode: str) -> torch.Tensor:
    """Regroup per-view tokens into the attention groups of ``mode``.

    Args:
        tokens: (B*F, N, C) tokens of each view, views of one object contiguous.
        num_frames: F, views per object.
        mode: ``3d``: (B, F*N, C), every token sees all views; ``temporal``: (B*N, F, C),
            a token sees the same position in the other views (video-model style);
            ``2d``: unchanged (B*F, N, C).
    """
    if mode == "2d" or num_frames == 1:
        return tokens
    bf, n, c = tokens.shape
    b = bf // num_frames
    if mode == "3d":
        return tokens.reshape(b, num_frames * n, c)
    # temporal: (B, F, N, C) -> (B, N, F, C) -> (B*N, F, C)
    return tokens.reshape(b, num_frames, n, c).transpose(1, 2).reshape(b * n, num_frames, c)


def ungroup_views(tokens: torch.Tensor, num_frames: int, mode: str, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`group_views`: back to (B*F, N, C) given the original ``shape``."""
    if mode == "2d" or num_frames == 1:
        return tokens
    bf, n, c = shape
    b = bf // num_frames
    if mode == "3d":
        return tokens.reshape(bf, n, c)
    return tokens.reshape(b, n, num_frames, c).transpose(1, 2).reshape(bf, n, c)


class MultiViewAttnProcessor:
    """Scaled-dot-product attention with the view grouping of ``mode`` on self-attention.

    Args:
        mode: ``3d`` (default, MVDream), ``temporal`` or ``2d``; see :func:`group_views`.
    """

    def __init__(self, mode: str = "3d"):
        self.mode = check_attention_mode(mode)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        num_frames: int = 1,
    ) -> torch.Tensor:
        """hidden_states (B*F, N, C) -> (B*F, N, C)."""
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            # SD UNets never use these; failing loudly beats silently computing something else.
            raise NotImplementedError(
                "MultiViewAttnProcessor supports token inputs (B*F, N, C) without spatial/group "
                "norm, as in Stable Diffusion's transformer blocks"
            )
        residual = hidden_states
        is_self_attention = encoder_hidden_states is None
        mode = self.mode if is_self_attention else "2d"
        if is_self_attention and attention_mask is not None and mode != "2d":
            raise ValueError("attention_mask is not supported with multi-view self-attention")

        shape = hidden_states.shape
        hidden_states = group_views(hidden_states, num_frames, mode)
        context = hidden_states if is_self_attention else encoder_hidden_states
        if not is_self_attention and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        # (batch, tokens, heads*head_dim) -> (batch, heads, tokens, head_dim)
        query, key, value = (
            x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # linear projection, then dropout
        out = ungroup_views(out, num_frames, mode, shape)

        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
