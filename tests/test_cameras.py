"""Camera conventions: numbers derived by hand / closed form, independent of the implementation.

Reference used here for MVDream's cameras (official ``camera_utils.get_camera``, z-up world):
with MVDream azimuth ``a`` and elevation ``e`` the camera sits at
``(cos e sin a, -cos e cos a, sin e)``; its right axis is horizontal, ``(cos a, sin a, 0)``;
its back axis is the position itself (it looks at the origin); up = back x right.
"""

import math

import numpy as np
import pytest
import torch

from mvdream_platform import cameras as C

COS15 = 0.9659258262890683
SIN15 = 0.25881904510252074


def closed_form_mvdream(elevation_deg: float, azimuth_deg: float) -> np.ndarray:
    """(4, 4) float64 z-up c2w for an MVDream camera, written without any look-at code."""
    e, a = math.radians(elevation_deg), math.radians(azimuth_deg)
    back = np.array([math.cos(e) * math.sin(a), -math.cos(e) * math.cos(a), math.sin(e)])
    right = np.array([math.cos(a), math.sin(a), 0.0])
    up = np.cross(back, right)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, up, back, back
    return m


# ----------------------------------------------------------------------------- get_camera


def test_get_camera_hand_computed_values():
    cams = C.get_camera(4)  # elevation 15, azimuths 0, 90, 180, 270
    assert cams.shape == (4, 16) and cams.dtype == torch.float32
    # Azimuth 0: camera on -y looking towards +y, right = +x.
    front = [1, 0, 0, 0,
             0, SIN15, -COS15, -COS15,
             0, COS15, SIN15, SIN15,
             0, 0, 0, 1]
    # Azimuth 90: camera on +x looking towards -x, right = +y.
    side = [0, -SIN15, COS15, COS15,
            1, 0, 0, 0,
            0, COS15, SIN15, SIN15,
            0, 0, 0, 1]
    torch.testing.assert_close(cams[0], torch.tensor(front, dtype=torch.float32),
                               atol=1e-7, rtol=0)
    torch.testing.assert_close(cams[1], torch.tensor(side, dtype=torch.float32),
                               atol=1e-7, rtol=0)
    # The span's endpoint is excluded: the 4th view is at 270 (on -x), not back at 360.
    torch.testing.assert_close(cams[3].reshape(4, 4)[:3, 3],
                               torch.tensor([-COS15, 0.0, SIN15]), atol=1e-7, rtol=0)


def test_get_camera_y_up_world_when_not_blender():
    cam = C.get_camera(1, blender_coord=False)[0]
    # MVDream's own y-up world: azimuth 0 camera on +z, up +y.
    expected = [1, 0, 0, 0,
                0, COS15, SIN15, SIN15,
                0, -SIN15, COS15, COS15,
                0, 0, 0, 1]
    torch.testing.assert_close(cam, torch.tensor(expected, dtype=torch.float32),
                               atol=1e-7, rtol=0)


@pytest.mark.parametrize(
    "num_frames, elevation, azimuth_start, azimuth_span",
    [(4, 15, 0, 360), (8, 30, 45, 180), (3, 0, 90, 360), (5, -20, -30, 90), (1, 10, 123, 360)],
)
def test_get_camera_matches_closed_form(num_frames, elevation, azimuth_start, azimuth_span):
    cams = C.get_camera(num_frames, elevation, azimuth_start, azimuth_span)
    azimuths = [azimuth_start + k * azimuth_span / num_frames for k in range(num_frames)]
    expected = np.stack([closed_form_mvdream(elevation, a).reshape(16) for a in azimuths])
    np.testing.assert_allclose(cams.numpy(), expected, atol=1e-6, rtol=0)


def test_get_camera_always_returns_num_frames():
    # np.arange with a float step would give 14 views here; we must give 13.
    assert C.get_camera(13, azimuth_span=120).shape == (13, 16)


def test_get_camera_device_argument():
    assert C.get_camera(2, device="cpu").device.type == "cpu"


# ----------------------------------------------------------------------------- normalize / vectors


