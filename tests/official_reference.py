"""An independent, compact re-implementation of the official MVDream UNet, for tests only.

The conversion tests need a model with the *official* parameter layout (``input_blocks``,
``middle_block``, ``output_blocks``, ``time_embed``, ``camera_embed``, ``out``) and the
official numerics, so that a random state dict of it can be converted and the outputs
compared. The official code (bytedance/MVDream, ``openaimodel.py``/``attention.py``) may not
be copied here, so this file re-derives the same architecture from its description:

- sinusoidal timestep embedding ``[cos, sin]`` of width ``model_channels``, then an MLP to
  ``4 * model_channels``; the camera MLP (16 -> 4C -> 4C) is added to it;
- ``ResBlock``: GroupNorm(32) -> SiLU -> conv3x3, plus the projected embedding (added, or
  FiLM ``norm(h) * (1 + scale) + shift`` with ``use_scale_shift_norm``), GroupNorm -> SiLU ->
  dropout -> conv3x3, with an identity or 1x1-conv skip;
- ``SpatialTransformer3D``: GroupNorm(32, eps 1e-6), 1x1-conv or linear projections, blocks of
  {self-attention over all views of one object, cross-attention, GEGLU feed-forward}, each
  pre-LayerNorm and residual;
- stride-2 conv downsampling, nearest x2 + conv upsampling, skip concatenation in the decoder.

``tests/test_convert_official.py`` checks this module against the real official code when
``MVDREAM_OFFICIAL_REPO`` points at a checkout, so the CI comparison is meaningful.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# Embeddings and small layers
# ---------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cosines first (the official order).

    t: (N,) possibly fractional timesteps -> (N, dim).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs.to(t.device)[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:  # odd widths get one zero column, as officially
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with 32 groups: the official UNet hard-codes 32 groups everywhere."""
    return nn.GroupNorm(32, channels, eps=eps)


class ResBlock(nn.Module):
    """Residual block conditioned on the (time + camera) embedding; (N, C, H, W) -> (N, C', H, W)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            group_norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        e = self.emb_layers(emb)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv (padding 1); (N, C, H, W) -> (N, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv; (N, C, H, W) -> (N, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


# ---------------------------------------------------------------------------------------------
# Transformer with the inflated (multi-view) self-attention
# ---------------------------------------------------------------------------------------------


class CrossAttention(nn.Module):
    """Multi-head attention without q/k/v biases; x (N, L, D), context (N, S, Dc) -> (N, L, D)."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        n, length, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # (N, L, h*d) -> (N, h, L, d)
            return t.reshape(n, t.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(n, length, -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU projection; (..., D) -> (..., D_out)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with 4x width; key layout ``net.0.proj``, ``net.2``."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock3D(nn.Module):
    """Self-attention across all F views of an object, then per-view cross-attention and FF.

    x: (B*F, L, D), context: (B*F, S, Dc) -> (B*F, L, D).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        bf, length, dim = x.shape
        # Fold the views into the token axis so each token sees every view of its object.
        x = x.reshape(bf // num_frames, num_frames * length, dim)
        x = x + self.attn1(self.norm1(x))
        x = x.reshape(bf, length, dim)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer3D(nn.Module):
    """Image <-> token wrapper around the transformer blocks; (B*F, C, H, W) -> same shape."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 use_linear: bool):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock3D(inner, heads, dim_head, context_dim) for _ in range(depth)]
        )
        # The official linear proj_out is declared Linear(channels, inner): same shape whenever
        # inner == channels, the only case it can run in.
        self.proj_out = nn.Linear(channels, inner) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        n, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # (N, HW, C)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, num_frames)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(n, -1, height, width)
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h


class EmbedSequential(nn.Sequential):
    """A block of layers; each gets the inputs it needs (embedding, context, view count)."""

    def forward(self, x, emb, context, num_frames):  # noqa: D102 - see class docstring
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer3D):
                x = layer(x, context, num_frames)
            else:
                x = layer(x)
        return x


