"""Camera conventions: MVDream cameras, orbit cameras, intrinsics, rays and view sampling.

Conventions used everywhere in this project (and tested in ``tests/test_cameras.py``):

* **World**: right-handed, **z up** (the "Blender" world that MVDream's released cameras and
  threestudio both use). The object sits at the origin.
* **Camera axes**: OpenGL. A camera-to-world matrix ``c2w`` (4, 4) has columns
  ``[right, up, back, position]`` with ``back = -forward``: the camera looks down its local
  ``-z`` axis, local ``+x`` is image right and local ``+y`` is image up.
* **Angles**: every public angle is in **degrees** (elevation, azimuth, fovy).
* **Two azimuth conventions** exist, both for the same z-up world:

  - MVDream (``get_camera``): azimuth 0 puts the camera on ``-y`` (looking at the front of
    the object), azimuth 90 puts it on ``+x``.
  - orbit / threestudio (``orbit_camera_to_world``): azimuth 0 puts the camera on ``+x``,
    azimuth 90 on ``+y`` (measured from ``+x`` towards ``+y``).

  They give the same matrix when ``orbit_azimuth = mvdream_azimuth - 90``
  (see ``mvdream_to_orbit_azimuth``).
* **Images**: ``(H, W)``, row 0 at the **top**, column 0 at the **left**; the centre of pixel
  ``(row i, column j)`` is at continuous image coordinates ``(u, v) = (j + 0.5, i + 0.5)``;
  the principal point is the image centre ``(W / 2, H / 2)``; pixels are square, so the
  focal length comes from the vertical field of view and the height.
* **Camera vectors** for the diffusion model: ``c2w`` flattened row-major to 16 numbers
  (bottom row included), shape ``(N, 16)`` float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "CameraGroups",
    "camera_matrices_to_vectors",
    "focal_from_fovy",
    "get_camera",
    "get_rays",
    "intrinsics_from_fovy",
    "look_at",
    "mvdream_to_orbit_azimuth",
    "normalize_camera",
    "orbit",
    "orbit_camera_to_world",
    "orbit_groups",
    "project_points",
    "sample_camera_groups",
    "world_to_camera",
]

Number = float | int
AngleLike = torch.Tensor | Number | Sequence[Number]

# Y-up world (x, y, z) -> z-up world (x, -z, y). A proper rotation (det +1) of the world, so
# left-multiplying a c2w by it turns the whole scene without changing any camera's own axes.
Y_UP_TO_Z_UP = ((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, -1.0, 0.0), (0.0, 1.0, 0.0, 0.0),
                 (0.0, 0.0, 0.0, 1.0))


# ----------------------------------------------------------------------------- validation


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {value!r}")
    return value


def _check_in_open_interval(name: str, values: torch.Tensor, low: float, high: float) -> None:
    # One host sync; cheap next to anything that renders, and worth a clear error.
    if values.numel() and not bool(((values > low) & (values < high)).all()):
        bad = values[~((values > low) & (values < high))].flatten()[0].item()
        raise ValueError(f"{name} must lie in the open interval ({low:g}, {high:g}) degrees, "
                         f"got {bad!r}")


def _work_dtype(device: torch.device) -> torch.dtype:
    # Build matrices in float64 (then round once to float32) so results match float64
    # references such as the official numpy code; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _as_1d(name: str, value: AngleLike, device: torch.device | None = None) -> torch.Tensor:
    # Python numbers become float64 so nothing is rounded before the float64 maths.
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=torch.float64)
    t = t.to(device) if device is not None else t
    if t.ndim > 1:
        raise ValueError(f"{name} must be a scalar or a 1-D tensor of shape (N,), "
                         f"got shape {tuple(t.shape)}")
    return t.reshape(-1)


def _check_c2w(c2w: torch.Tensor) -> None:
    if c2w.ndim != 3 or tuple(c2w.shape[1:]) != (4, 4):
        raise ValueError(f"c2w must have shape (N, 4, 4), got {tuple(c2w.shape)}")


# ----------------------------------------------------------------------------- extrinsics


def look_at(eye: torch.Tensor, up: Sequence[float] | torch.Tensor = (0.0, 0.0, 1.0),
            target: torch.Tensor | None = None) -> torch.Tensor:
    """Camera-to-world matrices of cameras at ``eye`` looking at ``target`` (OpenGL axes).

    Args:
        eye: (N, 3) camera positions in world coordinates.
        up: (3,) world up direction; the camera's up axis is the component of ``up``
            orthogonal to the viewing direction. Must not be parallel to it (the result would
            be NaN).
        target: (N, 3) or (3,) points looked at; default the origin.

    Returns:
        (N, 4, 4) c2w in ``eye``'s dtype, columns ``[right, up, back, eye]``,
        bottom row ``[0, 0, 0, 1]``.
    """
    if eye.ndim != 2 or eye.shape[-1] != 3:
        raise ValueError(f"eye must have shape (N, 3), got {tuple(eye.shape)}")
    up_t = torch.as_tensor(up, dtype=eye.dtype, device=eye.device).expand_as(eye)
    target_t = torch.zeros_like(eye) if target is None else target.to(eye).expand_as(eye)
    forward = torch.nn.functional.normalize(target_t - eye, dim=-1)
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, up_t), dim=-1)
    # Re-orthogonalise up so the rotation is exact even when `up` is not perpendicular.
    cam_up = torch.nn.functional.normalize(torch.linalg.cross(right, forward), dim=-1)
    c2w = torch.zeros(eye.shape[0], 4, 4, dtype=eye.dtype, device=eye.device)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = cam_up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = eye
    c2w[:, 3, 3] = 1.0
    return c2w


def get_camera(num_frames: int, elevation: float = 15, azimuth_start: float = 0,
               azimuth_span: float = 360, blender_coord: bool = True, *,
               device: torch.device | str | None = None) -> torch.Tensor:
    """MVDream's camera vectors for ``num_frames`` views on a circle (official convention).

    Reproduces bytedance/MVDream ``camera_utils.get_camera``: azimuths
    ``azimuth_start + k * azimuth_span / num_frames`` for ``k = 0 .. num_frames - 1``
    (the span's endpoint is excluded, so 4 views over 360 are 0, 90, 180, 270), unit distance.
    In MVDream's y-up world the camera sits at ``(cos e sin a, sin e, cos e cos a)`` looking at
    the origin with world up ``+y``; with ``blender_coord`` the world is then turned z-up by
    ``(x, y, z) -> (x, -z, y)``, which puts azimuth 0 on ``-y`` and azimuth 90 on ``+x``.

    Args:
        num_frames: number of views, >= 1.
        elevation: degrees above the horizontal plane, in (-90, 90).
        azimuth_start: degrees, azimuth of the first view.
        azimuth_span: degrees covered by the views (endpoint excluded).
        blender_coord: return z-up world cameras (True, what the model was trained on) or
            MVDream's y-up world cameras (False).
        device: where the result lives (built on CPU in float64, rounded once to float32).

    Returns:
        (num_frames, 16) float32: each c2w flattened row-major.

    Unlike the official code (``np.arange`` with a float step) this never returns an extra
    view when ``azimuth_span / num_frames`` rounds badly (e.g. 13 views over 120 degrees).
    """
    _check_positive_int("num_frames", num_frames)
    _check_in_open_interval("elevation", torch.tensor([float(elevation)]), -90.0, 90.0)
    dt = torch.float64
    step = azimuth_span / num_frames
    azimuth = torch.deg2rad(azimuth_start + step * torch.arange(num_frames, dtype=dt))
    elev = torch.deg2rad(torch.full((num_frames,), float(elevation), dtype=dt))
    eye_y_up = torch.stack([torch.cos(elev) * torch.sin(azimuth), torch.sin(elev),
                            torch.cos(elev) * torch.cos(azimuth)], dim=-1)
    c2w = look_at(eye_y_up, up=(0.0, 1.0, 0.0))
    if blender_coord:
        c2w = torch.tensor(Y_UP_TO_Z_UP, dtype=dt) @ c2w
    return c2w.reshape(num_frames, 16).to(device=device, dtype=torch.float32)


def normalize_camera(camera: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Move each camera onto the unit sphere: translation divided by (its length + eps).

    MVDream's training cameras all sat at distance 1, so the camera embedding should be fed
    normalised cameras (as MVDream-threestudio does) whatever distance was rendered at.
    The input is not modified.

    Args:
        camera: (N, 4, 4) or (N, 16) c2w matrices (flattened row-major).

    Returns:
        (N, 16) float32.
    """
    if camera.shape[-1] == 16 and camera.ndim == 2:
        mats = camera.reshape(-1, 4, 4)
    else:
        _check_c2w(camera)
        mats = camera
    mats = mats.to(torch.float32).clone()
    t = mats[:, :3, 3]
    mats[:, :3, 3] = t / (torch.linalg.vector_norm(t, dim=-1, keepdim=True) + eps)
    return mats.reshape(-1, 16)


def camera_matrices_to_vectors(c2w: torch.Tensor) -> torch.Tensor:
    """(N, 4, 4) camera-to-world -> (N, 16) float32, flattened row-major (bottom row kept)."""
    _check_c2w(c2w)
    return c2w.to(torch.float32).reshape(c2w.shape[0], 16)


def mvdream_to_orbit_azimuth(azimuth_deg: torch.Tensor | float) -> torch.Tensor | float:
    """MVDream azimuth (``get_camera``) -> orbit/threestudio azimuth of the same camera."""
    return azimuth_deg - 90.0


def orbit_camera_to_world(elevation_deg: AngleLike, azimuth_deg: AngleLike,
                          distance: AngleLike) -> torch.Tensor:
    """threestudio-style orbit cameras looking at the origin of the z-up world.

    The camera sits at ``distance * (cos e cos a, cos e sin a, sin e)`` (azimuth measured from
    ``+x`` towards ``+y``) with world up ``+z``; OpenGL camera axes. The same camera as
    MVDream azimuth ``a + 90`` (``get_camera``) once normalised to distance 1.

    Args:
        elevation_deg: (N,) or scalar, degrees in (-90, 90).
        azimuth_deg: (N,) or scalar, degrees.
        distance: (N,) or scalar, > 0.
        (Inputs broadcast to a common N; tensors set the device.)

    Returns:
        (N, 4, 4) float32 c2w on the inputs' device.
    """
    device = next((x.device for x in (elevation_deg, azimuth_deg, distance)
                   if isinstance(x, torch.Tensor)), torch.device("cpu"))
    dt = _work_dtype(device)
    elev, azim, dist = torch.broadcast_tensors(
        *(_as_1d(n, v, device).to(dt) for n, v in
          (("elevation_deg", elevation_deg), ("azimuth_deg", azimuth_deg),
           ("distance", distance))))
    _check_in_open_interval("elevation_deg", elev, -90.0, 90.0)
    if dist.numel() and not bool((dist > 0).all()):
        raise ValueError(f"distance must be > 0, got {dist.min().item()!r}")
    e, a = torch.deg2rad(elev), torch.deg2rad(azim)
    eye = dist[:, None] * torch.stack(
        [torch.cos(e) * torch.cos(a), torch.cos(e) * torch.sin(a), torch.sin(e)], dim=-1)
    return look_at(eye, up=(0.0, 0.0, 1.0)).to(torch.float32)


def orbit(num_views: int, elevation_deg: float = 15.0, distance: float = 3.0, *,
          azimuth_start_deg: float = 0.0) -> torch.Tensor:
    """A fixed orbit: (V, 4, 4) float32 c2w evenly around the z axis, looking at the origin.

    View ``k`` sits at MVDream azimuth ``azimuth_start_deg + 360 k / V`` (the endpoint is
    excluded, so a turntable has no repeated frame). MVDream azimuth 0 is the front view
    (camera on ``-y``), and the views turn like ``get_camera``'s (towards ``+x``). Every fixed
    orbit of the platform is this one: turntables, the held-out evaluation views, the Janus
    orbit, Tune's objective cameras (:func:`orbit_groups`).
    """
    _check_positive_int("num_views", num_views)
    azimuth = azimuth_start_deg + (360.0 / num_views) * torch.arange(num_views, dtype=torch.float64)
    return orbit_camera_to_world(float(elevation_deg), mvdream_to_orbit_azimuth(azimuth),
                                 float(distance))


def orbit_groups(num_views: int, group_size: int, elevation_deg: float = 15.0,
                 distance: float = 3.0) -> torch.Tensor:
    """(V, 4, 4) c2w: ``V / group_size`` groups, each an :func:`orbit` of ``group_size`` views
    (360 / group_size degrees apart), the groups' start azimuths offset evenly so that all V
    views have distinct azimuths (8 views in 2 groups of 4: every 45 degrees)."""
    _check_positive_int("group_size", group_size)
    if num_views % group_size:
        raise ValueError(f"num_views must be a multiple of the group size {group_size}, "
                         f"got {num_views}")
    groups = num_views // group_size
    return torch.cat([orbit(group_size, elevation_deg, distance,
                            azimuth_start_deg=g * 360.0 / group_size / groups)
                      for g in range(groups)])


def world_to_camera(c2w: torch.Tensor) -> torch.Tensor:
    """Rigid inverse of (N, 4, 4) c2w -> (N, 4, 4) w2c (float32): ``[R^T, -R^T t]``."""
    _check_c2w(c2w)
    c2w = c2w.to(torch.float32)
    rot_t = c2w[:, :3, :3].transpose(1, 2)
    w2c = torch.zeros_like(c2w)
    w2c[:, :3, :3] = rot_t
    w2c[:, :3, 3] = -(rot_t @ c2w[:, :3, 3:]).squeeze(-1)
    w2c[:, 3, 3] = 1.0
    return w2c


# ----------------------------------------------------------------------------- intrinsics


def _fovy_tensor(fovy_deg: AngleLike, device: torch.device | None) -> torch.Tensor:
    fovy = _as_1d("fovy_deg", fovy_deg, device).to(torch.float32)
    _check_in_open_interval("fovy_deg", fovy, 0.0, 180.0)
    return fovy


def focal_from_fovy(fovy_deg: AngleLike, height: int) -> torch.Tensor:
    """Focal length in pixels: ``0.5 * height / tan(fovy / 2)``.

    Args:
        fovy_deg: (N,) or scalar vertical field of view in **degrees**, in (0, 180).
        height: image height in pixels, >= 1.

    Returns:
        (N,) float32 (N = 1 for a scalar).
    """
    _check_positive_int("height", height)
    fovy = _fovy_tensor(fovy_deg, None)
    return 0.5 * height / torch.tan(0.5 * torch.deg2rad(fovy))


def intrinsics_from_fovy(fovy_deg: AngleLike, height: int, width: int) -> torch.Tensor:
    """Pinhole intrinsics ``K = [[f, 0, W/2], [0, f, H/2], [0, 0, 1]]``, square pixels.

    ``K`` follows the usual (OpenCV) meaning: it maps camera coordinates with x right,
    **y down, z forward** to homogeneous pixel coordinates ``(u, v, 1)`` where ``u`` is the
    column and ``v`` the row, continuous, pixel centres at ``+0.5``. Our OpenGL camera
    coordinates become those by negating y and z (``project_points`` does this).

    Args:
        fovy_deg: (N,) or scalar vertical field of view in degrees, in (0, 180).
        height, width: image size in pixels, >= 1.

    Returns:
        (N, 3, 3) float32.
    """
    _check_positive_int("width", width)
    f = focal_from_fovy(fovy_deg, height)
    k = torch.zeros(f.shape[0], 3, 3, dtype=torch.float32, device=f.device)
    k[:, 0, 0] = f
    k[:, 1, 1] = f
    k[:, 0, 2] = 0.5 * width
    k[:, 1, 2] = 0.5 * height
    k[:, 2, 2] = 1.0
    return k


def get_rays(c2w: torch.Tensor, fovy_deg: AngleLike, height: int,
             width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One ray per pixel centre for each camera.

    Pixel ``(row i, column j)`` (row 0 at the top) has camera-space direction
    ``((j + 0.5 - W/2) / f, -(i + 0.5 - H/2) / f, -1)`` (OpenGL: x right, y up, looking
    down -z), ``f = focal_from_fovy(fovy_deg, height)``, rotated into the world by c2w.

    Args:
        c2w: (N, 4, 4) camera-to-world (OpenGL camera axes).
        fovy_deg: (N,) or scalar vertical field of view in **degrees**, in (0, 180).
        height, width: image size in pixels, >= 1.

    Returns:
        origins: (N, H, W, 3) float32, the camera centres.
        directions: (N, H, W, 3) float32, unit length.
    """
    _check_c2w(c2w)
    _check_positive_int("height", height)
    _check_positive_int("width", width)
    c2w = c2w.to(torch.float32)
    fovy = _fovy_tensor(fovy_deg, c2w.device)
    if fovy.shape[0] not in (1, c2w.shape[0]):
        raise ValueError(f"fovy_deg must be a scalar or have shape (N,) = ({c2w.shape[0]},), "
                         f"got {tuple(fovy.shape)}")
    focal = (0.5 * height / torch.tan(0.5 * torch.deg2rad(fovy))).expand(c2w.shape[0])
    dev = c2w.device
    x = (torch.arange(width, dtype=torch.float32, device=dev) + 0.5 - 0.5 * width)
    y = (torch.arange(height, dtype=torch.float32, device=dev) + 0.5 - 0.5 * height)
    f = focal[:, None, None]
    dirs_cam = torch.stack(torch.broadcast_tensors(
        x[None, None, :] / f,
        -y[None, :, None] / f,  # minus: image rows grow downwards, camera y points up
        -torch.ones_like(f)), dim=-1)  # (N, H, W, 3)
    dirs = torch.einsum("nij,nhwj->nhwi", c2w[:, :3, :3], dirs_cam)
    dirs = torch.nn.functional.normalize(dirs, dim=-1)
    origins = c2w[:, None, None, :3, 3].expand_as(dirs).contiguous()
    return origins, dirs


def project_points(points: torch.Tensor, c2w: torch.Tensor, fovy_deg: AngleLike, height: int,
                   width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Project world points into each camera's image.

    Args:
        points: (N, P, 3) world points (or (P, 3), shared by all cameras).
        c2w: (N, 4, 4) camera-to-world (OpenGL camera axes).
        fovy_deg: (N,) or scalar, degrees in (0, 180).
        height, width: image size in pixels, >= 1.

    Returns:
        uv: (N, P, 2) float32 continuous pixel coordinates ``(u = column, v = row)``; the
            pixel containing a point is ``(row floor(v), column floor(u))``.
        depth: (N, P) float32 distance along the viewing axis (> 0 in front of the camera).
    """
    k = intrinsics_from_fovy(fovy_deg, height, width).to(c2w.device)
    w2c = world_to_camera(c2w)
    pts = points.to(torch.float32).expand(c2w.shape[0], -1, -1)
    cam = pts @ w2c[:, :3, :3].transpose(1, 2) + w2c[:, None, :3, 3]
    cam_cv = cam * torch.tensor([1.0, -1.0, -1.0], device=cam.device)  # OpenGL -> OpenCV
    pix = cam_cv @ k.expand(c2w.shape[0], -1, -1).transpose(1, 2)
    depth = cam_cv[..., 2]
    return pix[..., :2] / depth[..., None], depth


# ----------------------------------------------------------------------------- sampling


@dataclass
class CameraGroups:
    """Orbit cameras in groups: N = num_groups * views_per_group, views contiguous per group.

    All fields are (N,) float32; angles in degrees; azimuths in the orbit (threestudio)
    convention, so ``camera_to_world()`` gives the matching (N, 4, 4) c2w.
    """

    elevation_deg: torch.Tensor
    azimuth_deg: torch.Tensor
    fovy_deg: torch.Tensor
    distance: torch.Tensor

    def camera_to_world(self) -> torch.Tensor:
        """(N, 4, 4) float32 c2w of these cameras."""
        return orbit_camera_to_world(self.elevation_deg, self.azimuth_deg, self.distance)


def sample_camera_groups(num_groups: int, views_per_group: int = 4, *,
                         generator: torch.Generator | None = None,
                         elevation_range: tuple[float, float] = (0.0, 30.0),
                         azimuth_range: tuple[float, float] = (-180.0, 180.0),
                         fovy_range: tuple[float, float] = (15.0, 60.0),
                         distance_range: tuple[float, float] = (0.8, 1.0),
                         relative_distance: bool = True,
                         sphere_uniform_prob: float = 0.5,
                         device: torch.device | str | None = None) -> CameraGroups:
    """Random groups of views evenly spaced in azimuth (MVDream-threestudio training cameras).

    Per group: one azimuth offset ``u ~ U[0, 1)``; view ``k`` gets azimuth
    ``a0 + (u + k) / V * (a1 - a0)`` (90 degrees apart for V = 4 over 360). Elevation, fovy
    and distance are drawn once per group and shared by its views. Elevation is uniform in
    degrees, or with probability ``sphere_uniform_prob`` uniform on the sphere (uniform in
    ``sin(elevation)``, i.e. by area); the coin is tossed per group (threestudio tosses it
    once per batch). With ``relative_distance`` the distance is multiplied by
    ``1 / tan(fovy / 2)`` so the object fills a similar part of the frame at every fov.

    Draws happen on the CPU from ``generator`` (same seed -> same cameras on every device).

    Returns:
        CameraGroups with (num_groups * views_per_group,) float32 fields on ``device``.
    """
    _check_positive_int("num_groups", num_groups)
    _check_positive_int("views_per_group", views_per_group)
    if not -90.0 < elevation_range[0] <= elevation_range[1] < 90.0:
        raise ValueError("elevation_range must satisfy -90 < low <= high < 90 degrees, "
                         f"got {elevation_range!r}")
    if not 0.0 < fovy_range[0] <= fovy_range[1] < 180.0:
        raise ValueError(f"fovy_range must satisfy 0 < low <= high < 180 degrees, "
                         f"got {fovy_range!r}")
    if not 0.0 < distance_range[0] <= distance_range[1]:
        raise ValueError(f"distance_range must satisfy 0 < low <= high, got {distance_range!r}")
    if not 0.0 <= sphere_uniform_prob <= 1.0:
        raise ValueError(f"sphere_uniform_prob must be in [0, 1], got {sphere_uniform_prob!r}")

    g, v = num_groups, views_per_group
    # Always draw the same tensors in the same order, whatever the options, so a seed keeps
    # meaning the same cameras.
    u = torch.rand(5, g, generator=generator, dtype=torch.float64)
    u_elev, u_mode, u_azim, u_fovy, u_dist = u

    e0, e1 = elevation_range
    elev_deg = e0 + u_elev * (e1 - e0)
    s0, s1 = math.sin(math.radians(e0)), math.sin(math.radians(e1))
    elev_sphere = torch.rad2deg(torch.asin(s0 + u_elev * (s1 - s0)))
    elevation = torch.where(u_mode < sphere_uniform_prob, elev_sphere, elev_deg)

    a0, a1 = azimuth_range
    k = torch.arange(v, dtype=torch.float64)
    azimuth = a0 + (u_azim[:, None] + k[None, :]) / v * (a1 - a0)  # (G, V)

    fovy = fovy_range[0] + u_fovy * (fovy_range[1] - fovy_range[0])
    distance = distance_range[0] + u_dist * (distance_range[1] - distance_range[0])
    if relative_distance:
        distance = distance / torch.tan(0.5 * torch.deg2rad(fovy))

    def per_view(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(v).to(device=device, dtype=torch.float32)

    return CameraGroups(
        elevation_deg=per_view(elevation),
        azimuth_deg=azimuth.reshape(-1).to(device=device, dtype=torch.float32),
        fovy_deg=per_view(fovy),
        distance=per_view(distance),
    )