def test_normalize_camera_unit_translation_and_input_untouched():
    c2w = torch.eye(4).repeat(2, 1, 1)
    c2w[0, :3, 3] = torch.tensor([3.0, 0.0, 4.0])
    c2w[1, :3, 3] = torch.tensor([0.0, -2.0, 0.0])
    before = c2w.clone()
    out = C.normalize_camera(c2w)
    assert out.shape == (2, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out[0, [3, 7, 11]], torch.tensor([0.6, 0.0, 0.8]))
    torch.testing.assert_close(out[1, [3, 7, 11]], torch.tensor([0.0, -1.0, 0.0]))
    torch.testing.assert_close(out[:, [0, 5, 10, 15]], torch.ones(2, 4))
    assert torch.equal(c2w, before)
    # Same answer from flattened input.
    torch.testing.assert_close(C.normalize_camera(c2w.reshape(2, 16)), out)


def test_camera_matrices_to_vectors_row_major():
    m = torch.arange(32, dtype=torch.float64).reshape(2, 4, 4)
    v = C.camera_matrices_to_vectors(m)
    assert v.shape == (2, 16) and v.dtype == torch.float32
    assert v[1, 3].item() == 19.0  # row 0, column 3 (translation x) of camera 1
    assert v[1, 4].item() == 20.0  # row 1, column 0
    with pytest.raises(ValueError, match="c2w"):
        C.camera_matrices_to_vectors(torch.zeros(2, 16))


# ----------------------------------------------------------------------------- orbit cameras


def test_orbit_camera_hand_computed():
    c2w = C.orbit_camera_to_world(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([2.0]))
    # Camera on +x at distance 2 looking at the origin, right = +y, up = +z, back = +x.
    expected = torch.tensor([[0.0, 0.0, 1.0, 2.0],
                             [1.0, 0.0, 0.0, 0.0],
                             [0.0, 1.0, 0.0, 0.0],
                             [0.0, 0.0, 0.0, 1.0]])
    assert c2w.shape == (1, 4, 4) and c2w.dtype == torch.float32
    torch.testing.assert_close(c2w[0], expected, atol=1e-7, rtol=0)
    # Azimuth 90 moves it to +y; elevation 90 is rejected (up would be parallel to view).
    pos = C.orbit_camera_to_world(30.0, 90.0, 1.0)[0, :3, 3]
    torch.testing.assert_close(pos, torch.tensor([0.0, math.cos(math.pi / 6), 0.5]),
                               atol=1e-7, rtol=0)


def test_mvdream_azimuth_is_orbit_azimuth_plus_90():
    elevation = torch.tensor([0.0, 15.0, 30.0, -10.0])
    mv_azimuth = torch.tensor([0.0, 90.0, 200.0, 315.0])
    distance = torch.tensor([1.5, 2.0, 3.7, 0.9])
    orbit = C.orbit_camera_to_world(elevation, C.mvdream_to_orbit_azimuth(mv_azimuth), distance)
    # Same rotation; translation differs only by the distance, removed by normalize_camera.
    mv = torch.cat([C.get_camera(1, float(e), float(a)) for e, a in zip(elevation, mv_azimuth)])
    torch.testing.assert_close(C.normalize_camera(orbit), mv, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.vector_norm(orbit[:, :3, 3], dim=-1), distance)
    # And a wrong offset is caught: +90 instead of -90 puts the camera opposite.
    wrong = C.normalize_camera(C.orbit_camera_to_world(elevation, mv_azimuth + 90, distance))
    assert (wrong - mv).abs().max() > 1.0


def test_orbit_rotation_is_proper_and_looks_at_origin():
    c2w = C.orbit_camera_to_world(torch.tensor([5.0, 25.0]), torch.tensor([-170.0, 33.0]),
                                  torch.tensor([1.0, 4.0]))
    rot = c2w[:, :3, :3]
    torch.testing.assert_close(rot.transpose(1, 2) @ rot, torch.eye(3).expand(2, 3, 3),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(2))
    # Forward (-third column) points from the camera to the origin.
    to_origin = -c2w[:, :3, 3] / torch.linalg.vector_norm(c2w[:, :3, 3], dim=-1, keepdim=True)
    torch.testing.assert_close(-rot[:, :, 2], to_origin, atol=1e-6, rtol=0)
    # Up has a positive world-z component (not upside down) and right is horizontal.
    assert (rot[:, 2, 1] > 0).all()
    torch.testing.assert_close(rot[:, 2, 0], torch.zeros(2), atol=1e-7, rtol=0)


