"""Volume renderer, shading and backgrounds for score distillation (CPU; CUDA where present).

A solid sphere of known radius (a field whose density is a step) gives closed-form
silhouettes, depths and normals to check the renderer against.
"""

import glob
import os
import sys
import types

import nerfacc
import pytest
import torch
from torch import nn

from mvdream_platform.cameras import get_rays, orbit_camera_to_world
from mvdream_platform.sds.field import FieldConfig, FieldOutput, NeRFField
from mvdream_platform.sds.render import RenderConfig, VolumeRenderer, ray_sphere_intersect
from mvdream_platform.sds.shading import (
    EnvironmentBackground,
    Shading,
    ShadingConfig,
    random_background_color,
    sample_shading,
    spherical_harmonics_deg3,
)

SPHERE_RADIUS = 0.5
ALBEDO = (0.8, 0.3, 0.1)


class SolidSphere(nn.Module):
    """Density ``scale * 1000`` inside |x| < 0.5, 0 outside; constant albedo; radial normals."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # gives a device, and something to train

    def density(self, points: torch.Tensor) -> torch.Tensor:
        inside = points.norm(dim=-1) < SPHERE_RADIUS
        return self.scale * 1000.0 * inside.to(points.dtype)

    def forward(self, points: torch.Tensor, with_normals: bool = False) -> FieldOutput:
        albedo = torch.tensor(ALBEDO).expand(points.shape[0], 3) * self.scale
        normal = nn.functional.normalize(points, dim=-1) if with_normals else None
        return FieldOutput(density=self.density(points), albedo=albedo, normal=normal)

    def parameter_groups(self):
        return {"mlp": [self.scale]}


def cameras(n: int = 4, distance: float = 3.0) -> torch.Tensor:
    """(n, 4, 4) cameras around the origin, 15 degrees up, evenly spaced in azimuth."""
    return orbit_camera_to_world(15.0, torch.arange(n) * 360.0 / n, distance)


def sphere_renderer(samples: int = 64) -> VolumeRenderer:
    return VolumeRenderer(SolidSphere(), None, RenderConfig(num_samples_per_ray=samples)).eval()


def tiny_renderer(seed: int = 0, samples: int = 32) -> VolumeRenderer:
    torch.manual_seed(seed)
    return VolumeRenderer(NeRFField(FieldConfig.tiny()), EnvironmentBackground(),
                          RenderConfig(num_samples_per_ray=samples))


def test_ray_sphere_intersect_closed_form():
    origins = torch.tensor([[0.0, 0.0, -3.0], [0.0, 2.0, -3.0], [0.0, 0.0, 0.5], [0, 0, 3.0]])
    directions = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0, 0, 1.0]])
    t_near, t_far, hit = ray_sphere_intersect(origins, directions, radius=1.0)
    assert hit.tolist() == [True, False, True, False]  # the last one points away
    torch.testing.assert_close(t_near, torch.tensor([2.0, 0.0, 0.0, 0.0]))  # inside: from 0
    torch.testing.assert_close(t_far, torch.tensor([4.0, 0.0, 0.75**0.5, 0.0]))
    t_near, _, _ = ray_sphere_intersect(origins[:1], directions[:1], 1.0, near_plane=2.5)
    assert float(t_near[0]) == 2.5


def test_solid_sphere_silhouette_depth_and_normals():
    n, size, distance = 2, 32, 3.0
    c2w = cameras(n, distance)
    with torch.no_grad():
        out = sphere_renderer().render(c2w, 40.0, size, size, shading="albedo",
                                       bg_color=torch.tensor([0.0, 0.0, 1.0]))
    assert out.rgb.shape == (n, size, size, 3) and out.normal.shape == (n, size, size, 3)
    assert out.opacity.shape == (n, size, size, 1) and out.depth.shape == (n, size, size, 1)

    origins, dirs = get_rays(c2w, 40.0, size, size)
    # Distance of each pixel's ray from the sphere's centre, and where it enters the sphere.
    along = -(origins * dirs).sum(-1)
    miss_distance = (origins + along[..., None] * dirs).norm(dim=-1)
    entry = along - (SPHERE_RADIUS**2 - miss_distance.clamp(max=SPHERE_RADIUS) ** 2).sqrt()
    inside, outside = miss_distance < 0.45, miss_distance > 0.55
    assert int(inside.sum()) > 100 and int(outside.sum()) > 100

    opacity, depth = out.opacity[..., 0], out.depth[..., 0]
    assert float(opacity[inside].min()) > 0.999
    assert float(opacity[outside].max()) < 1e-6
    # The first sample inside takes all the weight: depth within one bin (chord 2 / 64).
    assert float((depth[inside] - entry[inside]).abs().max()) < 2.0 / 64 + 1e-4
    torch.testing.assert_close(out.rgb[inside], torch.tensor(ALBEDO).expand(
        int(inside.sum()), 3), rtol=0, atol=1e-3)
    torch.testing.assert_close(out.rgb[outside], torch.tensor([0.0, 0.0, 1.0]).expand(
        int(outside.sum()), 3), rtol=0, atol=1e-6)

    # Normals: the sphere's outward normal at the entry point, facing the camera.
    entry_point = origins + entry[..., None] * dirs
    expected_normal = nn.functional.normalize(entry_point, dim=-1)
    cosine = (out.normal[inside] * expected_normal[inside]).sum(-1)
    assert float(cosine.min()) > 0.99
    assert float(out.normal[outside].abs().max()) < 1e-6
    assert float(out.orientation_loss) < 1e-6  # nothing faces away from the camera


@torch.no_grad()
def test_shading_modes_on_the_sphere():
    renderer = sphere_renderer()
    c2w = cameras(1)
    head_light = Shading("diffuse", ambient_color=(0.0,) * 3, diffuse_color=(1.0,) * 3)
    diffuse = renderer.render(c2w, 20.0, 8, 8, shading=head_light).rgb
    textureless = renderer.render(c2w, 20.0, 8, 8, shading=Shading(
        "textureless", ambient_color=(0.0,) * 3, diffuse_color=(1.0,) * 3)).rgb
    albedo = renderer.render(c2w, 20.0, 8, 8, shading="albedo").rgb
    # A 20-degree view of a 0.5 sphere at distance 3 is all sphere, lit head-on: n . l ~ 1
    # at the centre, lower towards the rim.
    centre = (0, 3, 3)
    torch.testing.assert_close(albedo[centre], torch.tensor(ALBEDO), rtol=0, atol=1e-4)
    assert float(textureless[centre].min()) > 0.97  # white albedo
    torch.testing.assert_close(diffuse, textureless * torch.tensor(ALBEDO), rtol=0, atol=1e-5)
    assert float(textureless[0, 0, 3].mean()) < float(textureless[centre].mean())
    # A light behind the sphere leaves only the ambient term.
    behind = -c2w[:, :3, 3] * 10
    back_lit = renderer.render(c2w, 20.0, 8, 8, shading=Shading(
        "textureless", ambient_color=(0.25,) * 3, diffuse_color=(1.0,) * 3),
        light_positions=behind).rgb
    torch.testing.assert_close(back_lit[centre], torch.full((3,), 0.25), rtol=0, atol=1e-4)


def test_gradients_flow_from_rgb_to_the_hash_grid_mlps_and_background():
    renderer = tiny_renderer()
    c2w = cameras(4, 2.5)
    out = renderer.render(c2w, torch.full((4,), 40.0), 32, 32, shading="diffuse",
                          generator=torch.Generator().manual_seed(0))
    assert out.rgb.shape == (4, 32, 32, 3)
    assert bool(torch.isfinite(out.rgb).all())
    (out.rgb.mean() + out.orientation_loss).backward()
    groups = renderer.parameter_groups()
    assert set(groups) == {"encoding", "mlp", "background"}
    for name, params in groups.items():
        for p in params:
            assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
            assert float(p.grad.abs().sum()) > 0, name


def test_same_seed_same_render_and_the_jitter_follows_the_generator():
    def render(seed: int):
        renderer = tiny_renderer(seed=0)
        return renderer.render(cameras(2), 40.0, 16, 16, shading="diffuse",
                               generator=torch.Generator().manual_seed(seed))

    a, b, c = render(1), render(1), render(2)
    for key in ("rgb", "opacity", "depth", "normal"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert torch.equal(a.orientation_loss, b.orientation_loss)
    assert not torch.equal(a.rgb, c.rgb)  # training mode jitters the samples
    evaluation = tiny_renderer(seed=0).eval()
    d = evaluation.render(cameras(2), 40.0, 16, 16, generator=torch.Generator().manual_seed(1))
    e = evaluation.render(cameras(2), 40.0, 16, 16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(d.rgb, e.rgb)  # evaluation samples bin centres


def test_background_choice_and_compositing():
    renderer = tiny_renderer().eval()
    c2w = cameras(2)
    learned = renderer.render(c2w, 40.0, 8, 8, with_normals=False)
    assert learned.normal is None and learned.orientation_loss is None
    _, dirs = get_rays(c2w, 40.0, 8, 8)
    torch.testing.assert_close(learned.background, renderer.background(dirs))
    per_view = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    solid = renderer.render(c2w, 40.0, 8, 8, with_normals=False, bg_color=per_view)
    torch.testing.assert_close(solid.background[1, 5, 2], per_view[1])
    # rgb = foreground + (1 - opacity) * background, the same foreground for both.
    fg_learned = learned.rgb - (1 - learned.opacity) * learned.background
    fg_solid = solid.rgb - (1 - solid.opacity) * solid.background
    torch.testing.assert_close(fg_learned, fg_solid)


def test_no_grad_renders_query_the_field_in_chunks():
    renderer = tiny_renderer().eval()
    calls = []
    renderer.field.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        whole = renderer.render(cameras(2), 40.0, 8, 8, shading="diffuse")
        assert len(calls) == 1
        renderer.config.eval_chunk_size = 1000
        chunked = renderer.render(cameras(2), 40.0, 8, 8, shading="diffuse")
    assert len(calls) > 3
    for key in ("rgb", "opacity", "depth", "normal"):
        torch.testing.assert_close(getattr(chunked, key), getattr(whole, key))


def test_bad_arguments_raise_clear_errors():
    renderer = sphere_renderer(8)
    c2w = cameras(2)
    with pytest.raises(ValueError, match=r"c2w must .*\(N, 4, 4\)"):
        renderer.render(c2w[:, :3], 40.0, 8, 8)
    with pytest.raises(ValueError, match="shading must be one of"):
        renderer.render(c2w, 40.0, 8, 8, shading="phong")
    with pytest.raises(ValueError, match="shading must be one of"):
        Shading("phong")
    with pytest.raises(ValueError, match="light_positions must have shape"):
        renderer.render(c2w, 40.0, 8, 8, shading="diffuse", light_positions=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="bg_color must have shape"):
        renderer.render(c2w, 40.0, 8, 8, bg_color=torch.zeros(5))
    with pytest.raises(ValueError, match="needs normals"):
        renderer.render(c2w, 40.0, 8, 8, shading="textureless", with_normals=False)
    with pytest.raises(ValueError, match="fovy_deg"):
        renderer.render(c2w, torch.tensor([40.0, 40.0, 40.0]), 8, 8)
    with pytest.raises(ValueError, match="height"):
        renderer.render(c2w, 40.0, 0, 8)
    with pytest.raises(ValueError, match="num_samples_per_ray"):
        VolumeRenderer(SolidSphere(), None, RenderConfig(num_samples_per_ray=0))
    with pytest.raises(ValueError, match="radius"):
        VolumeRenderer(NeRFField(FieldConfig.tiny(radius=2.0)), None, RenderConfig())
    with pytest.raises(ValueError, match="views_per_group"):
        sample_shading(ShadingConfig(), 0, torch.zeros(6, 3), 4)
    with pytest.raises(ValueError, match="light_sample_strategy"):
        sample_shading(ShadingConfig(light_sample_strategy="magic"), 0, torch.zeros(4, 3))


def test_cpu_render_never_touches_the_nerfacc_cuda_extension(monkeypatch):
    """Any use of nerfacc's compiled backend on CPU would start an nvcc JIT build."""
    build_root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions")
    builds_before = set(glob.glob(os.path.join(build_root, "*", "nerfacc_cuda")))

    poisoned = types.ModuleType("nerfacc.cuda._backend")

    def refuse(name):
        raise AssertionError(f"nerfacc's CUDA extension was asked for {name!r} on CPU")

    poisoned.__getattr__ = refuse  # nerfacc's lazy wrappers do `from ._backend import _C`
    monkeypatch.setitem(sys.modules, "nerfacc.cuda._backend", poisoned)
    with pytest.raises(AssertionError, match="CUDA extension"):  # the poison works
        nerfacc.cuda.exclusive_sum(torch.zeros(1), torch.zeros(1), torch.zeros(1), False)

    renderer = tiny_renderer(samples=8)
    out = renderer.render(cameras(2), 40.0, 8, 8, shading="diffuse",
                          generator=torch.Generator().manual_seed(0))
    (out.rgb.sum() + out.orientation_loss).backward()
    renderer.update_occupancy(0)  # a no-op on CPU
    renderer.eval().render(cameras(1), 40.0, 8, 8)
    assert set(glob.glob(os.path.join(build_root, "*", "nerfacc_cuda"))) == builds_before


