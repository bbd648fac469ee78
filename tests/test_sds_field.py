"""NeRF field for score distillation: hash encoding, blob density, normals.

The hash encoding is checked against a per-point brute force written from the paper's
definition (python integers for the hash, one corner at a time), not against the vectorised
code's own pieces.
"""

import math

import pytest
import torch

from mvdream_platform.sds.field import (
    FieldConfig,
    FieldOutput,
    NeRFField,
    analytic_normals,
    finite_difference_normals,
)
from mvdream_platform.sds.hashgrid import HashGridEncoding, level_resolutions

PRIMES = (1, 2654435761, 805459861)


def brute_force_encoding(enc: HashGridEncoding, point: list[float]):
    """One point -> (indices [L][8], weights [L][8], features [L*F]) by the definition.

    Level l: N = resolutions[l] cells per axis, p = x N, cell = min(floor(p), N - 1),
    f = p - cell; the vertex v = cell + (i, j, k) has weight prod(f or 1 - f) and row
    offset_l + (dense: v_x + v_y (N+1) + v_z (N+1)^2 if (N+1)^3 <= T, else
    xor_a(v_a * prime_a) mod T).
    """
    table = enc.embeddings.detach().double()
    t_size = enc.hashmap_size
    offset = 0
    all_idx, all_w, feats = [], [], []
    for n in enc.resolutions:
        dense = (n + 1) ** 3 <= t_size
        p = [min(max(c, 0.0), 1.0) * n for c in point]
        cell = [min(math.floor(c), n - 1) for c in p]
        frac = [c - k for c, k in zip(p, cell)]
        idx, ws = [], []
        feat = torch.zeros(enc.n_features_per_level, dtype=torch.float64)
        for i in (0, 1):
            for j in (0, 1):
                for k in (0, 1):
                    v = (cell[0] + i, cell[1] + j, cell[2] + k)
                    if dense:
                        row = v[0] + v[1] * (n + 1) + v[2] * (n + 1) ** 2
                    else:
                        row = ((v[0] * PRIMES[0]) ^ (v[1] * PRIMES[1]) ^ (v[2] * PRIMES[2])) % t_size
                    w = 1.0
                    for axis, bit in enumerate((i, j, k)):
                        w *= frac[axis] if bit else 1.0 - frac[axis]
                    idx.append(offset + row)
                    ws.append(w)
                    feat += w * table[offset + row]
        all_idx.append(idx)
        all_w.append(ws)
        feats.append(feat)
        offset += t_size if not dense else (n + 1) ** 3
    return all_idx, all_w, torch.cat(feats)


def small_encoding() -> HashGridEncoding:
    # Resolutions 3, 6, 12, 24: levels 0-1 dense ((N+1)^3 = 64, 343 <= 512), 2-3 hashed.
    torch.manual_seed(0)
    enc = HashGridEncoding(n_levels=4, n_features_per_level=2, log2_hashmap_size=9,
                           base_resolution=3, per_level_scale=2.0, init_scale=1.0)
    assert enc.resolutions == [3, 6, 12, 24]
    assert enc.is_hashed.tolist() == [False, False, True, True]
    return enc


def test_reference_level_resolutions_and_dense_levels():
    assert level_resolutions(16, 16, 1.447269237440378)[::5] == [16, 101, 645, 4096]
    enc = HashGridEncoding()  # the reference configuration
    assert enc.n_output_dims == 32
    # Dense while (N + 1)^3 <= 2^19: N = 16, 23, 33, 48, 70; hashed from N = 101 on.
    assert enc.is_hashed.tolist() == [False] * 5 + [True] * 11
    assert enc.table_sizes[:5] == [17**3, 24**3, 34**3, 49**3, 71**3]
    assert enc.embeddings.shape == (sum(enc.table_sizes), 2)
    assert float(enc.embeddings.detach().abs().max()) <= 1e-4