def test_world_to_camera_inverts():
    c2w = C.orbit_camera_to_world([10.0, 20.0], [30.0, -40.0], [2.0, 3.0])
    torch.testing.assert_close(C.world_to_camera(c2w) @ c2w, torch.eye(4).expand(2, 4, 4),
                               atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- intrinsics / rays


def test_focal_and_intrinsics_hand_computed():
    f = C.focal_from_fovy(torch.tensor([60.0, 90.0]), 256)
    torch.testing.assert_close(f, torch.tensor([128.0 * math.sqrt(3.0), 128.0]))
    k = C.intrinsics_from_fovy(90.0, height=64, width=96)
    expected = torch.tensor([[32.0, 0.0, 48.0], [0.0, 32.0, 32.0], [0.0, 0.0, 1.0]])
    assert k.shape == (1, 3, 3) and k.dtype == torch.float32
    torch.testing.assert_close(k[0], expected)


def test_get_rays_hand_computed_identity_camera():
    # 2x2 image, fovy 90 -> f = 1 px; pixel (row 0, col 0) centre is (0.5, 0.5), principal
    # point (1, 1): camera direction (-0.5, +0.5, -1) (up-left, looking down -z).
    origins, dirs = C.get_rays(torch.eye(4)[None], 90.0, 2, 2)
    assert origins.shape == dirs.shape == (1, 2, 2, 3)
    assert dirs.dtype == torch.float32
    n = math.sqrt(1.5)
    expected = torch.tensor([[[-0.5, 0.5, -1.0], [0.5, 0.5, -1.0]],
                             [[-0.5, -0.5, -1.0], [0.5, -0.5, -1.0]]]) / n
    torch.testing.assert_close(dirs[0], expected)
    torch.testing.assert_close(origins, torch.zeros(1, 2, 2, 3))


def test_get_rays_central_ray_hits_origin_and_image_orientation():
    c2w = C.orbit_camera_to_world(torch.tensor([20.0, 0.0]), torch.tensor([45.0, -120.0]),
                                  torch.tensor([2.5, 4.0]))
    origins, dirs = C.get_rays(c2w, torch.tensor([40.0, 30.0]), 5, 7)  # odd: a centre pixel
    torch.testing.assert_close(origins[:, 2, 3], c2w[:, :3, 3])
    to_origin = -c2w[:, :3, 3] / torch.linalg.vector_norm(c2w[:, :3, 3], dim=-1, keepdim=True)
    torch.testing.assert_close(dirs[:, 2, 3], to_origin, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.vector_norm(dirs, dim=-1), torch.ones(2, 5, 7))
    cam_right, cam_up = c2w[:, None, :3, 0], c2w[:, None, :3, 1]
    # Row 0 is the top (rays tilt up), column 0 the left (rays tilt left).
    assert ((dirs[:, 0] * cam_up).sum(-1) > 0).all()
    assert ((dirs[:, -1] * cam_up).sum(-1) < 0).all()
    assert ((dirs[:, :, 0] * cam_right).sum(-1) < 0).all()
    assert ((dirs[:, :, -1] * cam_right).sum(-1) > 0).all()
    # Vertical field of view: top and bottom centre-column rays span fovy minus one pixel.
    f = C.focal_from_fovy(torch.tensor([40.0, 30.0]), 5)
    cos_angle = (dirs[:, 0, 3] * dirs[:, -1, 3]).sum(-1)
    torch.testing.assert_close(torch.acos(cos_angle), 2 * torch.atan(2.0 / f))


def test_projection_and_rays_agree():
    height, width = 6, 10  # non-square catches swapped axes
    c2w = C.orbit_camera_to_world([10.0, 25.0], [70.0, -30.0], [3.0, 2.0])
    fovy = torch.tensor([50.0, 35.0])
    origins, dirs = C.get_rays(c2w, fovy, height, width)
    pixels = [(0, 0), (0, 9), (5, 0), (2, 7), (5, 9)]
    rows = torch.tensor([p[0] for p in pixels])
    cols = torch.tensor([p[1] for p in pixels])
    depth_along_ray = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0])
    points = origins[:, rows, cols] + depth_along_ray[None, :, None] * dirs[:, rows, cols]
    uv, depth = C.project_points(points, c2w, fovy, height, width)
    expected_uv = torch.stack([cols + 0.5, rows + 0.5], dim=-1).float().expand(2, -1, -1)
    torch.testing.assert_close(uv, expected_uv, atol=1e-4, rtol=0)
    assert (depth > 0).all()
    # The origin projects to the principal point.
    uv0, _ = C.project_points(torch.zeros(1, 3), c2w, fovy, height, width)
    torch.testing.assert_close(uv0, torch.tensor([[[5.0, 3.0]], [[5.0, 3.0]]]), atol=1e-5,
                               rtol=0)