def test_update_occupancy_is_a_no_op_on_cpu_without_skipping():
    torch.manual_seed(0)
    renderer = VolumeRenderer(NeRFField(FieldConfig.tiny()), None,
                              RenderConfig(num_samples_per_ray=8, skip_empty_space=False))
    before = renderer.estimator.binaries.clone()
    renderer.update_occupancy(0)
    assert torch.equal(renderer.estimator.binaries, before)
    assert bool(before.all())  # every cell occupied until the first update


class CountingField(nn.Module):
    """Wraps a field, moves it off-centre by ``OFFSET`` (so a grid looked up with its axes
    mixed up misses it) and counts the points it is asked about."""

    OFFSET = torch.tensor([0.3, -0.15, 0.05])

    def __init__(self, field):
        super().__init__()
        self.inner, self.config, self.queried = field, field.config, 0

    def density(self, points):
        return self.inner.density(points - self.OFFSET)

    def forward(self, points, with_normals=False):
        self.queried += points.shape[0]
        return self.inner(points - self.OFFSET, with_normals=with_normals)

    def parameter_groups(self):
        return self.inner.parameter_groups()


def _textured_field(seed: int = 0) -> NeRFField:
    """The embedded default's field with a noisy grid: a blob with lumps and a faint halo."""
    torch.manual_seed(seed)
    field = NeRFField(FieldConfig(n_levels=8, log2_hashmap_size=14, base_resolution=8,
                                  per_level_scale=1.4, hidden_dim=32))
    with torch.no_grad():
        field.encoding.embeddings.normal_(0.0, 0.5)
    return field


