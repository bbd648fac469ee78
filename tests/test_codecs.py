"""Codecs: identity pixel codec and the AutoencoderKL latent codec on a tiny random VAE."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiffusionPipeline

from mvdream_platform.models.codecs import Codec, LatentCodec, PixelCodec, load_codec

from tiny_models import tiny_vae as _tiny_vae


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _assert_frozen(codec: Codec) -> None:
    assert all(not p.requires_grad for p in codec.parameters())
    codec.train()
    assert not any(m.training for m in codec.modules())


# ---------------------------------------------------------------------------------------- pixel


def test_pixel_codec_is_identity_with_clamped_decode(images, tmp_path):
    codec = load_codec("pixel")
    assert isinstance(codec, PixelCodec)
    assert (codec.latent_channels, codec.downscale_factor) == (3, 1)
    assert codec.device == torch.device("cpu")  # works without parameters (diffusers reads it)
    assert codec.encode(images) is images
    assert torch.equal(codec.decode(images), images)
    overshoot = torch.tensor([-1.5, -0.5, 0.25, 1.2]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    assert codec.decode(overshoot).flatten()[:4].tolist() == [-1.0, -0.5, 0.25, 1.0]
    assert torch.equal(codec.decode(overshoot, clamp=False), overshoot)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        codec.encode(images[:, :2])

    codec.save_pretrained(tmp_path / "pixel")
    assert sorted(p.name for p in (tmp_path / "pixel").iterdir()) == ["config.json"]
    assert isinstance(PixelCodec.from_pretrained(tmp_path / "pixel"), PixelCodec)


# --------------------------------------------------------------------------------------- latent


def test_latent_encode_decode_shapes_and_scaling(images):
    vae = _tiny_vae(scaling_factor=0.3)
    codec = LatentCodec.from_vae(vae)
    assert (codec.latent_channels, codec.downscale_factor, codec.scaling_factor) == (4, 2, 0.3)
    assert codec.vae is vae  # wrapped, not copied

    z = codec.encode(images)
    assert z.shape == (2, 4, 8, 8)
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
        expected_images = vae.decode(z / 0.3).sample.clamp(-1, 1)
    assert torch.equal(z, mean * 0.3)

    decoded = codec.decode(z)
    assert decoded.shape == (2, 3, 16, 16)
    assert decoded.min() >= -1 and decoded.max() <= 1
    assert torch.equal(decoded, expected_images)

    with pytest.raises(ValueError, match="multiples of downscale_factor=2"):
        codec.encode(images[..., :15])
    with pytest.raises(ValueError, match=r"\(N, 4, h, w\)"):
        codec.decode(z[:, :3])
    _assert_frozen(codec)


def test_latent_scaling_factor_resolution():
    vae_config = {k: v for k, v in _tiny_vae().config.items() if not k.startswith("_")}
    assert LatentCodec(vae_config=vae_config).scaling_factor == 0.3  # from the VAE config
    assert LatentCodec(vae_config=vae_config, scaling_factor=0.5).scaling_factor == 0.5
    del vae_config["scaling_factor"]
    assert LatentCodec(vae_config=vae_config).scaling_factor == 0.18215  # SD's default


def test_latent_posterior_sampling(images):
    codec = LatentCodec.from_vae(_tiny_vae())
    mean = codec.encode(images)
    a = codec.encode(images, sample=True, generator=torch.Generator().manual_seed(7))
    b = codec.encode(images, sample=True, generator=torch.Generator().manual_seed(7))
    c = codec.encode(images, sample=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert (a - mean).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3
    sampling = LatentCodec.from_vae(_tiny_vae(), sample_posterior=True)
    torch.manual_seed(3)
    assert not torch.equal(sampling.encode(images), mean)


def test_latent_encode_passes_gradients_to_images(images):
    """Score distillation back-propagates through encode into the rendered images."""
    codec = LatentCodec.from_vae(_tiny_vae())
    x = images.clone().requires_grad_(True)
    codec.encode(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in codec.parameters())


def test_latent_save_load_bit_exact(images, tmp_path):
    codec = LatentCodec.from_vae(_tiny_vae(), sample_posterior=False)
    codec.save_pretrained(tmp_path / "codec")
    saved = json.loads((tmp_path / "codec" / "config.json").read_text())
    assert saved["_class_name"] == "LatentCodec" and saved["scaling_factor"] == 0.3
    assert saved["vae_config"]["latent_channels"] == 4

    loaded = LatentCodec.from_pretrained(tmp_path / "codec")
    assert loaded.state_dict().keys() == codec.state_dict().keys()
    for name, tensor in codec.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    z = codec.encode(images)
    assert torch.equal(loaded.encode(images), z)
    assert torch.equal(loaded.decode(z), codec.decode(z))
    _assert_frozen(loaded)
    assert isinstance(load_codec("latent", tmp_path / "codec"), LatentCodec)


def test_latent_from_sd_folder(images, tmp_path):
    vae = _tiny_vae()
    vae.save_pretrained(tmp_path / "sd" / "vae")
    expected = LatentCodec.from_vae(vae).encode(images)
    for path in (tmp_path / "sd", tmp_path / "sd" / "vae"):
        assert torch.equal(load_codec("latent", path).encode(images), expected)
    assert torch.equal(LatentCodec.from_vae_folder(tmp_path / "sd").encode(images), expected)


def test_factory_errors(tmp_path):
    with pytest.raises(ValueError, match=r"allowed values are \['pixel', 'latent'\]"):
        load_codec("vqgan")
    with pytest.raises(ValueError, match="needs path"):
        load_codec("latent")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_codec("latent", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no VAE found"):
        load_codec("latent", tmp_path / "empty")
    with pytest.raises(TypeError, match="AutoencoderKL"):
        LatentCodec.from_vae(torch.nn.Linear(2, 2))


class _CodecPipeline(DiffusionPipeline):
    """The smallest pipeline holding both codecs, to test component save/load."""

    def __init__(self, codec: LatentCodec, pixel_codec: PixelCodec):
        super().__init__()
        self.register_modules(codec=codec, pixel_codec=pixel_codec)


def test_diffusion_pipeline_round_trip(images, tmp_path):
    pipe = _CodecPipeline(codec=LatentCodec.from_vae(_tiny_vae()), pixel_codec=PixelCodec())
    assert pipe.device == torch.device("cpu")
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["codec"] == ["mvdream_platform.models.codecs", "LatentCodec"]
    assert index["pixel_codec"] == ["mvdream_platform.models.codecs", "PixelCodec"]

    loaded = _CodecPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.pixel_codec, PixelCodec)
    assert torch.equal(loaded.codec.encode(images), pipe.codec.encode(images))