def test_hash_encoding_matches_brute_force():
    enc = small_encoding().double()
    gen = torch.Generator().manual_seed(1)
    points = torch.rand(40, 3, generator=gen, dtype=torch.float64)
    points[0] = torch.tensor([0.0, 0.0, 0.0])  # the corners of the cube, and a point outside
    points[1] = torch.tensor([1.0, 1.0, 1.0])
    points[2] = torch.tensor([1.3, -0.2, 0.5])
    indices, weights = enc.corner_indices_and_weights(points)
    features = enc(points)
    for p in range(points.shape[0]):
        ref_idx, ref_w, ref_feat = brute_force_encoding(enc, points[p].tolist())
        assert indices[p].tolist() == ref_idx  # exact: same rows, same corner order
        torch.testing.assert_close(weights[p], torch.tensor(ref_w, dtype=torch.float64),
                                   rtol=0, atol=1e-12)
        torch.testing.assert_close(features[p], ref_feat, rtol=0, atol=1e-12)


def test_dense_levels_are_collision_free_and_hashed_levels_stay_in_their_table():
    enc = small_encoding()
    grid = torch.linspace(0, 1, 25)
    points = torch.cartesian_prod(grid, grid, grid)
    indices, weights = enc.corner_indices_and_weights(points)
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights[..., 0]))
    offsets = [0, 64, 64 + 343, 64 + 343 + 512]
    for level, n in enumerate(enc.resolutions):
        rows = indices[:, level].reshape(-1)
        size = enc.table_sizes[level]
        assert int(rows.min()) >= offsets[level] and int(rows.max()) < offsets[level] + size
        if not bool(enc.is_hashed[level]):
            # Every vertex of a dense level has its own row: the 25^3 points touch all of
            # them, and distinct rows == distinct vertices.
            assert rows.unique().numel() == (n + 1) ** 3 == size


def test_encoding_float32_matches_float64():
    enc = small_encoding()
    points = torch.rand(100, 3, generator=torch.Generator().manual_seed(2))
    reference = small_encoding().double()(points.double())
    torch.testing.assert_close(enc(points).double(), reference, rtol=1e-5, atol=1e-5)


def tiny_field(seed: int = 0, **overrides) -> NeRFField:
    torch.manual_seed(seed)
    return NeRFField(FieldConfig.tiny(**overrides))


def test_field_output_shapes_and_ranges():
    field = tiny_field()
    points = torch.rand(50, 3) * 2 - 1
    out = field(points)
    assert isinstance(out, FieldOutput) and out.normal is None
    assert out.density.shape == (50,) and out.albedo.shape == (50, 3)
    assert bool((out.density >= 0).all())
    assert bool(((out.albedo > 0) & (out.albedo < 1)).all())
    torch.testing.assert_close(field.density(points), out.density)
    with_normals = field(points, with_normals=True)
    assert with_normals.normal.shape == (50, 3)
    torch.testing.assert_close(with_normals.normal.norm(dim=-1), torch.ones(50))
    torch.testing.assert_close(with_normals.density, out.density)
    torch.testing.assert_close(with_normals.albedo, out.albedo)


def test_blob_bias_makes_the_centre_dense_and_the_edge_empty_at_init():
    field = tiny_field()
    radii = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    points = radii[:, None] * torch.nn.functional.normalize(torch.tensor([[1.0, 2.0, -0.5]]))
    density = field.density(points).detach()
    # softplus(10 (1 - r / 0.5)) plus a ~1e-4 contribution of the nearly-zero grid.
    expected = torch.nn.functional.softplus(10.0 * (1 - radii / 0.5))
    torch.testing.assert_close(density, expected, rtol=1e-2, atol=1e-3)
    assert bool((density[:-1] > density[1:]).all())
    assert float(density[0]) > 9.9 and float(density[-1]) < 1e-3
    no_blob = tiny_field(density_bias="none").density(points).detach()
    torch.testing.assert_close(no_blob, torch.full_like(no_blob, math.log(2.0)), rtol=0,
                               atol=1e-3)


def _textured_field(normal_type: str = "analytic", eps: float = 0.01) -> NeRFField:
    """A float64 field whose density is all grid (so normals test the grid, not the blob)."""
    field = tiny_field(normal_type=normal_type, finite_difference_eps=eps,
                       density_bias="none").double()
    with torch.no_grad():
        torch.manual_seed(3)
        field.encoding.embeddings.uniform_(-1.0, 1.0)
    return field