@pytest.mark.parametrize("shading,normal_type", [("albedo", "analytic"), ("diffuse", "analytic"),
                                                 ("diffuse", "finite_difference")])
def test_empty_space_skipping_gives_the_dense_image_with_far_fewer_field_queries(shading, normal_type):
    field = _textured_field()
    field.config.normal_type = normal_type
    c2w = cameras(4, 2.5)
    results, grads, queried = {}, {}, {}
    for skip in (False, True):
        counting = CountingField(field)
        renderer = VolumeRenderer(counting, EnvironmentBackground(), RenderConfig(
            num_samples_per_ray=48, skip_empty_space=skip, occ_threshold=0.001)).train()
        for step in (0, 16, 32, 48):
            renderer.update_occupancy(step)
        if skip:
            occupied = float(renderer.estimator.binaries.float().mean())
            assert 0.05 < occupied < 0.5  # the blob and its lumps, not the corners
        field.zero_grad()
        out = renderer.render(c2w, 40.0, 32, 32, shading=shading,
                              generator=torch.Generator().manual_seed(3),
                              with_normals=shading != "albedo")
        loss = out.rgb.square().sum() + (out.orientation_loss if out.orientation_loss is not None else torch.zeros(()))
        loss.backward()
        results[skip], queried[skip] = out, counting.queried
        grads[skip] = field.encoding.embeddings.grad.clone()
    dense, skipped = results[False], results[True]
    assert queried[True] < 0.35 * queried[False]
    for key, max_tol, mean_tol in (("rgb", 0.03, 0.006), ("opacity", 0.02, 0.003), ("depth", 0.05, 0.006)):
        diff = (getattr(skipped, key) - getattr(dense, key)).detach().abs()
        assert float(diff.max()) < max_tol and float(diff.mean()) < mean_tol, (key, float(diff.max()))
    cosine = torch.nn.functional.cosine_similarity(grads[True].flatten(), grads[False].flatten(), dim=0)
    assert float(cosine) > 0.98