# ----------------------------------------------------------------------------- sampling


def test_sample_camera_groups_reproducible_and_structured():
    s1 = C.sample_camera_groups(64, 4, generator=torch.Generator().manual_seed(0))
    s2 = C.sample_camera_groups(64, 4, generator=torch.Generator().manual_seed(0))
    s3 = C.sample_camera_groups(64, 4, generator=torch.Generator().manual_seed(1))
    for name in ("elevation_deg", "azimuth_deg", "fovy_deg", "distance"):
        a, b, c = getattr(s1, name), getattr(s2, name), getattr(s3, name)
        assert a.shape == (256,) and a.dtype == torch.float32
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
    az = s1.azimuth_deg.reshape(64, 4)
    torch.testing.assert_close(az.diff(dim=1), torch.full((64, 3), 90.0), atol=1e-4, rtol=0)
    assert (az >= -180).all() and (az < 180).all()
    for name in ("elevation_deg", "fovy_deg", "distance"):
        g = getattr(s1, name).reshape(64, 4)
        assert torch.equal(g, g[:, :1].expand(-1, 4))  # shared within a group
    assert (s1.elevation_deg >= 0).all() and (s1.elevation_deg <= 30).all()
    assert (s1.fovy_deg >= 15).all() and (s1.fovy_deg <= 60).all()
    relative = s1.distance * torch.tan(torch.deg2rad(s1.fovy_deg) / 2)
    assert (relative >= 0.8 - 1e-5).all() and (relative <= 1.0 + 1e-5).all()
    # Offsets vary between groups (one random offset per group).
    assert az[:, 0].std() > 10
    assert s1.camera_to_world().shape == (256, 4, 4)


def test_sample_camera_groups_elevation_modes():
    def draw(p):
        return C.sample_camera_groups(500, 1, generator=torch.Generator().manual_seed(3),
                                      sphere_uniform_prob=p).elevation_deg.double()
    by_degree, by_area = draw(0.0), draw(1.0)
    # Same uniform draw u: degrees 30u versus asin(u sin 30) (uniform on the sphere's band).
    u = by_degree / 30.0
    expected = torch.rad2deg(torch.asin(u * 0.5))
    torch.testing.assert_close(by_area, expected, atol=1e-4, rtol=0)
    mixed = draw(0.5)
    is_degree = torch.isclose(mixed, by_degree, atol=1e-4)
    is_area = torch.isclose(mixed, by_area, atol=1e-4)
    assert (is_degree | is_area).all()
    assert 150 < int(is_degree.sum()) < 350  # about half of each (exact draw with seed 3)