def test_analytic_normals_match_finite_differences_on_a_field():
    field = _textured_field()
    fd_field = _textured_field("finite_difference", eps=1e-6)
    fd_field.load_state_dict(field.state_dict())
    points = (torch.rand(300, 3, generator=torch.Generator().manual_seed(4),
                         dtype=torch.float64) * 2 - 1) * 0.8
    with torch.no_grad():  # analytic normals still work (and come back detached)
        analytic = field(points, with_normals=True).normal
        numeric = fd_field(points, with_normals=True).normal
    assert analytic.dtype == torch.float64
    # Trilinear interpolation and ReLU are only piecewise smooth: a +-1e-6 probe straddles a
    # kink for a handful of points at most.
    close = (analytic - numeric).norm(dim=-1) < 1e-6
    assert float(close.double().mean()) > 0.98
    # Normals of a random grid point every way (nothing radial about them).
    radial = torch.nn.functional.normalize(points, dim=-1)
    assert float((analytic * radial).sum(-1).abs().mean()) < 0.7


def test_normals_of_an_analytic_sphere_density_point_outwards():
    def sphere_density(x: torch.Tensor) -> torch.Tensor:
        return 50.0 * torch.sigmoid(20.0 * (0.5 - x.norm(dim=-1)))

    points = torch.nn.functional.normalize(torch.randn(64, 3, dtype=torch.float64,
                                                       generator=torch.Generator().manual_seed(5)),
                                           dim=-1)
    points = points * torch.linspace(0.2, 0.9, 64, dtype=torch.float64)[:, None]
    outward = torch.nn.functional.normalize(points, dim=-1)
    density, analytic = analytic_normals(sphere_density, points)
    torch.testing.assert_close(density, sphere_density(points))
    torch.testing.assert_close(analytic, outward, rtol=0, atol=1e-9)
    numeric = finite_difference_normals(sphere_density, points, eps=1e-5)
    torch.testing.assert_close(numeric, outward, rtol=0, atol=1e-6)


def test_analytic_normals_train_the_grid_and_detach_without_grad():
    field = tiny_field()
    points = torch.rand(64, 3) - 0.5
    out = field(points, with_normals=True)
    assert out.normal.requires_grad  # create_graph: a loss on normals reaches the field
    (out.normal[:, 2].sum()).backward()
    groups = field.parameter_groups()
    assert float(groups["encoding"][0].grad.abs().sum()) > 0
    assert all(float(p.grad.abs().sum()) > 0 for p in field.density_mlp.parameters())
    assert not points.requires_grad
    with torch.no_grad():
        frozen = field(points, with_normals=True)
    assert not frozen.normal.requires_grad and not frozen.density.requires_grad
    torch.testing.assert_close(frozen.normal, out.normal.detach())


def test_caller_points_keep_their_gradient_path():
    field = tiny_field()
    points = (torch.rand(8, 3) - 0.5).requires_grad_(True)
    out = field(points, with_normals=True)
    out.density.sum().backward()
    assert points.grad is not None and float(points.grad.abs().sum()) > 0


def test_parameter_groups_cover_every_parameter_once():
    field = tiny_field()
    groups = field.parameter_groups()
    assert set(groups) == {"encoding", "mlp"}
    ids = [id(p) for group in groups.values() for p in group]
    assert len(ids) == len(set(ids)) == len(list(field.parameters()))
    assert groups["encoding"] == [field.encoding.embeddings]


def test_same_seed_same_field():
    a, b = tiny_field(seed=7), tiny_field(seed=7)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    c = tiny_field(seed=8)
    assert not torch.equal(a.encoding.embeddings, c.encoding.embeddings)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="normal_type"):
        NeRFField(FieldConfig.tiny(normal_type="pred"))
    with pytest.raises(ValueError, match="density_bias"):
        NeRFField(FieldConfig.tiny(density_bias="blob_dreamfusion"))
    with pytest.raises(ValueError, match="radius"):
        NeRFField(FieldConfig.tiny(radius=0.0))
    with pytest.raises(ValueError, match="per_level_scale"):
        HashGridEncoding(per_level_scale=0.5)
    with pytest.raises(ValueError, match="n_levels"):
        HashGridEncoding(n_levels=0)
    field = tiny_field()
    with pytest.raises(ValueError, match=r"\(P, 3\)"):
        field.density(torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"\(P, 3\)"):
        field(torch.zeros(2, 4, 3))