def test_finite_difference_normals_shade_like_analytic_ones():
    """The normals option: both kinds light the same field alike (and both train the grid)."""
    c2w, images = cameras(4, 2.5), {}
    for normal_type in ("analytic", "finite_difference"):
        field = _textured_field()
        field.config.normal_type = normal_type
        renderer = VolumeRenderer(field, None, RenderConfig(num_samples_per_ray=48,
                                                            occ_threshold=0.001)).train()
        renderer.update_occupancy(0)
        out = renderer.render(c2w, 40.0, 24, 24, shading="diffuse", bg_color=torch.zeros(3),
                              generator=torch.Generator().manual_seed(5))
        (out.rgb.sum() + out.orientation_loss).backward()
        assert float(field.encoding.embeddings.grad.abs().sum()) > 0
        images[normal_type] = out
    a, b = images["analytic"], images["finite_difference"]
    assert float((a.rgb - b.rgb).detach().abs().mean()) < 0.02
    cosine = torch.nn.functional.cosine_similarity(a.normal.detach().reshape(-1, 3),
                                                   b.normal.detach().reshape(-1, 3), dim=-1)
    visible = a.opacity.detach().reshape(-1) > 0.5
    assert float(cosine[visible].mean()) > 0.9


def test_occupancy_updates_are_reproducible_and_leave_the_global_rng_alone():
    grids = []
    for _ in range(2):
        field = _textured_field()
        renderer = VolumeRenderer(field, None, RenderConfig(num_samples_per_ray=48)).train()
        torch.manual_seed(123)
        renderer.update_occupancy(16)
        after = torch.rand(3)
        torch.manual_seed(123)
        assert torch.equal(after, torch.rand(3))  # the update drew from its own generator
        grids.append(renderer.estimator.occs.clone())
    assert torch.equal(grids[0], grids[1])
    renderer.update_occupancy(17)  # not an update step: nothing changes
    assert torch.equal(renderer.estimator.occs, grids[1])
    with pytest.raises(RuntimeError, match="training mode"):
        renderer.eval().update_occupancy(32)


