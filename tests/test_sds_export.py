"""Mesh / video / image export of a distilled object, checked on analytic fields (CPU, fast).

The reference field is a softplus "sphere": ``density = softplus(K * (R0 - |x|))``. Its level
``softplus(0) = ln 2`` is exactly the sphere of radius R0, and the level ``d`` is the sphere of
radius ``R0 - log(exp(d) - 1) / K``: closed forms the meshes are compared against.
"""

from __future__ import annotations

import io
import math

import imageio.v2 as imageio_v2
import imageio.v3 as iio
import numpy as np
import pytest
import torch
import trimesh

from mvdream_platform import storage
from mvdream_platform.sds import export as E

R0, K = 0.5, 20.0
RES = 48
VOXEL = 2.0 / (RES - 1)  # radius 1


def sphere_density(points: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.softplus(K * (R0 - points.norm(dim=-1)))


def albedo(points: torch.Tensor) -> torch.Tensor:
    """A colour that varies over the surface, so a mix-up of vertices would show."""
    return (points / (2 * R0) + 0.5).clamp(0, 1)


def level_radius(d: float) -> float:
    """Radius of the sphere where ``sphere_density == d``."""
    return R0 - math.log(math.expm1(d)) / K


@pytest.fixture(scope="module")
def sphere_mesh() -> trimesh.Trimesh:
    return E.extract_mesh(sphere_density, albedo, resolution=RES, threshold=math.log(2.0))


# ----------------------------------------------------------------------------- extraction


def test_sphere_is_watertight_outward_on_radius_with_albedo_colours(sphere_mesh):
    mesh = sphere_mesh
    assert len(mesh.faces) > 1000
    assert mesh.is_watertight
    radius = np.linalg.norm(mesh.vertices, axis=1)
    assert np.abs(radius - R0).max() < VOXEL
    # Outward: positive signed volume, and every vertex normal points away from the centre.
    assert mesh.volume == pytest.approx(4.0 / 3.0 * math.pi * R0**3, rel=0.02)
    assert (np.einsum("ij,ij->i", mesh.vertex_normals, mesh.vertices) > 0).all()
    colours = mesh.visual.vertex_colors
    assert colours.dtype == np.uint8 and colours.shape == (len(mesh.vertices), 4)
    expected = albedo(torch.as_tensor(mesh.vertices, dtype=torch.float32)).numpy() * 255
    assert np.abs(colours[:, :3].astype(float) - expected).max() <= 0.5 + 1e-3
    assert (colours[:, 3] == 255).all()
    assert mesh.metadata["threshold"] == pytest.approx(math.log(2.0))


def test_auto_threshold_is_mean_of_nonempty_densities_and_explicit_is_respected():
    # Independent grid: linspace over [-1, 1] on each axis, both faces included.
    axis = np.linspace(-1.0, 1.0, RES)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    d = np.logaddexp(0.0, K * (R0 - np.sqrt(x**2 + y**2 + z**2)))
    expected = d[d > 1e-5].mean()

    auto = E.extract_mesh(sphere_density, albedo, resolution=RES)
    assert auto.metadata["threshold"] == pytest.approx(expected, rel=1e-4)
    assert auto.is_watertight
    radius = np.linalg.norm(auto.vertices, axis=1)
    assert np.abs(radius - level_radius(expected)).max() < VOXEL

    explicit = E.extract_mesh(sphere_density, None, resolution=RES, threshold=3.0)
    assert explicit.metadata["threshold"] == 3.0
    radius = np.linalg.norm(explicit.vertices, axis=1)
    assert np.abs(radius - level_radius(3.0)).max() < VOXEL
    assert level_radius(3.0) < R0 - 2 * VOXEL  # really a different surface


@pytest.mark.parametrize("threshold", ["auto", 1.0])
def test_empty_density_raises_naming_threshold_and_range(threshold):
    def empty(points):
        return torch.zeros(points.shape[0])

    with pytest.raises(ValueError, match=r"never crosses .*threshold.*\[0, 0\]"):
        E.extract_mesh(empty, albedo, resolution=8, threshold=threshold)


def test_threshold_outside_range_and_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"threshold 100; .*ranges over \[1.98.*e-11, 7.69.*\]"):
        E.extract_mesh(sphere_density, albedo, resolution=16, threshold=100.0)
    with pytest.raises(ValueError, match="threshold must be a number or 'auto'"):
        E.extract_mesh(sphere_density, albedo, resolution=16, threshold="mean")
    with pytest.raises(ValueError, match="density_fn must map points"):
        E.extract_mesh(lambda p: torch.zeros(p.shape[0], 2), albedo, resolution=8)
    with pytest.raises(ValueError, match="NaN"):
        E.extract_mesh(lambda p: torch.full((p.shape[0],), float("nan")), albedo,
                       resolution=8)


def test_chunks_no_grad_world_coordinates_and_n_by_1_densities():
    seen = []

    def density(points):
        assert not torch.is_grad_enabled()
        assert points.dtype == torch.float32 and points.shape[1] == 3
        seen.append(points.clone())
        return sphere_density(points)[:, None]  # (N, 1) is accepted too

    mesh = E.extract_mesh(density, albedo, radius=0.8, resolution=17, chunk=1000,
                          threshold=math.log(2.0))
    assert max(len(p) for p in seen) <= 1000
    pts = torch.cat(seen)
    assert len(pts) == 17**3
    assert pts.min().item() == pytest.approx(-0.8) and pts.max().item() == pytest.approx(0.8)
    radius = np.linalg.norm(mesh.vertices, axis=1)
    assert np.abs(radius - R0).max() < 1.6 / 16


