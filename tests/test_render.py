"""mvdream_platform.data.render: Embree CPU renderer, mesh loading/normalisation, conventions."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from mvdream_platform.cameras import get_camera, orbit_camera_to_world, project_points
from mvdream_platform.data import render

from conftest import MESHES

FOVY = 40.0
FLAT = render.Light(ambient=1.0, diffuse=0.0)  # unshaded: the rendered colour is the albedo


def mvdream_cameras(num_views: int = 4, elevation: float = 15.0, margin: float = 1.1,
                    fovy: float = FOVY) -> torch.Tensor:
    """(V, 4, 4) MVDream cameras (get_camera) moved out so the unit sphere fits the frame."""
    c2w = get_camera(num_views, elevation=elevation).reshape(-1, 4, 4).clone()
    c2w[:, :3, 3] *= render.distance_to_fit(fovy, margin)
    return c2w


def front_camera(distance: float = 4.0) -> torch.Tensor:
    """MVDream azimuth 0, elevation 0: camera on -y looking at +y; +x is image right, +z up."""
    c2w = get_camera(1, elevation=0.0).reshape(1, 4, 4).clone()
    c2w[:, :3, 3] *= distance
    return c2w


def textured_quad(image: Image.Image, uv_scale: float = 1.0,
                  material: trimesh.visual.material.Material | None = None) -> trimesh.Trimesh:
    """Square x, z in [-1, 1] at y = 0 facing -y; UV (0, 0) at (x, z) = (-1, -1), bottom-left."""
    vertices = np.array([[-1, 0, -1], [1, 0, -1], [1, 0, 1], [-1, 0, 1]], dtype=np.float64)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float64) * uv_scale
    # White diffuse: trimesh's default (0.4 grey) would become glTF's baseColorFactor on export.
    material = material or trimesh.visual.material.SimpleMaterial(image=image,
                                                                  diffuse=[255, 255, 255, 255])
    visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    return trimesh.Trimesh(vertices, faces, visual=visual, process=False)


QUADRANTS = {"top_left": (255, 0, 0), "top_right": (0, 255, 0),
             "bottom_left": (0, 0, 255), "bottom_right": (255, 255, 255)}


def quadrant_image() -> Image.Image:
    pixels = np.array([[QUADRANTS["top_left"], QUADRANTS["top_right"]],
                       [QUADRANTS["bottom_left"], QUADRANTS["bottom_right"]]], dtype=np.uint8)
    return Image.fromarray(pixels)


def quadrant_colors(rgba: np.ndarray) -> dict[str, tuple[int, ...]]:
    """Colours at the centres of the four quadrants of the quad's image (H, W, 4)."""
    h, w = rgba.shape[:2]
    at = {"top_left": (h // 2 - 4, w // 2 - 4), "top_right": (h // 2 - 4, w // 2 + 3),
          "bottom_left": (h // 2 + 3, w // 2 - 4), "bottom_right": (h // 2 + 3, w // 2 + 3)}
    return {k: tuple(int(c) for c in rgba[r, c_, :3]) for k, (r, c_) in at.items()}


@pytest.fixture(scope="module")
def meshes() -> dict[str, object]:
    names = ["Duck.glb", "BoxTextured.glb", "capsule.obj", "teapot.stl", "bunny.ply"]
    return {name: render.load_normalized_mesh(MESHES / name)[0] for name in names}


# ----------------------------------------------------------------------------- engine


def test_ray_casting_uses_embree():
    prepared = render.prepare_mesh(trimesh.creation.icosphere(2))
    from trimesh.ray.ray_pyembree import RayMeshIntersector

    assert trimesh.ray.has_embree
    assert isinstance(prepared.intersector, RayMeshIntersector)
    assert prepared.num_faces == 320


def test_bad_inputs_raise_value_errors_naming_them(tmp_path):
    sphere = trimesh.creation.icosphere(1)
    c2w = front_camera()
    bogus = tmp_path / "model.xyzw"
    bogus.write_text("nothing")
    with pytest.raises(ValueError, match="file_type"):
        render.load_mesh(bogus)
    with pytest.raises(ValueError, match="file_type"):
        render.load_mesh(io.BytesIO(b"solid x"))  # a file object needs its type
    with pytest.raises(ValueError, match="up_axis"):
        render.load_mesh(bogus, file_type="stl", up_axis="x")
    points_only = tmp_path / "points.ply"
    trimesh.PointCloud(np.random.default_rng(0).random((10, 3))).export(points_only)
    with pytest.raises(ValueError, match="no triangles"):
        render.load_mesh(points_only)
    with pytest.raises(ValueError, match="empty"):
        render.normalize_mesh(trimesh.Trimesh())
    with pytest.raises(ValueError, match="empty"):
        render.render_views(trimesh.Trimesh(), c2w, FOVY, 8)
    for bad in (0, -3, 2.5, (8, 0)):
        with pytest.raises(ValueError, match="resolution"):
            render.render_views(sphere, c2w, FOVY, bad)
    with pytest.raises(ValueError, match="antialias"):
        render.render_views(sphere, c2w, FOVY, 8, antialias=0)
    with pytest.raises(ValueError, match="texture_filter"):
        render.render_views(sphere, c2w, FOVY, 8, texture_filter="cubic")
    with pytest.raises(ValueError, match="c2w"):
        render.render_views(sphere, c2w[0], FOVY, 8)
    with pytest.raises(ValueError, match="fovy_deg"):
        render.render_views(sphere, c2w, 180.0, 8)
    with pytest.raises(ValueError, match="margin"):
        render.distance_to_fit(FOVY, margin=0.0)
    with pytest.raises(ValueError, match="light.frame"):
        render.Light(frame="object")
    with pytest.raises(ValueError, match="light.direction"):
        render.render_views(sphere, c2w, FOVY, 8, light=render.Light(direction=(0, 0, 0)))


def test_prepared_mesh_and_threads_give_identical_images():
    mesh = trimesh.creation.icosphere(3)
    mesh.visual.vertex_colors = np.random.default_rng(0).integers(0, 256, (len(mesh.vertices), 4))
    cams = mvdream_cameras(6)
    reference = render.render_views(mesh, cams, FOVY, 24, antialias=2)
    prepared = render.prepare_mesh(mesh)
    assert np.array_equal(render.render_views(prepared, cams, FOVY, 24, antialias=2), reference)
    threaded = render.render_views(prepared, cams.numpy(), np.full(6, FOVY), 24, antialias=2,
                                   num_threads=3)
    assert np.array_equal(threaded, reference)
    assert reference.shape == (6, 24, 24, 4) and reference.dtype == np.uint8
    wide = render.render_views(prepared, cams[:1], FOVY, (20, 36))[0, ..., 3] > 0
    rows, cols = np.nonzero(wide)  # (H, W): principal point at the centre of a wide image
    assert wide.shape == (20, 36) and abs(rows.mean() - 9.5) < 1 and abs(cols.mean() - 17.5) < 1


# ----------------------------------------------------------------------------- conventions


def test_distance_to_fit_frames_the_unit_sphere():
    assert render.distance_to_fit(60.0) == pytest.approx(2.0)
    assert render.distance_to_fit(60.0, margin=1.5) == pytest.approx(3.0)
    assert torch.allclose(render.distance_to_fit(torch.tensor([60.0, 90.0])),
                          torch.tensor([2.0, math.sqrt(2.0)]))
    sphere = trimesh.creation.icosphere(5)  # vertices on the unit sphere, 20480 faces
    size = 96
    for margin in (1.0, 1.3):
        distance = render.distance_to_fit(FOVY, margin)
        c2w = orbit_camera_to_world(20.0, 30.0, distance)
        alpha = render.render_views(sphere, c2w, FOVY, size)[0, ..., 3] > 0
        rows = np.flatnonzero(alpha.any(axis=1))
        # Tangent cone half-angle asin(1/d) -> image half-height tan(.) / tan(fovy/2).
        half = math.tan(math.asin(1 / distance)) / math.tan(math.radians(FOVY / 2))
        assert rows[-1] - rows[0] + 1 == pytest.approx(half * size, abs=2.0)
    full = render.render_views(sphere, orbit_camera_to_world(0.0, 0.0, render.distance_to_fit(
        FOVY)), FOVY, size)[0, ..., 3]
    assert full[0].any() and full[-1].any()  # margin 1 touches the top and bottom rows


def test_projected_vertices_land_on_the_rendered_silhouette(meshes):
    """Our cameras + intrinsics (project_points) agree with the renderer pixel for pixel."""
    mesh = meshes["Duck.glb"]  # asymmetric: a mirrored or flipped image would not match
    size = 64
    c2w = mvdream_cameras(4)
    alpha = render.render_views(mesh, c2w, FOVY, size)[..., 3] > 0
    uv, depth = project_points(torch.as_tensor(mesh.vertices, dtype=torch.float32), c2w, FOVY,
                               size, size)
    assert bool((depth > 0).all())
    col = uv[..., 0].floor().long().clamp(0, size - 1).numpy()
    row = uv[..., 1].floor().long().clamp(0, size - 1).numpy()
    # A vertex lies on the mesh, so its pixel is covered; 1-px tolerance at the boundary.
    grown = np.zeros_like(alpha)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            grown |= np.roll(alpha, (dr, dc), axis=(1, 2))
    views = np.arange(4)[:, None]
    assert grown[views, row, col].all()
    assert alpha[views, row, col].mean() > 0.9  # the rest sit on the silhouette boundary
    for v in range(4):  # the silhouette's bounding box is the vertices' (within a pixel)
        rows, cols = np.flatnonzero(alpha[v].any(1)), np.flatnonzero(alpha[v].any(0))
        assert abs(rows[0] - row[v].min()) <= 1 and abs(rows[-1] - row[v].max()) <= 1
        assert abs(cols[0] - col[v].min()) <= 1 and abs(cols[-1] - col[v].max()) <= 1
    # The check has teeth: mirrored silhouettes miss many vertices.
    assert grown[:, :, ::-1][views, row, col].mean() < 0.95


def test_world_axes_in_the_image():
    """MVDream azimuth 0: +x appears on the right, +z at the top (z-up world, OpenGL camera)."""
    red = trimesh.creation.icosphere(2, radius=0.3)
    red.apply_translation([0.8, 0, 0])
    red.visual.face_colors = [255, 0, 0, 255]
    blue = trimesh.creation.icosphere(2, radius=0.3)
    blue.apply_translation([0, 0, 0.8])
    blue.visual.face_colors = [0, 0, 255, 255]
    rgba = render.render_views([red, blue], front_camera(), FOVY, 64, light=FLAT)[0]
    is_red = (rgba[..., 0] == 255) & (rgba[..., 2] == 0) & (rgba[..., 3] == 255)
    is_blue = (rgba[..., 2] == 255) & (rgba[..., 0] == 0) & (rgba[..., 3] == 255)
    red_rows, red_cols = np.nonzero(is_red)
    blue_rows, blue_cols = np.nonzero(is_blue)
    assert red_cols.mean() > 44 and abs(red_rows.mean() - 31.5) < 2
    assert blue_rows.mean() < 20 and abs(blue_cols.mean() - 31.5) < 2


# ----------------------------------------------------------------------------- colours


def test_texture_orientation_bottom_left_uv_origin():
    quad = textured_quad(quadrant_image())
    rgba = render.render_views(quad, front_camera(), FOVY, 32, light=FLAT,
                               texture_filter="nearest")[0]
    assert quadrant_colors(rgba) == QUADRANTS


@pytest.mark.parametrize("file_type", ["glb", "obj"])
def test_texture_orientation_survives_file_round_trips(tmp_path, file_type):
    """trimesh flips glTF's top-left v on import and keeps OBJ's: both render the same."""
    quad = textured_quad(quadrant_image())
    path = tmp_path / f"quad.{file_type}"
    if file_type == "obj":
        files = trimesh.exchange.export.export_obj(quad, include_texture=True,
                                                   return_texture=True, mtl_name="quad.mtl")
        path.write_text(files[0])
        for name, data in files[1].items():
            (tmp_path / name).write_bytes(data)
    else:
        quad.export(path)
    loaded = render.load_mesh(path, up_axis="z")
    rgba = render.render_views(loaded, front_camera(), FOVY, 32, light=FLAT,
                               texture_filter="nearest")[0]
    assert quadrant_colors(rgba) == QUADRANTS


def test_uv_wrap_repeats_and_base_color_factor_multiplies():
    stripes = Image.fromarray(np.array([[[255, 255, 255], [0, 0, 0]]], dtype=np.uint8))
    quad = textured_quad(stripes, uv_scale=2.0)  # two repeats across the quad
    row = render.render_views(quad, front_camera(), FOVY, 64, light=FLAT,
                              texture_filter="nearest")[0, 32, :, 0]
    covered = np.flatnonzero(render.render_views(quad, front_camera(), FOVY, 64)[0, 32, :, 3])
    quarter = (covered[-1] - covered[0] + 1) / 4
    centres = (covered[0] + quarter * (np.arange(4) + 0.5)).astype(int)
    assert row[centres].tolist() == [255, 0, 255, 0]

    white = Image.fromarray(np.full((2, 2, 3), 255, np.uint8))
    pbr = trimesh.visual.material.PBRMaterial(baseColorTexture=white,
                                              baseColorFactor=[255, 128, 0, 255])
    rgba = render.render_views(textured_quad(white, material=pbr), front_camera(), FOVY, 16,
                               light=FLAT)[0]
    assert tuple(rgba[8, 8]) == (255, 128, 0, 255)


def test_bilinear_filter_blends_texels_nearest_does_not():
    checker = Image.fromarray(np.array([[[0] * 3, [255] * 3], [[255] * 3, [0] * 3]], np.uint8))
    quad = textured_quad(checker)
    kwargs = dict(light=FLAT, antialias=1)
    nearest = render.render_views(quad, front_camera(), FOVY, 48, texture_filter="nearest",
                                  **kwargs)[0]
    bilinear = render.render_views(quad, front_camera(), FOVY, 48, **kwargs)[0]
    inside = nearest[..., 3] == 255
    assert set(np.unique(nearest[inside][:, 0]).tolist()) == {0, 255}
    assert len(np.unique(bilinear[inside][:, 0])) > 10


def test_vertex_colours_interpolate_and_face_colours_are_flat():
    vertices = np.array([[-1, 0, -1], [1, 0, -1], [0, 0, 1]], dtype=np.float64)
    tri = trimesh.Trimesh(vertices, [[0, 1, 2]], process=False,
                          vertex_colors=[[255, 0, 0, 255], [0, 255, 0, 255], [0, 0, 255, 255]])
    assert tri.visual.kind == "vertex"
    rgba = render.render_views(tri, front_camera(), FOVY, 64, light=FLAT)[0]
    inside = rgba[..., 3] == 255
    centroid = vertices.mean(axis=0)
    uv, _ = project_points(torch.tensor(centroid[None], dtype=torch.float32), front_camera(),
                           FOVY, 64, 64)
    col, row = (int(x) for x in uv[0, 0].floor())
    assert np.abs(rgba[row, col, :3].astype(int) - 85).max() <= 6  # (1/3, 1/3, 1/3) mix
    assert rgba[inside][:, :3].sum(axis=1).min() >= 250  # barycentric weights sum to one

    quad = trimesh.Trimesh([[-1, 0, -1], [1, 0, -1], [1, 0, 1], [-1, 0, 1]],
                           [[0, 1, 2], [0, 2, 3]], process=False,
                           face_colors=[[200, 10, 10, 255], [10, 10, 200, 255]])
    rgba = render.render_views(quad, front_camera(), FOVY, 64, light=FLAT)[0]
    colours = {tuple(c) for c in rgba[rgba[..., 3] == 255][:, :3].tolist()}
    assert colours == {(200, 10, 10), (10, 10, 200)}


def test_untextured_mesh_is_default_grey():
    rgba = render.render_views(trimesh.creation.box(), front_camera(), FOVY, 16, light=FLAT)[0]
    grey = render.DEFAULT_GREY[0]
    assert (rgba[rgba[..., 3] == 255][:, :3] == grey).all()


# ----------------------------------------------------------------------------- lighting


def test_lambert_plus_ambient_and_two_sided():
    white = Image.fromarray(np.full((2, 2, 3), 255, np.uint8))
    quad = textured_quad(white)
    head_on = render.Light(ambient=0.3, diffuse=0.5, direction=(0, 0, 1))
    behind = render.Light(ambient=0.3, diffuse=0.5, direction=(0, 0, -1))
    front = render.render_views(quad, front_camera(), FOVY, 16, light=head_on)[0, 8, 8]
    back_lit = render.render_views(quad, front_camera(), FOVY, 16, light=behind)[0, 8, 8]
    assert front[0] == round(0.8 * 255) and back_lit[0] == round(0.3 * 255)
    # Seen from behind (+y), the quad's back face is lit as if it faced the camera.
    from_back = orbit_camera_to_world(0.0, 90.0, 4.0)
    assert render.render_views(quad, from_back, FOVY, 16, light=head_on)[0, 8, 8, 0] == 204


def test_default_light_comes_from_the_upper_left():
    rgba = render.render_views(trimesh.creation.icosphere(3), front_camera(), FOVY, 64)[0]
    lum = rgba[..., :3].astype(float).mean(-1)
    upper_left, lower_right = lum[16:32, 16:32].mean(), lum[32:48, 32:48].mean()
    assert upper_left > lower_right + 30


def test_random_light_is_deterministic_per_generator():
    a, b = render.random_light(7), render.random_light(7)
    assert a == b and a.frame == "world"
    assert render.random_light(8).direction != a.direction
    assert (render.random_light(np.random.default_rng(3)).direction
            == render.random_light(np.random.default_rng(3)).direction)
    t1 = render.random_light(torch.Generator().manual_seed(5))
    t2 = render.random_light(torch.Generator().manual_seed(5))
    assert t1 == t2
    for seed in range(20):  # above the horizon, within the elevation range
        z = render.random_light(seed).direction[2]
        assert math.sin(math.radians(15)) - 1e-9 <= z <= math.sin(math.radians(75)) + 1e-9
    mesh = trimesh.creation.icosphere(2)
    cams = mvdream_cameras(2)
    one = render.render_views(mesh, cams, FOVY, 32, light=render.random_light(11))
    two = render.render_views(mesh, cams, FOVY, 32, light=render.random_light(11))
    other = render.render_views(mesh, cams, FOVY, 32, light=render.random_light(12))
    assert np.array_equal(one, two) and not np.array_equal(one, other)
    with pytest.raises(ValueError, match="generator"):
        render.random_light("seed")


def test_antialias_softens_edges_and_keeps_straight_alpha():
    sphere = trimesh.creation.icosphere(3)
    cams = mvdream_cameras(1)
    hard = render.render_views(sphere, cams, FOVY, 48)[0]
    soft = render.render_views(sphere, cams, FOVY, 48, antialias=3)[0]
    assert set(np.unique(hard[..., 3]).tolist()) == {0, 255}
    partial = (soft[..., 3] > 0) & (soft[..., 3] < 255)
    assert partial.sum() > 40  # the silhouette ring
    assert abs(soft[..., 3].sum() / 255 - (hard[..., 3] > 0).sum()) < 0.03 * (hard[..., 3] > 0).sum()
    # Straight alpha: edge pixels keep the surface's colour level, not darkened by coverage.
    assert (soft[partial][:, :3].max(axis=1) > 60).mean() > 0.9
    assert (soft[soft[..., 3] == 0][:, :3] == 0).all()


# ----------------------------------------------------------------------------- loading


def test_scene_parts_keep_transforms_and_own_colours():
    scene = trimesh.Scene()
    left, right = trimesh.creation.box(extents=(0.8, 0.8, 0.8)), trimesh.creation.box(
        extents=(0.8, 0.8, 0.8))
    left.visual.face_colors = [250, 0, 0, 255]
    right.visual.face_colors = [0, 250, 0, 255]
    scene.add_geometry(left, transform=trimesh.transformations.translation_matrix([-0.6, 0, 0]))
    scene.add_geometry(right, transform=trimesh.transformations.translation_matrix([0.6, 0, 0]))
    rgba = render.render_views(scene, front_camera(), FOVY, 64, light=FLAT)[0]
    left_half, right_half = rgba[:, :32][rgba[:, :32, 3] > 0], rgba[:, 32:][rgba[:, 32:, 3] > 0]
    assert (left_half[:, :3] == (250, 0, 0)).all() and len(left_half) > 200
    assert (right_half[:, :3] == (0, 250, 0)).all() and len(right_half) > 200


def test_normalisation_and_up_axes():
    duck_raw = trimesh.load_scene(MESHES / "Duck.glb").to_geometry()  # y-up, offset, cm scale
    duck, info = render.load_normalized_mesh(MESHES / "Duck.glb")
    assert info["up_axis"] == "y"
    vertices = np.asarray(duck.vertices)
    assert np.linalg.norm(vertices, axis=1).max() == pytest.approx(1.0, abs=1e-9)
    assert np.allclose(vertices.min(0) + vertices.max(0), 0.0, atol=1e-9)
    homogeneous = np.c_[duck_raw.vertices, np.ones(len(duck_raw.vertices))]
    assert np.allclose((homogeneous @ np.asarray(info["matrix"]).T)[:, :3], vertices, atol=1e-9)
    raw_extent, extent = np.ptp(duck_raw.vertices, axis=0), np.ptp(vertices, axis=0)
    # y-up -> z-up: the file's height (y) becomes z, its depth (z) becomes y.
    assert np.allclose(extent, info["scale"] * raw_extent[[0, 2, 1]])
    assert not np.isclose(raw_extent[1], raw_extent[2], rtol=0.05)

    as_is, info_z = render.load_normalized_mesh(MESHES / "Duck.glb", up_axis="z")
    assert np.allclose(np.ptp(as_is.vertices, axis=0), info_z["scale"] * raw_extent)
    teapot, info_t = render.load_normalized_mesh(MESHES / "teapot.stl")
    assert info_t["up_axis"] == "z" and np.allclose(info_t["rotation"], np.eye(3))
    height = np.ptp(teapot.vertices, axis=0)
    assert height[2] < height[1] < height[0]  # a teapot is wider than tall, spout along x

    with open(MESHES / "Duck.glb", "rb") as f:
        from_file = render.load_mesh(io.BytesIO(f.read()), file_type="glb")
    assert len(from_file.faces) == len(duck.faces)


@pytest.mark.parametrize("name", ["Duck.glb", "BoxTextured.glb", "capsule.obj", "teapot.stl",
                                  "bunny.ply"])
def test_real_meshes_render_centred_framed_and_coloured(meshes, name):
    size = 64
    rgba = render.render_views(meshes[name], mvdream_cameras(4), FOVY, size, antialias=2)
    for view in rgba:
        alpha = view[..., 3] > 0
        rows, cols = np.nonzero(alpha)
        assert abs(rows.mean() - size / 2) < 0.15 * size and abs(cols.mean() - size / 2) < 0.15 * size
        assert max(np.ptp(rows), np.ptp(cols)) + 1 > 0.45 * size  # fills the frame sensibly
        border = np.r_[view[0, :, 3], view[-1, :, 3], view[:, 0, 3], view[:, -1, 3]]
        assert border.max() == 0  # not clipped
    hits = rgba[rgba[..., 3] == 255][:, :3].astype(int)
    r, g, b = hits.T
    distinct = len(np.unique(hits // 16, axis=0))
    if name == "Duck.glb":
        assert ((r > 150) & (g > 120) & (b < 90)).mean() > 0.7  # mostly yellow
    elif name == "BoxTextured.glb":  # the logo's blue sky and green hills, not flat grey
        assert ((b > r + 40) & (b > g)).mean() > 0.1
        assert ((g > r + 20) & (g > b)).mean() > 0.1
        assert distinct > 20
    elif name == "capsule.obj":
        assert distinct > 60
    else:  # no colours in the file: default grey, shaded
        assert (r == g).all() and (g == b).all() and np.ptp(r) > 60
