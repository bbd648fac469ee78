"""Tiny random stand-ins for the real pretrained parts (no hub downloads in tests).

They are real diffusers/transformers classes at toy sizes, saved in the real folder layouts,
so loaders are exercised exactly as with Stable Diffusion 2.1.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from conftest import tiny_sd_unet_config

CLIP_LEN = 16  # tokens per prompt of the tiny CLIP (SD uses 77)
CLIP_DIM = 32
CLIP_LAYERS = 3


def write_clip_tokenizer(folder: Path, max_length: int = CLIP_LEN) -> None:
    """A tiny CLIP BPE tokenizer: single characters, word-final characters, a few merges."""
    folder.mkdir(parents=True)
    symbols = list(string.ascii_lowercase) + list(",.!")
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # SD 2.x's tokenizer pads with "!"; the max length is the model's context.
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "pad_token": "!"})
    )


def write_clip(root: Path, seed: int = 0) -> None:
    """``root/tokenizer`` and ``root/text_encoder``: a tiny random CLIP text model."""
    write_clip_tokenizer(root / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CLIP_DIM, intermediate_size=64,
        num_hidden_layers=CLIP_LAYERS, num_attention_heads=4, max_position_embeddings=CLIP_LEN,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    CLIPTextModel(config).save_pretrained(root / "text_encoder")


def tiny_vae(scaling_factor: float = 0.3, seed: int = 0) -> AutoencoderKL:
    """Two encoder blocks (downscale 2), 4 latent channels, random weights."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=scaling_factor,
    ).eval()


def write_tiny_sd_folder(root: Path, seed: int = 0) -> Path:
    """A complete diffusers SD-2.x-layout folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/."""
    write_clip(root, seed)
    torch.manual_seed(seed)
    UNet2DConditionModel(**tiny_sd_unet_config(cross_attention_dim=CLIP_DIM)).save_pretrained(root / "unet")
    tiny_vae(seed=seed).save_pretrained(root / "vae")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        root / "scheduler"
    )
    return root
