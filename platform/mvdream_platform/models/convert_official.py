"""Convert an official bytedance/MVDream checkpoint into our diffusers-native models.

The official release is a pickled state dict (``sd-v2.1-base-4view.pt``) with the UNet under
``model.diffusion_model.*`` in the openai/LDM layout (``input_blocks``, ``middle_block``,
``output_blocks``, ``time_embed``, ``camera_embed``, ``out``), the KL autoencoder under
``first_stage_model.*`` and the text encoder under ``cond_stage_model.*``, plus a YAML config
whose ``model.params.unet_config.params`` block names the UNet's hyper-parameters.

The conversion is driven by the config alone:

1. :func:`unet_config_from_official` derives the ``UNet2DConditionModel`` config (block types
   from ``attention_resolutions``, head counts per level from ``num_head_channels`` or
   ``num_heads`` with the ``legacy`` rule, ...); :class:`MultiViewUNet` wraps it.
2. :func:`unet_module_map` lays the two module trees side by side: for every official module
   (a ResBlock's ``in_layers.0``, a transformer, a down-sampling conv) the path of its twin in
   our model. Inside a transformer both layouts name parameters identically, so a module map
   is enough: :func:`unet_key_map` turns it into a key-for-key map of every parameter of the
   built model.
3. The checkpoint must match that map exactly: any unmapped, missing or mis-shaped key stops
   the conversion with a :class:`StateDictMismatchError` that names them.

The VAE goes through diffusers' own LDM converter (a library call), with the same strictness
added on top. Outputs are written to a temporary folder and renamed into place, so a failed
conversion never leaves a readable half-written model.

Numerical parity with the official ``MultiViewUNetModel`` is tested in
``tests/test_convert_official.py``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import AutoencoderKL

from .. import storage
from ..storage import jsonable
from .multiview_unet import MultiViewUNet

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
# Official GroupNorm layers always use 32 groups; diffusers must be told the same.
NORM_GROUPS = 32
# A ResBlock's parts: (our ResnetBlock2D name, official ResBlock name).
RESNET_PARTS = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
# Official UNet options we reproduce only at these values: {name: (default, allowed values)}.
FIXED_UNET_OPTIONS = {
    "dims": (2, (2,)),
    "conv_resample": (True, (True,)),
    "resblock_updown": (False, (False,)),
    "use_spatial_transformer": (False, (True,)),
    "num_classes": (None, (None,)),
    "n_embed": (None, (None,)),
    "adm_in_channels": (None, (None,)),
    "disable_self_attentions": (None, (None,)),
    "num_attention_blocks": (None, (None,)),
    "disable_middle_self_attn": (False, (False,)),
}
# Every argument of the official MultiViewUNetModel; anything else is a typo or another model.
KNOWN_UNET_OPTIONS = frozenset({
    "image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks",
    "attention_resolutions", "dropout", "channel_mult", "conv_resample", "dims", "num_classes",
    "use_checkpoint", "use_fp16", "use_bf16", "num_heads", "num_head_channels",
    "num_heads_upsample", "use_scale_shift_norm", "resblock_updown", "use_new_attention_order",
    "use_spatial_transformer", "transformer_depth", "context_dim", "n_embed", "legacy",
    "disable_self_attentions", "num_attention_blocks", "disable_middle_self_attn",
    "use_linear_in_transformer", "adm_in_channels", "camera_dim",
})
_SHOWN = 20  # keys listed per category in an error message


# ---------------------------------------------------------------------------------------------
# Errors and results
# ---------------------------------------------------------------------------------------------


class ConversionError(ValueError):
    """The checkpoint or config cannot be converted (bad input, not a bug)."""


class UnsupportedConfigError(ConversionError):
    """A config field is missing or has a value our diffusers-based model cannot represent."""


class StateDictMismatchError(ConversionError):
    """The checkpoint's keys do not match the architecture its config describes.

    Attributes:
        unmapped: checkpoint keys the config gives no place to.
        missing: keys the config requires that the checkpoint lacks.
        misshaped: ``(key, checkpoint shape, expected shape)`` for wrongly sized tensors.
    """

    def __init__(self, what: str, unmapped: Iterable[str] = (), missing: Iterable[str] = (),
                 misshaped: Iterable[tuple[str, tuple, tuple]] = ()):
        self.unmapped, self.missing = sorted(unmapped), sorted(missing)
        self.misshaped = sorted(misshaped)
        parts = []
        for label, items in (
            ("unmapped", self.unmapped),
            ("missing", self.missing),
            ("mis-shaped (key: checkpoint vs expected)",
             [f"{k}: {list(a)} vs {list(b)}" for k, a, b in self.misshaped]),
        ):
            if items:
                shown = ", ".join(items[:_SHOWN])
                more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
                parts.append(f"{len(items)} {label}: {shown}{more}")
        super().__init__(f"{what} checkpoint does not match its config: " + "; ".join(parts))


@dataclass
class ConversionResult:
    """The converted models and what was done.

    Attributes:
        unet: the converted multi-view UNet (eval mode).
        vae: the converted autoencoder, or ``None`` when the checkpoint has none.
        scheduler_config: noise-schedule kwargs for a diffusers scheduler's ``from_config``.
        record: the JSON-able record written to ``conversion.json``.
        out_dir: where the outputs were written (path or URI), or ``None`` if not written.
        text_encoder_keys: how many ``cond_stage_model.*`` tensors the checkpoint held (the
            text encoder is not converted: SD's own text encoder is loaded separately).
        text_encoder: the SD text encoder loaded from ``text_encoder_path``, or ``None``. With it
            and a VAE, the output is a complete :class:`MVDreamPipeline` folder.
    """

    unet: MultiViewUNet
    vae: AutoencoderKL | None
    scheduler_config: dict
    record: dict
    out_dir: str | None = None
    text_encoder_keys: int = 0
    text_encoder: Any = None  # a CLIPTextEncoder when a text-encoder folder was given


# ---------------------------------------------------------------------------------------------
# Reading inputs
# ---------------------------------------------------------------------------------------------


def load_official_config(path: str | os.PathLike) -> dict:
    """Read an official YAML config (e.g. ``configs/sd-v2-base.yaml``) into plain dicts.

    Raises :class:`UnsupportedConfigError` when ``model.params.unet_config.params`` is absent.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UnsupportedConfigError(f"config {path} is not valid YAML: {err}") from err
    try:
        config["model"]["params"]["unet_config"]["params"]
    except (KeyError, TypeError) as err:
        raise UnsupportedConfigError(
            f"config {path} has no model.params.unet_config.params block (not an official "
            "MVDream/LDM config?)"
        ) from err
    return config


def load_official_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a checkpoint's tensors: a pickled dict (safely, ``weights_only``) or safetensors.

    A dict nested under ``"state_dict"`` (Lightning checkpoints) is unwrapped; non-tensor
    entries are dropped. Returns ``(state dict, facts about the file for the record)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    facts: dict[str, Any] = {"path": str(path.resolve()), "size_bytes": path.stat().st_size}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        facts["format"] = "safetensors"
        try:
            loaded: Any = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise ConversionError(f"cannot read safetensors file {path}: {err}") from err
    else:
        facts["format"] = "pickle"
        loaded = _torch_load(path)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        facts["nested_under"] = "state_dict"
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ConversionError(f"checkpoint {path} holds a {type(loaded).__name__}, not a state dict")
    state = {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    facts["non_tensor_entries"] = len(loaded) - len(state)
    if not state:
        raise ConversionError(f"checkpoint {path} contains no tensors")
    return state, facts


def _torch_load(path: Path) -> Any:
    """torch.load without executing pickled code; memory-mapped when the format allows."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):  # only the legacy (non-zip) format refuses mmap
            raise _load_error(path, err) from err
    except Exception as err:  # UnpicklingError for non-weights pickles, EOFError for truncation
        raise _load_error(path, err) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise _load_error(path, err) from err


def _load_error(path: Path, err: Exception) -> ConversionError:
    """A short error for an unloadable checkpoint (torch's own messages run to a page)."""
    text = str(err)
    if "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        what = f" ({found.group(1)})" if found else ""
        return ConversionError(
            f"cannot read checkpoint {path} as weights: it pickles Python objects{what}, which "
            "are not loaded for safety (weights_only=True); re-save its state dict"
        )
    first_line = text.splitlines()[0] if text.strip() else "truncated or corrupt file?"
    return ConversionError(f"cannot read checkpoint {path}: {type(err).__name__}: {first_line}")


def split_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split a full LDM checkpoint into its parts, each with its prefix removed.

    Returns ``{"unet": ..., "vae": ..., "text_encoder": ..., "other": ...}``. A bare UNet
    state dict (keys starting ``input_blocks.``) is accepted as the UNet.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "vae": {}, "text_encoder": {},
                                                 "other": {}}
    bare_unet = not any(k.startswith(UNET_PREFIX) for k in state) and any(
        k.startswith("input_blocks.") for k in state
    )
    for key, value in state.items():
        if bare_unet:
            parts["unet"][key] = value
        elif key.startswith(UNET_PREFIX):
            parts["unet"][key[len(UNET_PREFIX):]] = value
        elif key.startswith(VAE_PREFIX):
            parts["vae"][key[len(VAE_PREFIX):]] = value
        elif key.startswith(TEXT_PREFIX):
            parts["text_encoder"][key[len(TEXT_PREFIX):]] = value
        else:  # diffusion buffers (betas, alphas_cumprod, ...), EMA copies, logvar
            parts["other"][key] = value
    return parts


# ---------------------------------------------------------------------------------------------
# UNet: config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OfficialUNetSpec:
    """The official UNet hyper-parameters, validated and normalised.

    ``heads[level]`` is the head count of a transformer at that level (the middle block uses
    the last level's); ``attention[level]`` says whether the level has transformers.
    """

    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    attention: tuple[bool, ...]
    heads: tuple[int, ...]
    transformer_depth: int
    context_dim: int
    use_linear: bool
    scale_shift: bool
    camera_dim: int | None
    image_size: int
    dropout: float = 0.0

    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    def channels(self, level: int) -> int:
        return self.model_channels * self.channel_mult[level]


def parse_unet_params(params: Mapping[str, Any]) -> OfficialUNetSpec:
    """Validate the official ``unet_config.params`` and normalise them.

    Raises :class:`UnsupportedConfigError` naming the field for options our model cannot
    represent (they are errors, not silently different models).
    """
    params = dict(params)
    unknown = sorted(set(params) - KNOWN_UNET_OPTIONS)
    if unknown:
        raise UnsupportedConfigError(
            f"unet_config.params has unknown fields {unknown}; known: {sorted(KNOWN_UNET_OPTIONS)}"
        )
    for name in ("in_channels", "model_channels", "out_channels", "num_res_blocks",
                 "attention_resolutions", "context_dim"):
        if params.get(name) is None:
            raise UnsupportedConfigError(f"unet_config.params.{name} is required")
    for name, (default, allowed) in FIXED_UNET_OPTIONS.items():
        if params.get(name, default) not in allowed:
            raise UnsupportedConfigError(
                f"unet_config.params.{name}={params[name]!r} is not supported; allowed: "
                f"{', '.join(map(repr, allowed))}"
            )

    channel_mult = tuple(int(m) for m in params.get("channel_mult", (1, 2, 4, 8)))
    levels = len(channel_mult)
    blocks = params["num_res_blocks"]
    blocks = (int(blocks),) * levels if isinstance(blocks, int) else tuple(int(b) for b in blocks)
    if len(blocks) != levels:
        raise UnsupportedConfigError(
            f"unet_config.params.num_res_blocks has {len(blocks)} entries; channel_mult has {levels}"
        )
    mc = int(params["model_channels"])
    widths = [mc * m for m in channel_mult]
    if any(w % NORM_GROUPS for w in widths):
        raise UnsupportedConfigError(
            f"unet_config.params: every level width model_channels*channel_mult={widths} must be "
            f"divisible by {NORM_GROUPS} (the official GroupNorm groups)"
        )

    attention_resolutions = {int(r) for r in params["attention_resolutions"]}
    attention = tuple(2**level in attention_resolutions for level in range(levels))
    heads = tuple(_level_heads(params, level, w) for level, w in enumerate(widths))

    context_dim = params["context_dim"]
    if isinstance(context_dim, (list, tuple)):
        # One entry per transformer depth; our transformers take one context width.
        if len(set(context_dim)) != 1:
            raise UnsupportedConfigError(
                f"unet_config.params.context_dim={list(context_dim)}: only one context width is "
                "supported"
            )
        context_dim = context_dim[0]
    depth = params.get("transformer_depth", 1)
    if not isinstance(depth, int) or depth < 1:
        raise UnsupportedConfigError(
            f"unet_config.params.transformer_depth={depth!r}: a positive integer is required"
        )
    camera_dim = params.get("camera_dim")
    return OfficialUNetSpec(
        in_channels=int(params["in_channels"]),
        out_channels=int(params["out_channels"]),
        model_channels=mc,
        channel_mult=channel_mult,
        num_res_blocks=blocks,
        attention=attention,
        heads=heads,
        transformer_depth=depth,
        context_dim=int(context_dim),
        use_linear=bool(params.get("use_linear_in_transformer", False)),
        scale_shift=bool(params.get("use_scale_shift_norm", False)),
        camera_dim=None if camera_dim is None else int(camera_dim),
        image_size=int(params.get("image_size", 32)),
        dropout=float(params.get("dropout", 0.0)),
    )


def _level_heads(params: Mapping[str, Any], level: int, channels: int) -> int:
    """Head count of a transformer of width ``channels``, by the official rules.

    A set ``num_head_channels`` fixes the head width (heads = channels // width); otherwise
    ``num_heads`` fixes the count. With ``legacy`` the head width is then recomputed as
    channels // heads. diffusers splits a transformer of width ``channels`` into heads of
    ``channels // heads``, so the official inner width heads * head_width must equal channels.
    """
    num_heads = int(params.get("num_heads", -1))
    head_channels = int(params.get("num_head_channels", -1))
    if head_channels == -1 and num_heads == -1:
        raise UnsupportedConfigError(
            "unet_config.params: one of num_heads or num_head_channels must be set"
        )
    if head_channels != -1:
        heads, head_width = channels // head_channels, head_channels
    else:
        heads, head_width = num_heads, channels // num_heads
    if params.get("legacy", True) and heads:
        head_width = channels // heads
    if heads < 1 or heads * head_width != channels:
        raise UnsupportedConfigError(
            f"unet_config.params: level {level} has width {channels}, which num_heads="
            f"{num_heads}/num_head_channels={head_channels} (legacy={params.get('legacy', True)}) "
            f"split into {heads} heads of {head_width}; only splits covering the width exactly "
            "are supported"
        )
    return heads


def unet_config_from_official(spec: OfficialUNetSpec) -> dict:
    """The ``UNet2DConditionModel`` kwargs of the architecture ``spec`` describes."""
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in spec.attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(spec.attention))
    blocks = spec.num_res_blocks
    return {
        "sample_size": spec.image_size,
        "in_channels": spec.in_channels,
        "out_channels": spec.out_channels,
        "down_block_types": down,
        "mid_block_type": "UNetMidBlock2DCrossAttn",  # the official middle always attends
        "up_block_types": up,
        "block_out_channels": tuple(spec.channels(level) for level in range(spec.levels)),
        "layers_per_block": blocks[0] if len(set(blocks)) == 1 else blocks,
        "downsample_padding": 1,
        "act_fn": "silu",
        "norm_num_groups": NORM_GROUPS,
        "norm_eps": 1e-5,
        "cross_attention_dim": spec.context_dim,
        "transformer_layers_per_block": spec.transformer_depth,
        # diffusers reads attention_head_dim as the number of heads (a known misnomer).
        "attention_head_dim": spec.heads,
        "use_linear_projection": spec.use_linear,
        "resnet_time_scale_shift": "scale_shift" if spec.scale_shift else "default",
        # The official embedding is [cos, sin] of t * 10000^(-i/half): diffusers' SD setting.
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "dropout": spec.dropout,  # ResBlock dropout (training only)
    }


def multiview_config_from_official(spec: OfficialUNetSpec) -> dict:
    """The :class:`MultiViewUNet` kwargs: the UNet config plus the official camera conditioning
    (added to the time embedding) and inflated 3D self-attention."""
    return {
        "unet_config": unet_config_from_official(spec),
        "camera_dim": spec.camera_dim,
        "camera_mode": "time",
        "attention_mode": "3d",
    }


# ---------------------------------------------------------------------------------------------
# UNet: key map
# ---------------------------------------------------------------------------------------------


def unet_module_map(spec: OfficialUNetSpec) -> dict[str, str]:
    """Our module path -> the official module path, for every module holding parameters.

    Walks the official layout (``input_blocks`` numbered consecutively: the stem conv, then
    per level its ResBlock[+transformer] blocks and a down-sampling conv; ``output_blocks``
    the same in reverse with one extra block per level and the up-sampling conv appended to a
    level's last block) next to diffusers' ``down_blocks/mid_block/up_blocks``.
    """
    m: dict[str, str] = {
        "unet.time_embedding.linear_1": "time_embed.0",
        "unet.time_embedding.linear_2": "time_embed.2",
        "unet.conv_in": "input_blocks.0.0",
        "unet.conv_norm_out": "out.0",
        "unet.conv_out": "out.2",
    }
    if spec.camera_dim is not None:
        m["camera_embedding.0"] = "camera_embed.0"
        m["camera_embedding.2"] = "camera_embed.2"

    def resnet(ours: str, official: str) -> None:
        for our_part, official_part in RESNET_PARTS:
            m[f"{ours}.{our_part}"] = f"{official}.{official_part}"

    index = 1  # input_blocks.0 is the stem conv
    for level in range(spec.levels):
        ours = f"unet.down_blocks.{level}"
        for j in range(spec.num_res_blocks[level]):
            resnet(f"{ours}.resnets.{j}", f"input_blocks.{index}.0")
            if spec.attention[level]:
                m[f"{ours}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if level != spec.levels - 1:
            m[f"{ours}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1

    resnet("unet.mid_block.resnets.0", "middle_block.0")
    m["unet.mid_block.attentions.0"] = "middle_block.1"
    resnet("unet.mid_block.resnets.1", "middle_block.2")

    index = 0
    for up, level in enumerate(reversed(range(spec.levels))):
        ours = f"unet.up_blocks.{up}"
        for j in range(spec.num_res_blocks[level] + 1):
            resnet(f"{ours}.resnets.{j}", f"output_blocks.{index}.0")
            position = 1
            if spec.attention[level]:
                m[f"{ours}.attentions.{j}"] = f"output_blocks.{index}.1"
                position = 2
            if level and j == spec.num_res_blocks[level]:
                m[f"{ours}.upsamplers.0.conv"] = f"output_blocks.{index}.{position}.conv"
            index += 1
    return m


def unet_key_map(spec: OfficialUNetSpec, our_keys: Iterable[str]) -> dict[str, str]:
    """Official key -> our key, for every key of our model.

    A key maps through its longest module prefix in :func:`unet_module_map`; the rest of the
    name is shared (transformer internals are named alike in both layouts). Raises
    :class:`StateDictMismatchError` if one of our keys has no official counterpart (a model
    this converter does not understand).
    """
    modules = unet_module_map(spec)
    key_map, orphans = {}, []
    for key in our_keys:
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            official = modules.get(".".join(parts[:cut]))
            if official is not None:
                key_map[f"{official}.{'.'.join(parts[cut:])}"] = key
                break
        else:
            orphans.append(key)
    if orphans:
        raise StateDictMismatchError(
            "UNet (model keys without an official counterpart)", missing=orphans
        )
    return key_map


def convert_unet(state: Mapping[str, torch.Tensor], spec: OfficialUNetSpec,
                 dtype: torch.dtype = torch.float32) -> MultiViewUNet:
    """Build a :class:`MultiViewUNet` from an official UNet state dict (prefix removed).

    state: official keys (``input_blocks.1.0.in_layers.0.weight``, ...) -> tensors.
    Raises :class:`StateDictMismatchError` on any unmapped, missing or mis-shaped key.
    """
    # Built without memory: the checkpoint's tensors become the parameters (assign=True).
    with torch.device("meta"):
        model = MultiViewUNet(**multiview_config_from_official(spec))
    expected = model.state_dict()
    key_map = unet_key_map(spec, expected)
    misshaped = [
        (k, tuple(state[k].shape), tuple(expected[ours].shape))
        for k, ours in key_map.items()
        if k in state and state[k].shape != expected[ours].shape
    ]
    unmapped, missing = set(state) - set(key_map), set(key_map) - set(state)
    if unmapped or missing or misshaped:
        raise StateDictMismatchError("UNet", unmapped, missing, misshaped)
    converted = {ours: state[k].to(dtype).contiguous() for k, ours in key_map.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------


def vae_config_from_official(config: Mapping[str, Any]) -> dict | None:
    """``AutoencoderKL`` kwargs from ``model.params.first_stage_config``, or ``None`` if absent.

    ``scaling_factor`` comes from ``model.params.scale_factor`` (0.18215 for SD/MVDream).
    """
    model_params = config["model"]["params"]
    first_stage = (model_params.get("first_stage_config") or {}).get("params")
    if not first_stage:
        return None
    dd = first_stage.get("ddconfig") or {}
    for name in ("ch", "ch_mult", "num_res_blocks", "z_channels", "in_channels", "out_ch"):
        if dd.get(name) is None:
            raise UnsupportedConfigError(f"first_stage_config.params.ddconfig.{name} is required")
    if not dd.get("double_z", True):
        raise UnsupportedConfigError("first_stage_config.params.ddconfig.double_z=False is not supported")
    if dd.get("attn_resolutions"):
        raise UnsupportedConfigError(
            f"first_stage_config.params.ddconfig.attn_resolutions={list(dd['attn_resolutions'])}: "
            "only [] (attention in the middle block only, as in SD) is supported"
        )
    if first_stage.get("embed_dim", dd["z_channels"]) != dd["z_channels"]:
        raise UnsupportedConfigError(
            f"first_stage_config.params.embed_dim={first_stage['embed_dim']} must equal "
            f"ddconfig.z_channels={dd['z_channels']}"
        )
    widths = tuple(int(dd["ch"]) * int(m) for m in dd["ch_mult"])
    if any(w % NORM_GROUPS for w in widths):
        raise UnsupportedConfigError(
            f"first_stage_config: widths ch*ch_mult={list(widths)} must be divisible by {NORM_GROUPS}"
        )
    return {
        "in_channels": int(dd["in_channels"]),
        "out_channels": int(dd["out_ch"]),
        "down_block_types": ("DownEncoderBlock2D",) * len(widths),
        "up_block_types": ("UpDecoderBlock2D",) * len(widths),
        "block_out_channels": widths,
        "layers_per_block": int(dd["num_res_blocks"]),
        "latent_channels": int(dd["z_channels"]),
        "norm_num_groups": NORM_GROUPS,
        "act_fn": "silu",
        "sample_size": int(dd.get("resolution", 256)),
        "scaling_factor": float(model_params.get("scale_factor", 0.18215)),
    }


def convert_vae(state: Mapping[str, torch.Tensor], vae_config: Mapping[str, Any],
                dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """Build a diffusers ``AutoencoderKL`` from an LDM first-stage state dict (prefix removed).

    The renaming is diffusers' ``convert_ldm_vae_checkpoint``; this adds the strictness it
    lacks: every source tensor must be used and every model key filled with the right shape.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    # The LDM loss module (LPIPS, discriminator) is training-only; it has no diffusers twin.
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    converted = convert_ldm_vae_checkpoint(
        {VAE_PREFIX + k: v for k, v in state.items()}, dict(vae_config)
    )
    # The library renames silently and drops what it does not know; a source tensor whose
    # storage no converted tensor shares was dropped.
    used = {_storage_id(t) for t in converted.values()}
    unmapped = [k for k, t in state.items() if _storage_id(t) not in used]

    with torch.device("meta"):
        model = AutoencoderKL(**vae_config)
    expected = model.state_dict()
    missing = set(expected) - set(converted)
    extra = set(converted) - set(expected)
    misshaped = [
        (k, tuple(converted[k].shape), tuple(expected[k].shape))
        for k in set(converted) & set(expected)
        if converted[k].shape != expected[k].shape
    ]
    if unmapped or missing or extra or misshaped:
        raise StateDictMismatchError(
            "VAE", unmapped=[*unmapped, *(f"(converted) {k}" for k in extra)],
            missing=[f"(diffusers) {k}" for k in missing], misshaped=misshaped,
        )
    model.load_state_dict(
        {k: v.to(dtype).contiguous() for k, v in converted.items()}, strict=True, assign=True
    )
    return model.eval()


def _storage_id(t: torch.Tensor) -> tuple[int, int]:
    return t.untyped_storage().data_ptr(), t.storage_offset()


# ---------------------------------------------------------------------------------------------
# Scheduler
# ---------------------------------------------------------------------------------------------


def scheduler_config_from_official(config: Mapping[str, Any]) -> dict:
    """Noise-schedule kwargs (for e.g. ``DDIMScheduler.from_config``) from ``model.params``.

    LDM's "linear" schedule interpolates sqrt(beta) linearly: diffusers' "scaled_linear".
    """
    p = config["model"]["params"]
    schedules = {"linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
    predictions = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
    schedule = p.get("beta_schedule", "linear")
    parameterization = p.get("parameterization", "eps")
    if schedule not in schedules:
        raise UnsupportedConfigError(
            f"model.params.beta_schedule={schedule!r}; allowed: {', '.join(schedules)}"
        )
    if parameterization not in predictions:
        raise UnsupportedConfigError(
            f"model.params.parameterization={parameterization!r}; allowed: {', '.join(predictions)}"
        )
    return {
        "num_train_timesteps": int(p.get("timesteps", 1000)),
        "beta_start": float(p.get("linear_start", 0.00085)),
        "beta_end": float(p.get("linear_end", 0.012)),
        "beta_schedule": schedules[schedule],
        "prediction_type": predictions[parameterization],
    }


# ---------------------------------------------------------------------------------------------
# The whole conversion
# ---------------------------------------------------------------------------------------------


def convert_models(ckpt_path: str | os.PathLike, config_path: str | os.PathLike, *,
                   dtype: torch.dtype = torch.float32,
                   text_encoder_path: str | os.PathLike | None = None) -> ConversionResult:
    """Convert an official MVDream checkpoint + config into our models, in memory.

    ``ckpt_path``/``config_path`` are local files (the checkpoint is memory-mapped).
    ``text_encoder_path``: a diffusers SD folder (or URI) whose ``text_encoder/`` +
    ``tokenizer/`` match the checkpoint (SD 2.1-base for ``sd-v2.1-base-4view``), loaded and
    checked against the UNet's context width. Writing the models (as a folder or a whole
    pipeline) is :func:`mvdream_platform.pipelines.convert_official.convert_checkpoint`'s job.

    Raises:
        ConversionError: (a ``ValueError``) unreadable or mismatched checkpoint, unsupported
            config; its subclasses say which.
        FileNotFoundError: a missing input file.
    """
    config = load_official_config(config_path)
    spec = parse_unet_params(config["model"]["params"]["unet_config"]["params"])
    vae_config = vae_config_from_official(config)
    scheduler_config = scheduler_config_from_official(config)

    state, facts = load_official_state_dict(ckpt_path)
    parts = split_state_dict(state)
    if not parts["unet"]:
        raise ConversionError(
            f"checkpoint {ckpt_path} has no UNet keys (expected '{UNET_PREFIX}*')"
        )
    log.info("converting UNet: %d tensors", len(parts["unet"]))
    unet = convert_unet(parts["unet"], spec, dtype)
    vae_state = {k: v for k, v in parts["vae"].items() if not k.startswith("loss.")}
    vae = None
    if vae_state:
        if vae_config is None:
            raise UnsupportedConfigError(
                f"checkpoint has {len(vae_state)} '{VAE_PREFIX}*' keys but the config has no "
                "model.params.first_stage_config"
            )
        log.info("converting VAE: %d tensors", len(vae_state))
        vae = convert_vae(vae_state, vae_config, dtype)

    record = {
        "converter": "mvdream_platform.convert_official",
        "source": facts,
        "config": {
            "path": str(Path(config_path).resolve()),
            "unet_params": config["model"]["params"]["unet_config"]["params"],
        },
        "keys": {
            "total": len(state),
            "unet": len(parts["unet"]),
            "vae": len(vae_state),
            "vae_ignored_loss": len(parts["vae"]) - len(vae_state),
            "text_encoder_not_converted": len(parts["text_encoder"]),
            # Diffusion buffers (betas, ...) and EMA copies; names capped to keep the record small.
            "other_ignored": len(parts["other"]),
            "other_ignored_names": sorted(parts["other"])[:50],
        },
        "unet": {"parameters": sum(p.numel() for p in unet.parameters()),
                 "config": jsonable(_public(unet.config))},
        "vae": None if vae is None else {"parameters": sum(p.numel() for p in vae.parameters()),
                                         "config": jsonable(_public(vae.config))},
        "scheduler": scheduler_config,
        "dtype": str(dtype).removeprefix("torch."),
        "versions": _versions(),
    }
    text_encoder = None
    if text_encoder_path is not None:
        text_encoder = _load_text_encoder(text_encoder_path, spec.context_dim)
        record["text_encoder"] = {"path": os.fspath(text_encoder_path), "dim": text_encoder.dim,
                                  "max_length": text_encoder.max_length}
    return ConversionResult(unet=unet, vae=vae, scheduler_config=scheduler_config,
                            record=record, text_encoder_keys=len(parts["text_encoder"]),
                            text_encoder=text_encoder)


def _load_text_encoder(path: str | os.PathLike, context_dim: int):
    """The CLIP text encoder of an SD folder; its width must match the UNet's context."""
    from .text_encoders import CLIPTextEncoder

    try:
        encoder = CLIPTextEncoder.from_pretrained(storage.get_dir(path))
    except (FileNotFoundError, OSError, ValueError) as err:
        raise ConversionError(f"text encoder {os.fspath(path)!r} could not be loaded: {err}") from err
    if encoder.dim != context_dim:
        raise ConversionError(
            f"text encoder {os.fspath(path)!r} has width {encoder.dim} but the UNet's context_dim "
            f"is {context_dim}; use the SD version the checkpoint was fine-tuned from"
        )
    return encoder


def _public(config: Mapping[str, Any]) -> dict:
    """A diffusers config without its private keys (``_class_name``, ``_diffusers_version``)."""
    return {k: v for k, v in config.items() if not str(k).startswith("_")}


def _versions() -> dict:
    import diffusers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__}