def test_a_render_with_an_empty_grid_is_all_background():
    renderer = VolumeRenderer(_textured_field(), None, RenderConfig(num_samples_per_ray=16)).eval()
    renderer.estimator.binaries.fill_(False)
    out = renderer.render(cameras(2, 2.5), 40.0, 8, 8, bg_color=torch.tensor([0.2, 0.4, 0.6]))
    assert float(out.opacity.detach().abs().max()) == 0.0
    torch.testing.assert_close(out.rgb, torch.tensor([0.2, 0.4, 0.6]).expand(2, 8, 8, 3))


def _packed_weights_reference(t_starts, t_ends, sigmas, packed_info=None, ray_indices=None,
                              n_rays=None, prefix_trans=None):
    """CPU stand-in for nerfacc's packed render_weight_from_density (sorted ray_indices)."""
    tau = sigmas * (t_ends - t_starts)
    inclusive = torch.cumsum(tau, 0)
    first = torch.ones_like(ray_indices, dtype=torch.bool)
    first[1:] = ray_indices[1:] != ray_indices[:-1]
    _, counts = torch.unique_consecutive(ray_indices, return_counts=True)
    start = (inclusive - tau)[first].repeat_interleave(counts)
    trans = torch.exp(-(inclusive - tau - start))
    alphas = 1 - torch.exp(-tau)
    return trans * alphas, trans, alphas