def test_infinite_density_is_clamped_not_fatal():
    def overflowing(points):  # exp-like activation overflowing at the centre
        d = sphere_density(points)
        return torch.where(points.norm(dim=-1) < 0.2, torch.full_like(d, float("inf")), d)

    mesh = E.extract_mesh(overflowing, None, resolution=RES, threshold=math.log(2.0))
    assert np.isfinite(mesh.metadata["density_range"]).all()
    assert np.abs(np.linalg.norm(mesh.vertices, axis=1) - R0).max() < VOXEL


def test_surface_cut_by_the_box_is_closed_on_the_box_face():
    # A sphere of radius 1.2 in the box [-1, 1]^3: the mesh is the box with rounded corners.
    def big(points):
        return torch.nn.functional.softplus(K * (1.2 - points.norm(dim=-1)))

    mesh = E.extract_mesh(big, None, resolution=24, threshold=math.log(2.0))
    assert mesh.is_watertight and mesh.volume > 0
    assert np.abs(mesh.vertices).max() <= 1.0
    assert np.isclose(np.abs(mesh.vertices).max(axis=1), 1.0).mean() > 0.3


# ----------------------------------------------------------------------------- mesh files


@pytest.mark.parametrize("remote", [False, True])
def test_write_mesh_round_trips_counts_positions_and_colours(sphere_mesh, tmp_path, remote):
    out = f"memory://export-test/mesh-{id(sphere_mesh)}" if remote else str(tmp_path / "out")
    uris = E.write_mesh(sphere_mesh, out, stem="obj0")
    assert list(uris) == ["glb", "obj", "ply"]
    for fmt, uri in uris.items():
        assert uri == storage.join(out, f"obj0.{fmt}")
        loaded = trimesh.load(io.BytesIO(storage.read_bytes(uri)), file_type=fmt,
                              process=False, force="mesh")
        assert len(loaded.vertices) == len(sphere_mesh.vertices), fmt
        assert len(loaded.faces) == len(sphere_mesh.faces), fmt
        vertices = loaded.vertices
        if fmt == "glb":  # stored +y up: (x, y, z) -> (x, z, -y); undo it
            vertices = np.stack([vertices[:, 0], -vertices[:, 2], vertices[:, 1]], axis=1)
        np.testing.assert_allclose(vertices, sphere_mesh.vertices, atol=1e-5, err_msg=fmt)
        np.testing.assert_array_equal(loaded.faces, sphere_mesh.faces, err_msg=fmt)
        assert loaded.visual.kind == "vertex", fmt
        np.testing.assert_array_equal(loaded.visual.vertex_colors,
                                      sphere_mesh.visual.vertex_colors, err_msg=fmt)
    if not remote:
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
            "obj0.glb", "obj0.obj", "obj0.ply"]  # no temporary files left behind


def test_write_mesh_subset_and_bad_format(sphere_mesh, tmp_path):
    assert list(E.write_mesh(sphere_mesh, tmp_path, formats=("ply",))) == ["ply"]
    with pytest.raises(ValueError, match="formats must be among"):
        E.write_mesh(sphere_mesh, tmp_path, formats=("stl",))


# ----------------------------------------------------------------------------- turntable


def moving_frames(t: int, h: int, w: int) -> np.ndarray:
    """(T, H, W, 3) uint8 frames that all differ (Pillow merges identical GIF frames)."""
    frames = np.zeros((t, h, w, 3), dtype=np.uint8)
    for k in range(t):
        frames[k, :, (3 * k) % w:(3 * k) % w + 3] = 255
        frames[k, ..., 1] = 20 * k
    return frames


@pytest.mark.parametrize("remote", [False, True])
def test_write_turntable_gif_and_mp4_with_odd_size(tmp_path, remote):
    t, h, w = 6, 33, 41  # odd on purpose: the mp4 is padded to 34 x 42
    out = "memory://export-test/video" if remote else str(tmp_path)
    uris = E.write_turntable(moving_frames(t, h, w), out, fps=12)
    assert set(uris) == {"gif", "mp4"}
    gif = iio.imread(storage.read_bytes(uris["gif"]), index=None, extension=".gif")
    assert gif.shape[:3] == (t, h, w)
    mp4 = storage.read_bytes(uris["mp4"])
    assert len(mp4) > 0
    local = tmp_path / "copy.mp4"
    local.write_bytes(mp4)
    reader = imageio_v2.get_reader(str(local), format="FFMPEG")
    try:
        assert reader.count_frames() == t
        assert reader.get_meta_data()["size"] == (w + 1, h + 1)
    finally:
        reader.close()


def test_write_turntable_rejects_float_frames(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        E.write_turntable(np.zeros((2, 8, 8, 3), np.float32), tmp_path)
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        E.write_turntable(np.zeros((8, 8, 3), np.uint8), tmp_path)


def test_pad_to_even_keeps_pixels():
    frames = moving_frames(2, 5, 6)
    padded = E.pad_to_even(frames)
    assert padded.shape == (2, 6, 6, 3)
    np.testing.assert_array_equal(padded[:, :5], frames)
    np.testing.assert_array_equal(padded[:, 5], frames[:, 4])
    assert E.pad_to_even(padded) is padded


def test_write_multiview_png_side_by_side():
    views = moving_frames(4, 8, 10)
    uri = E.write_multiview_png(torch.as_tensor(views), "memory://export-test/png", "views")
    assert uri == "memory://export-test/png/views.png"
    image = iio.imread(storage.read_bytes(uri), extension=".png")
    assert image.shape == (8, 40, 3)
    np.testing.assert_array_equal(image[:, 10:20], views[1])