# ----------------------------------------------------------------------------- errors / devices


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: C.get_camera(0), "num_frames"),
        (lambda: C.get_camera(2.0), "num_frames"),
        (lambda: C.get_camera(4, elevation=90), "elevation"),
        (lambda: C.focal_from_fovy(0.0, 32), "fovy_deg"),
        (lambda: C.focal_from_fovy(180.0, 32), "fovy_deg"),
        (lambda: C.focal_from_fovy(40.0, 0), "height"),
        (lambda: C.intrinsics_from_fovy(40.0, 32, -1), "width"),
        (lambda: C.get_rays(torch.eye(4)[None], 40.0, 0, 8), "height"),
        (lambda: C.get_rays(torch.eye(4)[None], 40.0, 8, 0), "width"),
        (lambda: C.get_rays(torch.eye(4)[None], torch.tensor([-5.0]), 8, 8), "fovy_deg"),
        (lambda: C.get_rays(torch.eye(4)[None], torch.tensor([30.0, 40.0]), 8, 8), "fovy_deg"),
        (lambda: C.get_rays(torch.eye(4), 40.0, 8, 8), "c2w"),
        (lambda: C.orbit_camera_to_world(95.0, 0.0, 1.0), "elevation_deg"),
        (lambda: C.orbit_camera_to_world(10.0, 0.0, 0.0), "distance"),
        (lambda: C.sample_camera_groups(0), "num_groups"),
        (lambda: C.sample_camera_groups(2, fovy_range=(10.0, 200.0)), "fovy_range"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_error_message_names_allowed_values():
    with pytest.raises(ValueError, match=r"\(0, 180\)"):
        C.focal_from_fovy(200.0, 32)
    with pytest.raises(ValueError, match=">= 1"):
        C.get_camera(-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    c2w = C.orbit_camera_to_world([10.0, 20.0], [30.0, -40.0], [2.0, 3.0])
    c2w_cuda = C.orbit_camera_to_world(torch.tensor([10.0, 20.0], device="cuda"),
                                       torch.tensor([30.0, -40.0], device="cuda"),
                                       torch.tensor([2.0, 3.0], device="cuda"))
    assert c2w_cuda.device.type == "cuda"
    torch.testing.assert_close(c2w_cuda.cpu(), c2w, atol=1e-6, rtol=0)
    o, d = C.get_rays(c2w_cuda, torch.tensor([40.0, 30.0], device="cuda"), 8, 8)
    o_ref, d_ref = C.get_rays(c2w, torch.tensor([40.0, 30.0]), 8, 8)
    torch.testing.assert_close(d.cpu(), d_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(o.cpu(), o_ref)
    groups = C.sample_camera_groups(3, generator=torch.Generator().manual_seed(0),
                                    device="cuda")
    assert groups.camera_to_world().device.type == "cuda"


def test_orbit_circles_the_origin_from_the_front():
    orbit = C.orbit

    c2w = orbit(12, elevation_deg=15, distance=3.0)
    assert c2w.shape == (12, 4, 4) and c2w.dtype == torch.float32
    eye = c2w[:, :3, 3]
    torch.testing.assert_close(eye.norm(dim=-1), torch.full((12,), 3.0))
    # Looking at the origin: the camera's forward axis (-back) points from the eye to it.
    torch.testing.assert_close(-c2w[:, :3, 2], -eye / 3.0, atol=1e-6, rtol=0)
    torch.testing.assert_close(eye[:, 2], torch.full((12,), 3.0 * math.sin(math.radians(15))))
    # Frame 0 is MVDream's front view (camera on -y); the azimuths are 30 degrees apart.
    assert eye[0, 0].abs() < 1e-5 and eye[0, 1] < 0
    azimuth = torch.rad2deg(torch.atan2(eye[:, 1], eye[:, 0]))
    step = torch.remainder(azimuth.roll(-1) - azimuth, 360.0)
    torch.testing.assert_close(step, torch.full((12,), 30.0), atol=1e-3, rtol=0)
    # the same cameras as the orbit convention's builder at azimuth - 90
    expected = C.orbit_camera_to_world(15.0, torch.arange(12) * 30.0 - 90.0, 3.0)
    torch.testing.assert_close(c2w, expected)


def test_orbit_groups_interleave_the_groups():
    orbit, orbit_groups = C.orbit, C.orbit_groups

    c2w = orbit_groups(8, 4, elevation_deg=10.0, distance=2.0)
    assert c2w.shape == (8, 4, 4)
    torch.testing.assert_close(c2w[:4], orbit(4, 10.0, 2.0))
    torch.testing.assert_close(c2w[4:], orbit(4, 10.0, 2.0, azimuth_start_deg=45.0))
    azimuths = torch.rad2deg(torch.atan2(c2w[:, 1, 3], c2w[:, 0, 3])).round().remainder(360)
    assert len(set(azimuths.tolist())) == 8  # every 45 degrees
    with pytest.raises(ValueError, match="multiple of the group size 4"):
        orbit_groups(6, 4)
