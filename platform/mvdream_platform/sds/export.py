"""Export a distilled 3D object: coloured mesh (GLB/OBJ/PLY), turntable video, multi-view PNG.

The field and the renderer stay out of this module: it only takes callables, in the spirit of
nerfacc's "the library never owns your network".

* ``density_fn(points) -> density``: points (N, 3) float32 world coordinates, densities (N,)
  (or (N, 1)), non-negative, larger inside the object (e.g. a softplus-activated NeRF).
* ``albedo_fn(points) -> rgb``: points (N, 3) float32, colours (N, 3) in [0, 1].

Every writer goes through :mod:`mvdream_platform.storage`, so ``out_uri`` may be a local folder or
any fsspec URI (``memory://`` in tests, ``s3://`` in production); each file appears atomically.

Coordinates: the project's world is z-up (see :mod:`mvdream_platform.cameras`). OBJ and PLY keep
those coordinates unchanged; GLB is rotated to glTF's mandatory +y-up (``(x, y, z) -> (x, z, -y)``)
so that glTF viewers show the object standing upright.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import trimesh

from mvdream_platform import storage

PointsFn = Callable[[torch.Tensor], torch.Tensor]

#: Densities at or below this are "empty space" for the ``"auto"`` threshold rule.
AUTO_THRESHOLD_EPS = 1e-5

MESH_FORMATS = ("glb", "obj", "ply")
VIDEO_FORMATS = ("gif", "mp4")

# z-up world -> glTF y-up: a rotation of -90 degrees about x, (x, y, z) -> (x, z, -y).
Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0, 0.0],
                         [0.0, 0.0, 1.0, 0.0],
                         [0.0, -1.0, 0.0, 0.0],
                         [0.0, 0.0, 0.0, 1.0]])


# ----------------------------------------------------------------------------- mesh extraction


def _grid_axis(radius: float, resolution: int) -> torch.Tensor:
    """(R,) float32 sample positions along one axis: ``linspace(-radius, radius, R)``."""
    return torch.linspace(-radius, radius, resolution, dtype=torch.float32)


def _eval_on_points(fn: PointsFn, points: torch.Tensor, chunk: int, width: int | None,
                    name: str) -> np.ndarray:
    """Call ``fn`` on (N, 3) points in chunks without autograd -> (N,) or (N, width) float32."""
    outs = []
    with torch.no_grad():
        for start in range(0, points.shape[0], chunk):
            pts = points[start:start + chunk]
            out = fn(pts)
            out = torch.as_tensor(out)
            expected = (pts.shape[0],) if width is None else (pts.shape[0], width)
            if width is None and out.shape == (pts.shape[0], 1):
                out = out[:, 0]
            if tuple(out.shape) != expected:
                raise ValueError(f"{name} must map points (N, 3) to shape {expected}, "
                                 f"got {tuple(out.shape)} for N = {pts.shape[0]}")
            outs.append(out.detach().to("cpu", torch.float32).numpy())
    return np.concatenate(outs, axis=0)


def density_grid(density_fn: PointsFn, *, radius: float = 1.0, resolution: int = 128,
                 chunk: int = 65536,
                 device: torch.device | str | None = None) -> np.ndarray:
    """Densities on a regular grid over ``[-radius, radius]^3``.

    Grid point ``[i, j, k]`` is at ``(x_i, y_j, z_k)`` with ``x_i = -radius + i * h`` and voxel
    size ``h = 2 * radius / (resolution - 1)`` (the grid includes both faces of the box).
    Points are built per chunk on ``device`` so that a 256^3 grid never holds all its
    (R^3, 3) coordinates at once.

    Returns:
        (R, R, R) float32 numpy array. ``+inf`` / ``-inf`` are clamped to the largest /
        smallest finite value (an ``exp`` activation can overflow); NaN raises ``ValueError``.
    """
    if not isinstance(resolution, int) or resolution < 2:
        raise ValueError(f"resolution must be an int >= 2, got {resolution!r}")
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius!r}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    r = resolution
    axis = _grid_axis(radius, r).to(device)
    total = r ** 3
    out = np.empty(total, dtype=np.float32)
    with torch.no_grad():
        for start in range(0, total, chunk):
            idx = torch.arange(start, min(start + chunk, total), device=axis.device)
            # Flat index -> (i, j, k) in C order, matching out.reshape(r, r, r)[i, j, k].
            pts = torch.stack([axis[idx // (r * r)], axis[(idx // r) % r], axis[idx % r]], -1)
            out[start:start + idx.shape[0]] = _eval_on_points(
                density_fn, pts, chunk, None, "density_fn")
    if np.isnan(out).any():
        raise ValueError(f"density_fn returned NaN at {int(np.isnan(out).sum())} of "
                         f"{total} grid points")
    if np.isinf(out).any():
        finite = out[np.isfinite(out)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        out = np.nan_to_num(out, posinf=high, neginf=low)
    return out.reshape(r, r, r)


def auto_threshold(density: np.ndarray, eps: float = AUTO_THRESHOLD_EPS) -> float:
    """The ``"auto"`` isosurface level: the mean density over grid points denser than ``eps``.

    This is threestudio's ``isosurface_threshold: auto`` rule. Why it works for the softplus
    densities SDS produces: empty space sits near zero (the blob bias pushes it to ~1e-4 at the
    box edge) while the object's inside reaches densities of 10-100, so the mean of the
    non-empty points lands on the steep density ramp at the object's skin. It excludes the
    exactly-empty space (< ``eps``), so padding the box with vacuum barely moves it; it does
    depend on how much faint fog surrounds the object, and for ``softplus(k * sdf)``-like fields
    it sits slightly *outside* the level ``softplus(0) = ln 2`` (which is the zero of the sdf).
    Pass an explicit threshold when the exact level matters.

    Args:
        density: any-shaped array of densities.

    Returns:
        The threshold (a float); NaN when no point exceeds ``eps``.
    """
    dense = density[density > eps]
    return float(dense.mean(dtype=np.float64)) if dense.size else float("nan")


def extract_mesh(density_fn: PointsFn, albedo_fn: PointsFn | None, *, radius: float = 1.0,
                 resolution: int = 128, threshold: float | Literal["auto"] = "auto",
                 chunk: int = 65536,
                 device: torch.device | str | None = None) -> trimesh.Trimesh:
    """Marching cubes on a density field, coloured per vertex by an albedo field.

    Steps: densities on an R^3 grid over ``[-radius, radius]^3`` (see :func:`density_grid`);
    the isosurface ``density == threshold`` by ``skimage.measure.marching_cubes``; vertices
    mapped from grid indices back to world coordinates (``-radius + index * h``); faces wound
    counter-clockwise seen from outside (normals point from dense to empty, i.e. outward);
    ``albedo_fn`` evaluated at the vertices, stored as RGBA uint8 vertex colours (alpha 255).

    A dense region touching the box is closed by the box face (the grid is padded with
    vacuum), so the mesh stays watertight; its vertices are clipped into the box.

    Args:
        density_fn: points (N, 3) float32 -> densities (N,) (or (N, 1)); called under
            ``torch.no_grad`` with at most ``chunk`` points per call, on ``device``.
        albedo_fn: points (N, 3) float32 -> colours (N, 3) in [0, 1] (clamped), or None for an
            uncoloured mesh.
        radius: half-size of the cube that is sampled, in world units.
        resolution: grid points per axis, >= 2 (voxel size ``2 * radius / (resolution - 1)``).
        threshold: density of the surface, or ``"auto"`` (:func:`auto_threshold`: the mean
            density over grid points denser than 1e-5, threestudio's rule).
        chunk: points per call to ``density_fn`` / ``albedo_fn``.
        device: where the query points are built (the field's device); default CPU.

    Returns:
        ``trimesh.Trimesh`` with V vertices (V, 3) float64 world coordinates (z-up), faces
        (F, 3) int64, ``visual.vertex_colors`` (V, 4) uint8, and ``metadata`` holding
        ``threshold`` (the level used), ``density_range`` (min, max), ``resolution`` and
        ``radius``.

    Raises:
        ValueError: the density never crosses the threshold (nothing, or everything, in the
            box is denser than it), naming the threshold and the density range; bad arguments.
    """
    import skimage.measure

    density = density_grid(density_fn, radius=radius, resolution=resolution, chunk=chunk,
                           device=device)
    lo, hi = float(density.min()), float(density.max())
    if isinstance(threshold, str):
        if threshold != "auto":
            raise ValueError(f"threshold must be a number or 'auto', got {threshold!r}")
        level = auto_threshold(density)
        rule = f"auto threshold {level:.6g} (mean density above {AUTO_THRESHOLD_EPS:g})"
    else:
        level = float(threshold)
        rule = f"threshold {level:.6g}"
    if not (math.isfinite(level) and lo < level < hi):
        raise ValueError(
            f"empty mesh: the density never crosses the {rule}; on the {resolution}^3 grid over "
            f"[-{radius}, {radius}]^3 the density ranges over [{lo:.6g}, {hi:.6g}] "
            "(pass a threshold strictly inside that range)")

    # Pad with one layer of vacuum far below the level: surfaces cut by the box get closed,
    # and because the pad value is huge the closing vertices sit on the box face itself
    # (marching cubes interpolates at t = (level - inside) / (pad - inside) ~ 0).
    field = density.astype(np.float64) - level  # > 0 inside
    pad = -1e6 * max(1.0, float(np.abs(field).max()))
    field = np.pad(field, 1, mode="constant", constant_values=pad)
    # "ascent": our field grows towards the inside; with it skimage winds faces so that their
    # normals point outward (checked by the positive signed volume in the tests).
    verts, faces, _, _ = skimage.measure.marching_cubes(field, level=0.0,
                                                        gradient_direction="ascent")
    h = 2.0 * radius / (resolution - 1)
    verts = np.clip((verts - 1.0) * h - radius, -radius, radius)  # undo the pad, index -> world
    # process=False: skimage already shares vertices between faces; merging by tolerance could
    # collapse the tiny triangles marching cubes makes near grid points into degenerate ones.
    mesh = trimesh.Trimesh(vertices=verts, faces=faces.astype(np.int64), process=False)
    if albedo_fn is not None:
        pts = torch.as_tensor(verts, dtype=torch.float32, device=device)
        rgb = _eval_on_points(albedo_fn, pts, chunk, 3, "albedo_fn")
        rgba = np.empty((len(verts), 4), dtype=np.uint8)
        rgba[:, :3] = np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
        rgba[:, 3] = 255
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=rgba)
    mesh.metadata.update(threshold=level, density_range=(lo, hi), resolution=resolution,
                         radius=float(radius))
    return mesh


# ----------------------------------------------------------------------------- mesh files


def write_mesh(mesh: trimesh.Trimesh, out_uri: str | os.PathLike, stem: str = "mesh",
               formats: Sequence[str] = MESH_FORMATS) -> dict[str, str]:
    """Write ``mesh`` as ``<out_uri>/<stem>.<fmt>`` for each format; vertex colours included.

    * ``ply``: binary PLY with per-vertex RGBA (z-up world coordinates).
    * ``obj``: ``v x y z r g b`` lines (colours as floats in [0, 1], the common OBJ extension
      that trimesh, MeshLab and Blender read); no normals, no material file (z-up).
    * ``glb``: binary glTF with a ``COLOR_0`` vertex attribute, rotated to glTF's +y-up.

    Each file is serialised in memory by trimesh and written atomically by
    :func:`mvdream_platform.storage.write_bytes`, so ``out_uri`` may be any fsspec URI.

    Returns:
        ``{format: uri}`` in the order of ``formats``.
    """
    bad = [f for f in formats if f not in MESH_FORMATS]
    if bad:
        raise ValueError(f"formats must be among {MESH_FORMATS}, got {list(formats)!r}")
    uris = {}
    for fmt in formats:
        if fmt == "glb":
            m = mesh.copy()
            m.apply_transform(Z_UP_TO_Y_UP)
            data = m.export(file_type="glb")
        elif fmt == "obj":
            data = mesh.export(file_type="obj", include_normals=False, include_color=True,
                               include_texture=False)
        else:
            data = mesh.export(file_type="ply", encoding="binary")
        uri = storage.join(out_uri, f"{stem}.{fmt}")
        storage.write_bytes(uri, data.encode() if isinstance(data, str) else data)
        uris[fmt] = uri
    return uris


# ----------------------------------------------------------------------------- turntable


def _check_frames(frames, name: str) -> np.ndarray:
    """(T, H, W, 3) uint8 array (numpy or torch) -> contiguous numpy, else ValueError."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape) < 1:
        raise ValueError(f"{name} must have shape (T, H, W, 3) with T, H, W >= 1, "
                         f"got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 (0..255), got dtype {frames.dtype}")
    return np.ascontiguousarray(frames)


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, C) -> (T, H + H % 2, W + W % 2, C), repeating the last row / column.

    H.264 in yuv420p (the pixel format every player accepts) stores colour at half resolution
    and needs even sizes. Padding by one repeated edge pixel keeps every rendered pixel exact
    and the aspect ratio unchanged, where resizing would blur a 32x32 render.
    """
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if not (pad_h or pad_w):
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def write_turntable(frames, out_uri: str | os.PathLike, stem: str = "turntable",
                    fps: float = 30.0,
                    formats: Sequence[str] = VIDEO_FORMATS) -> dict[str, str]:
    """Write a turntable as ``<out_uri>/<stem>.gif`` (looping) and ``<stem>.mp4`` (H.264).

    * GIF: Pillow via imageio, looping forever, one frame every ``1000 / fps`` ms (GIF stores
      hundredths of a second, so the delay is rounded to 10 ms). Pillow merges consecutive
      frames that are pixel-identical into one longer frame.
    * MP4: ffmpeg (the ``imageio-ffmpeg`` wheel) with libx264, yuv420p; odd sizes are padded
      to even ones by :func:`pad_to_even` (never resized).

    Encoders write to a local temporary file, whose bytes are then written atomically by
    :func:`mvdream_platform.storage.write_bytes` (ffmpeg cannot write to an fsspec URI).

    Args:
        frames: (T, H, W, 3) uint8 RGB.
        fps: frames per second, > 0.

    Returns:
        ``{format: uri}``.
    """
    import imageio.v2 as imageio_v2
    import imageio.v3 as iio

    frames = _check_frames(frames, "frames")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    bad = [f for f in formats if f not in VIDEO_FORMATS]
    if bad:
        raise ValueError(f"formats must be among {VIDEO_FORMATS}, got {list(formats)!r}")
    uris = {}
    with tempfile.TemporaryDirectory(prefix="mvdream-turntable-") as tmp:
        for fmt in formats:
            path = os.path.join(tmp, f"{stem}.{fmt}")
            if fmt == "gif":
                iio.imwrite(path, frames, plugin="pillow", duration=1000.0 / fps, loop=0)
            else:
                # macro_block_size=1: otherwise imageio resizes to a multiple of 16 itself.
                with imageio_v2.get_writer(path, format="FFMPEG", mode="I", fps=fps,
                                           codec="libx264", pixelformat="yuv420p",
                                           macro_block_size=1) as writer:
                    for frame in pad_to_even(frames):
                        writer.append_data(frame)
            with open(path, "rb") as f:
                data = f.read()
            uri = storage.join(out_uri, f"{stem}.{fmt}")
            storage.write_bytes(uri, data)
            uris[fmt] = uri
    return uris


def write_multiview_png(views, out_uri: str | os.PathLike, name: str) -> str:
    """Write F views side by side, in order, as one PNG ``<out_uri>/<name>.png``.

    Args:
        views: (F, H, W, 3) uint8 RGB (e.g. 4 views 90 degrees apart).
        name: file name; ``.png`` is appended unless already there.

    Returns:
        The URI written; the image is (H, F * W, 3).
    """
    views = _check_frames(views, "views")
    row = np.concatenate(list(views), axis=1)  # (H, F*W, 3)
    uri = storage.join(out_uri, name if name.endswith(".png") else f"{name}.png")
    storage.write_bytes(uri, storage.encode_png(row))
    return uri