def test_packed_path_bookkeeping_matches_the_batched_path(monkeypatch):
    """The CUDA path's packed indexing, run on CPU with stand-ins for the CUDA kernels."""
    torch.manual_seed(0)
    field = NeRFField(FieldConfig.tiny())
    renderer = VolumeRenderer(field, EnvironmentBackground(),
                              RenderConfig(num_samples_per_ray=16)).eval()
    c2w, lights = cameras(2, 2.0), torch.tensor([[2.0, 0.0, 1.0], [0.0, -2.0, 1.0]])
    kwargs = dict(shading=Shading("diffuse", ambient_color=(0.3,) * 3), light_positions=lights)
    batched = renderer.render(c2w, 50.0, 8, 8, **kwargs)

    def fake_sampling(origins, directions, t_min=None, t_max=None, **_):
        # The batched path's bin-centre samples, flattened ray after ray.
        s = renderer.config.num_samples_per_ray
        ray_ids = (t_max > t_min).nonzero()[:, 0]
        edges = torch.linspace(0, 1, s + 1)
        t = t_min[ray_ids, None] + (t_max - t_min)[ray_ids, None] * edges
        return (ray_ids.repeat_interleave(s).int(), t[:, :-1].reshape(-1), t[:, 1:].reshape(-1))

    monkeypatch.setattr(VolumeRenderer, "uses_cuda_path", property(lambda self: True))
    monkeypatch.setattr(renderer.estimator, "sampling", fake_sampling)
    monkeypatch.setattr(nerfacc, "render_weight_from_density", _packed_weights_reference)
    packed = renderer.render(c2w, 50.0, 8, 8, **kwargs)
    for key in ("rgb", "opacity", "depth", "normal", "background", "orientation_loss"):
        torch.testing.assert_close(getattr(packed, key), getattr(batched, key), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nerfacc's kernels)")
def test_cuda_occupancy_grid_path():
    torch.manual_seed(0)
    renderer = VolumeRenderer(NeRFField(FieldConfig.tiny()), EnvironmentBackground(),
                              RenderConfig(cuda_samples_per_ray=128)).cuda()
    renderer.update_occupancy(0)  # warm-up update: every cell evaluated
    assert renderer.uses_cuda_path
    # The blob occupies the centre, not the corners.
    assert 0 < int(renderer.estimator.binaries.sum()) < renderer.estimator.binaries.numel()
    out = renderer.render(cameras(4, 2.5).cuda(), 40.0, 32, 32, shading="diffuse")
    assert out.rgb.device.type == "cuda" and out.rgb.shape == (4, 32, 32, 3)
    centre = out.opacity[:, 16, 16, 0]
    assert bool((centre > 0.5).all()) and float(out.opacity[:, 0, 0, 0].max()) < 0.5
    (out.rgb.mean() + out.orientation_loss).backward()
    assert float(renderer.field.encoding.embeddings.grad.abs().sum()) > 0
    cpu = VolumeRenderer(NeRFField(FieldConfig.tiny()), EnvironmentBackground(),
                         RenderConfig(num_samples_per_ray=256)).eval()
    cpu.load_state_dict(renderer.state_dict())
    reference = cpu.render(cameras(4, 2.5), 40.0, 32, 32, shading="albedo")
    evaluated = renderer.eval().render(cameras(4, 2.5).cuda(), 40.0, 32, 32, shading="albedo")
    # Same field, different samplers: close where it is dense; the CUDA path skips samples
    # with alpha < 0.01 in the faint halo, so only roughly equal on average.
    difference = (evaluated.opacity.detach().cpu() - reference.opacity.detach()).abs()
    assert float(difference[:, 16, 16].max()) < 0.02 and float(difference.mean()) < 0.05


# ----------------------------------------------------------------------------- shading


def test_sample_shading_schedule_and_probabilities():
    config = ShadingConfig()
    cams = cameras(8, 2.0)[:, :3, 3]
    gen = torch.Generator().manual_seed(0)
    early = [sample_shading(config, 4999, cams, 4, generator=gen).mode for _ in range(50)]
    assert set(early) == {"albedo"}
    modes = [sample_shading(config, 5000, cams, 4, generator=gen).mode for _ in range(800)]
    # diffuse_prob 0.75, then textureless_prob 0.5: 0.25 / 0.375 / 0.375.
    fractions = {m: modes.count(m) / len(modes) for m in ("albedo", "textureless", "diffuse")}
    assert abs(fractions["albedo"] - 0.25) < 0.06
    assert abs(fractions["textureless"] - 0.375) < 0.06
    assert abs(fractions["diffuse"] - 0.375) < 0.06
    shading = sample_shading(config, 6000, cams, 4, generator=gen)
    torch.testing.assert_close(torch.tensor(shading.ambient_color) + torch.tensor(
        shading.diffuse_color), torch.ones(3))  # soft shading
    fixed = sample_shading(ShadingConfig(soft_shading=False), 6000, cams, 4, generator=gen)
    assert fixed.ambient_color == (1.0, 1.0, 1.0) and fixed.diffuse_color == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("strategy", ["dreamfusion", "orbit"])
def test_sample_shading_lights_per_group_and_reproducible(strategy):
    config = ShadingConfig(light_sample_strategy=strategy, ambient_only_steps=0)
    cams = cameras(8, 2.0)[:, :3, 3]

    def draw(seed: int, step: int):
        gen = torch.Generator().manual_seed(seed)
        shading = sample_shading(config, step, cams, 4, generator=gen)
        return shading, torch.rand(1, generator=gen)

    (a, after_a), (b, _) = draw(0, 100), draw(0, 100)
    assert a.mode == b.mode and torch.equal(a.light_positions, b.light_positions)
    _, after_early = draw(0, -1)  # a different branch consumes the same numbers
    assert torch.equal(after_a, after_early)
    lights = a.light_positions
    assert lights.shape == (8, 3) and lights.dtype == torch.float32
    distance = lights.norm(dim=-1).reshape(2, 4)
    assert bool(((distance >= 0.8 - 1e-5) & (distance <= 1.5 + 1e-5)).all())
    torch.testing.assert_close(distance, distance[:, :1].expand(2, 4))  # shared per group
    if strategy == "orbit":
        groups = lights.reshape(2, 4, 3)
        assert torch.equal(groups, groups[:, :1].expand(2, 4, 3))
        elevation = torch.rad2deg(torch.asin(lights[:, 2] / lights.norm(dim=-1)))
        assert bool(((elevation >= 30 - 1e-3) & (elevation <= 90 + 1e-3)).all())


def test_random_background_color_is_shared_reproducible_and_half_the_time():
    gen = torch.Generator().manual_seed(0)
    draws = [random_background_color(gen) for _ in range(400)]
    solid = [c for c in draws if c is not None]
    assert abs(len(solid) / len(draws) - 0.5) < 0.08
    assert all(c.shape == (3,) and bool(((c >= 0) & (c < 1)).all()) for c in solid)
    again = [random_background_color(torch.Generator().manual_seed(0)) for _ in range(1)]
    assert (again[0] is None) == (draws[0] is None)
    assert random_background_color(gen, prob=0.0) is None
    assert random_background_color(gen, prob=1.0) is not None
    with pytest.raises(ValueError, match="prob"):
        random_background_color(gen, prob=1.5)


def test_environment_background_shapes_range_and_basis():
    torch.manual_seed(0)
    background = EnvironmentBackground()
    dirs = nn.functional.normalize(torch.randn(2, 5, 7, 3), dim=-1)
    rgb = background(dirs)
    assert rgb.shape == (2, 5, 7, 3) and bool(((rgb > 0) & (rgb < 1)).all())
    assert list(background.parameter_groups()) == ["background"]
    # The real SH basis up to degree 3 is orthonormal over the sphere: check by Monte Carlo.
    samples = nn.functional.normalize(torch.randn(200_000, 3, dtype=torch.float64,
                                                  generator=torch.Generator().manual_seed(1)),
                                      dim=-1)
    basis = spherical_harmonics_deg3(samples)
    gram = 4 * torch.pi * basis.T @ basis / samples.shape[0]
    torch.testing.assert_close(gram, torch.eye(16, dtype=torch.float64), rtol=0, atol=0.03)
    with pytest.raises(ValueError, match="directions"):
        background(torch.zeros(4, 2))