# ---------------------------------------------------------------------------------------------
# The UNet
# ---------------------------------------------------------------------------------------------


def attention_heads(channels: int, num_heads: int, num_head_channels: int,
                    legacy: bool) -> tuple[int, int]:
    """(heads, dim_head) of a transformer at ``channels`` width, by the official rules.

    A fixed head width (``num_head_channels``) sets the head count per level; otherwise the
    head count is fixed. ``legacy`` recomputes the head width as channels // heads.
    """
    if num_head_channels == -1:
        heads, dim_head = num_heads, channels // num_heads
    else:
        heads, dim_head = channels // num_head_channels, num_head_channels
    if legacy:
        dim_head = channels // heads
    return heads, dim_head


class OfficialLayoutUNet(nn.Module):
    """Multi-view UNet with the official key layout and forward signature.

    Takes the ``unet_config.params`` keys of the official YAML (unused ones are accepted and
    ignored). forward: x (B*F, C, H, W), timesteps (B*F,), context (B*F, S, Dc),
    camera (B*F, camera_dim) or None -> (B*F, C_out, H, W).
    """

    def __init__(self, *, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int | Sequence[int], attention_resolutions: Sequence[int],
                 channel_mult: Sequence[int] = (1, 2, 4, 8), num_heads: int = -1,
                 num_head_channels: int = -1, transformer_depth: int = 1,
                 context_dim: int | None = None, legacy: bool = True,
                 use_linear_in_transformer: bool = False, use_scale_shift_norm: bool = False,
                 camera_dim: int | None = None, dropout: float = 0.0, **_unused):
        super().__init__()
        levels = len(channel_mult)
        blocks = [num_res_blocks] * levels if isinstance(num_res_blocks, int) else list(num_res_blocks)
        self.model_channels = model_channels
        emb_dim = 4 * model_channels

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, emb_dim, ch_out, use_scale_shift_norm, dropout)

        def transformer(ch: int) -> SpatialTransformer3D:
            heads, dim_head = attention_heads(ch, num_heads, num_head_channels, legacy)
            return SpatialTransformer3D(ch, heads, dim_head, transformer_depth, context_dim,
                                        use_linear_in_transformer)

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        if camera_dim is not None:
            self.camera_embed = nn.Sequential(
                nn.Linear(camera_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
            )

        self.input_blocks = nn.ModuleList(
            [EmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(blocks[level]):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        # The middle block always has a transformer, whatever attention_resolutions says.
        self.middle_block = EmbedSequential(res(ch, ch), transformer(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            for i in range(blocks[level] + 1):
                layers = [res(ch + skip_channels.pop(), channel_mult[level] * model_channels)]
                ch = channel_mult[level] * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == blocks[level]:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(
            group_norm(ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                camera: torch.Tensor | None = None, num_frames: int = 1) -> torch.Tensor:
        if x.shape[0] % num_frames:
            raise ValueError(f"batch {x.shape[0]} is not divisible by num_frames {num_frames}")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if camera is not None:
            emb = emb + self.camera_embed(camera)
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context, num_frames)
            skips.append(h)
        h = self.middle_block(h, emb, context, num_frames)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, num_frames)
        return self.out(h)


# ---------------------------------------------------------------------------------------------
# The LDM first-stage autoencoder (KL), for the VAE conversion test
# ---------------------------------------------------------------------------------------------


class VAEResBlock(nn.Module):
    """GroupNorm(32, eps 1e-6) -> swish -> conv, twice; 1x1 ``nin_shortcut`` on width change."""

    def __init__(self, ch_in: int, ch_out: int):
        super().__init__()
        self.norm1 = group_norm(ch_in, eps=1e-6)
        self.conv1 = nn.Conv2d(ch_in, ch_out, 3, padding=1)
        self.norm2 = group_norm(ch_out, eps=1e-6)
        self.conv2 = nn.Conv2d(ch_out, ch_out, 3, padding=1)
        if ch_in != ch_out:
            self.nin_shortcut = nn.Conv2d(ch_in, ch_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class VAEAttention(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out; (N, C, H, W) -> same."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = group_norm(ch, eps=1e-6)
        self.q, self.k, self.v = nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, height, width = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # (N, HW, C)
        out = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1) @ v
        return x + self.proj_out(out.transpose(1, 2).reshape(n, c, height, width))


class VAEDownsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv without padding."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _vae_mid(ch: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = VAEResBlock(ch, ch), VAEAttention(ch), VAEResBlock(ch, ch)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class OfficialLayoutVAE(nn.Module):
    """KL autoencoder with the LDM key layout (``encoder.down.{i}.block.{j}``, ``mid.attn_1``, ...).

    Takes the ``first_stage_config.params`` keys (``embed_dim``, ``ddconfig``); only configs
    without per-level attention (``attn_resolutions: []``, as in MVDream/SD) are built.
    encode: (N, in_channels, H, W) -> mean (N, embed_dim, H/2^k, W/2^k); decode: the reverse.
    """

    def __init__(self, *, embed_dim: int, ddconfig: dict, **_unused):
        super().__init__()
        ch, mults, blocks = ddconfig["ch"], list(ddconfig["ch_mult"]), ddconfig["num_res_blocks"]
        z = ddconfig["z_channels"]
        if ddconfig.get("attn_resolutions"):
            raise ValueError("the reference VAE has no per-level attention")
        self.encoder, self.decoder = nn.Module(), nn.Module()
        enc, dec = self.encoder, self.decoder

        enc.conv_in = nn.Conv2d(ddconfig["in_channels"], ch, 3, padding=1)
        enc.down, width = nn.ModuleList(), ch
        for i, mult in enumerate(mults):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(blocks):
                level.block.append(VAEResBlock(width, ch * mult))
                width = ch * mult
            if i != len(mults) - 1:
                level.downsample = VAEDownsample(width)
            enc.down.append(level)
        enc.mid = _vae_mid(width)
        enc.norm_out, enc.conv_out = group_norm(width, 1e-6), nn.Conv2d(width, 2 * z, 3, padding=1)

        dec.conv_in = nn.Conv2d(z, width, 3, padding=1)
        dec.mid = _vae_mid(width)
        levels: list[nn.Module] = []
        for i in reversed(range(len(mults))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(blocks + 1):
                level.block.append(VAEResBlock(width, ch * mults[i]))
                width = ch * mults[i]
            if i != 0:
                level.upsample = Upsample(width)
            levels.insert(0, level)  # stored lowest level first, run highest first
        dec.up = nn.ModuleList(levels)
        dec.norm_out = group_norm(width, 1e-6)
        dec.conv_out = nn.Conv2d(width, ddconfig["out_ch"], 3, padding=1)

        self.quant_conv = nn.Conv2d(2 * z, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mean; x (N, C, H, W) -> (N, embed_dim, h, w)."""
        enc = self.encoder
        h = enc.conv_in(x)
        for level in enc.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = enc.conv_out(F.silu(enc.norm_out(_run_mid(enc.mid, h))))
        return self.quant_conv(h).chunk(2, dim=1)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, embed_dim, h, w) -> image (N, out_ch, H, W)."""
        dec = self.decoder
        h = _run_mid(dec.mid, dec.conv_in(self.post_quant_conv(z)))
        for level in reversed(dec.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return dec.conv_out(F.silu(dec.norm_out(h)))


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random, well-scaled values, in place; returns the model.

    The official init zeroes output convs/projections and sets norms to (1, 0); a comparison
    on such weights would hide swapped or dropped keys, so every tensor gets distinct values.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim >= 2:  # weights: unit-variance outputs for unit-variance inputs
            p.copy_(noise / math.sqrt(p[0].numel()))
        elif name.endswith("weight"):  # norm scales around 1
            p.copy_(1.0 + 0.1 * noise)
        else:  # biases and norm shifts
            p.copy_(0.1 * noise)
    return model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (a worst-case, scale-free error)."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
