"""MultiViewUNet: equivalences with the base SD UNet, view mixing, camera terms, persistence."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from mvdream_platform.models import MultiViewUNet
from mvdream_platform.models.attention import MultiViewAttnProcessor

from conftest import tiny_sd_unet_config


def _inputs(n=4, tokens=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    text = torch.randn(n, tokens, 16, generator=g)
    camera = torch.randn(n, 16, generator=g)
    return x, t, text, camera


def _randomise_camera(model: MultiViewUNet, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.camera_embedding.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@torch.no_grad()
def test_single_view_without_camera_equals_base_unet(sd_unet):
    model = MultiViewUNet.from_sd_unet(sd_unet).eval()
    _randomise_camera(model)  # camera=None must not use the camera MLP at all
    x, t, text, _ = _inputs()
    expected = sd_unet(x, t, text).sample
    got = model(x, t, text, camera=None, num_frames=1).sample
    assert got.shape == (4, 4, 8, 8)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_2d_mode_with_four_views_equals_base_per_view(sd_unet):
    model = MultiViewUNet.from_sd_unet(sd_unet, attention_mode="2d").eval()
    x, t, text, _ = _inputs(n=8)
    expected = torch.cat([sd_unet(x[i : i + 1], t[i : i + 1], text[i : i + 1]).sample for i in range(8)])
    torch.testing.assert_close(model(x, t, text, num_frames=4).sample, expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_zero_initialised_camera_starts_exactly_at_sd(sd_unet):
    model = MultiViewUNet.from_sd_unet(sd_unet, attention_mode="2d").eval()
    x, t, text, camera = _inputs()
    torch.testing.assert_close(
        model(x, t, text, camera=camera).sample, sd_unet(x, t, text).sample, atol=1e-6, rtol=0
    )
    assert model.camera_embedding[2].weight.abs().max() == 0
    assert model.camera_embedding[0].weight.abs().max() > 0  # first layer keeps a random init


@torch.no_grad()
def test_views_mix_only_within_an_object_and_only_when_asked(sd_unet):
    x, t, text, _ = _inputs(n=8)
    t = torch.full((8,), 500)
    x2 = x.clone()
    x2[1] += 1.0  # perturb view 1 of object 0
    for mode, view0_changes in [("3d", True), ("temporal", True), ("2d", False)]:
        model = MultiViewUNet.from_sd_unet(sd_unet, attention_mode=mode).eval()
        a = model(x, t, text, num_frames=4).sample
        b = model(x2, t, text, num_frames=4).sample
        assert bool((a[0] - b[0]).abs().max() > 1e-4) is view0_changes, mode
        # object 1 (views 4..7) never sees object 0
        torch.testing.assert_close(a[4:], b[4:], atol=1e-6, rtol=0)


def _attention_module():
    torch.manual_seed(0)
    return Attention(query_dim=12, heads=3, dim_head=4).eval()


@torch.no_grad()
@pytest.mark.parametrize("mode", ["3d", "temporal", "2d"])
def test_processor_matches_plain_attention_on_regrouped_tokens(mode):
    attn = _attention_module()
    b, f, n, c = 2, 4, 6, 12
    tokens = torch.randn(b * f, n, c)
    got = MultiViewAttnProcessor(mode)(attn, tokens, num_frames=f)
    plain = AttnProcessor2_0()
    if mode == "3d":  # (B*F, N, C) -> (B, F*N, C): every token attends to all views
        expected = plain(attn, tokens.reshape(b, f * n, c)).reshape(b * f, n, c)
    elif mode == "temporal":  # attend across views at the same token position
        grouped = tokens.reshape(b, f, n, c).permute(0, 2, 1, 3).reshape(b * n, f, c)
        expected = plain(attn, grouped).reshape(b, n, f, c).permute(0, 2, 1, 3).reshape(b * f, n, c)
    else:
        expected = plain(attn, tokens)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_cross_attention_stays_per_view():
    torch.manual_seed(0)
    context_attn = Attention(query_dim=12, cross_attention_dim=7, heads=3, dim_head=4).eval()
    tokens, context = torch.randn(8, 6, 12), torch.randn(8, 5, 7)
    got = MultiViewAttnProcessor("3d")(context_attn, tokens, encoder_hidden_states=context, num_frames=4)
    expected = AttnProcessor2_0()(context_attn, tokens, encoder_hidden_states=context)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_camera_is_added_to_the_time_embedding(sd_unet):
    """Time mode equals the base UNet with MLP(camera) added after its time-embedding MLP."""
    model = MultiViewUNet.from_sd_unet(sd_unet, attention_mode="2d").eval()
    _randomise_camera(model)
    x, t, text, camera = _inputs()
    extra = model.camera_embedding(camera)
    hook = sd_unet.time_embedding.register_forward_hook(lambda mod, inp, out: out + extra)
    try:
        expected = sd_unet(x, t, text).sample
    finally:
        hook.remove()
    got = model(x, t, text, camera=camera).sample
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert (got - model(x, t, text).sample).abs().max() > 1e-3  # the camera matters


@torch.no_grad()
def test_camera_as_text_token(sd_unet):
    model = MultiViewUNet.from_sd_unet(sd_unet, camera_mode="text", attention_mode="2d").eval()
    _randomise_camera(model)
    x, t, text, camera = _inputs()
    token = model.camera_to_token(model.camera_embedding(camera))
    expected = sd_unet(x, t, torch.cat([text, token[:, None]], dim=1)).sample
    torch.testing.assert_close(model(x, t, text, camera=camera).sample, expected, atol=1e-6, rtol=0)
    # no camera: the plain SD UNet (no identity class embedding in text mode)
    torch.testing.assert_close(model(x, t, text).sample, sd_unet(x, t, text).sample, atol=1e-6, rtol=0)


def test_attention_mode_switches_at_run_time_and_is_saved(sd_unet, tmp_path):
    model = MultiViewUNet.from_sd_unet(sd_unet)
    assert model.attention_mode == "3d"
    model.set_attention_mode("temporal")
    processors = set(type(p).__name__ for p in model.unet.attn_processors.values())
    assert processors == {"MultiViewAttnProcessor"}
    assert {p.mode for p in model.unet.attn_processors.values()} == {"temporal"}
    model.save_pretrained(tmp_path)
    assert MultiViewUNet.from_pretrained(tmp_path).attention_mode == "temporal"


@torch.no_grad()
def test_save_and_load_round_trip_is_bit_exact(sd_unet, tmp_path):
    model = MultiViewUNet.from_sd_unet(sd_unet).eval()
    _randomise_camera(model)
    model.save_pretrained(tmp_path / "mv")
    loaded = MultiViewUNet.from_pretrained(tmp_path / "mv").eval()
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    x, t, text, camera = _inputs(n=8)
    assert torch.equal(
        model(x, t, text, camera=camera, num_frames=4).sample,
        loaded(x, t, text, camera=camera, num_frames=4).sample,
    )


def test_from_sd_unet_loads_a_saved_folder(sd_unet, tmp_path):
    sd_unet.save_pretrained(tmp_path / "sd" / "unet")
    for path in (tmp_path / "sd", tmp_path / "sd" / "unet"):  # pipeline folder or unet folder
        model = MultiViewUNet.from_sd_unet(path)
        assert torch.equal(model.unet.conv_in.weight, sd_unet.conv_in.weight)


def test_gradient_checkpointing_gives_the_same_gradients(sd_unet):
    x, t, text, camera = _inputs(n=4)
    grads = []
    for checkpointing in (False, True):
        model = MultiViewUNet.from_sd_unet(sd_unet)
        _randomise_camera(model)
        model.train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        loss = model(x, t, text, camera=camera, num_frames=4).sample.square().mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)
    assert "camera_embedding.0.weight" in grads[0]


def test_bad_inputs_are_rejected_with_a_clear_message(sd_unet):
    model = MultiViewUNet.from_sd_unet(sd_unet)
    x, t, text, camera = _inputs(n=6)
    with pytest.raises(ValueError, match="num_frames"):
        model(x, t, text, num_frames=4)
    with pytest.raises(ValueError, match="camera must be"):
        model(x, t, text, camera=camera[:, :8], num_frames=2)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(x, t, text[:3], num_frames=2)
    with pytest.raises(ValueError, match="attention_mode"):
        model.set_attention_mode("4d")
    with pytest.raises(ValueError, match="camera_mode"):
        MultiViewUNet(unet_config=tiny_sd_unet_config(), camera_mode="both")
    no_camera = MultiViewUNet(unet_config=tiny_sd_unet_config(), camera_dim=None)
    with pytest.raises(ValueError, match="no camera embedding"):
        no_camera(x, t, text, camera=camera, num_frames=2)
