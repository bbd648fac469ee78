"""CPU mesh renderer: any mesh trimesh loads -> RGBA views at the cameras of ``cameras.py``.

Ray casting is Embree's (``trimesh.ray.ray_pyembree.RayMeshIntersector`` over ``embreex``):
one ``intersects_first`` call per chunk of views gives the first triangle hit by every pixel's
ray; barycentric coordinates come from a vectorised Moller-Trumbore step on the hits only, and
shading is vectorised numpy. No Python loop runs per pixel or per view.

Conventions (those of ``mvdream_platform.cameras``: z-up world, OpenGL camera axes, degrees):

* **Rays**: ``cameras.get_rays`` (one ray through each pixel centre, row 0 at the top), so a
  vertex projected with ``cameras.project_points`` lands on its own rendered pixel.
* **Output**: ``(N, H, W, 4)`` uint8 RGBA, **straight** (not premultiplied) alpha: 255 where a
  ray hits the mesh, 0 elsewhere (RGB 0 there too); with ``antialias=s`` each pixel averages
  ``s x s`` sub-pixel rays, so silhouette pixels get fractional alpha and the RGB is the mean
  colour of the covered sub-pixels.
* **Colour** (albedo, in the file's sRGB values; no linearisation): texture (``TextureVisuals``
  with UVs: ``baseColorTexture`` x ``baseColorFactor`` for glTF PBR materials, ``image`` for
  OBJ/MTL materials, whose ``Kd`` is ignored when a texture exists, as trimesh does), vertex
  colours (barycentric), face colours, else the material colour, else ``DEFAULT_GREY``.
  Texture alpha is ignored (every hit is opaque).
* **UVs** follow trimesh's ``TextureVisuals`` convention: ``(0, 0)`` is the **bottom-left** of
  the image (trimesh already flips glTF's top-left ``v`` on load; OBJ is bottom-left by spec),
  so texel row ``= (1 - v) * height``. UVs wrap (``REPEAT``, glTF's default sampler; trimesh
  keeps no sampler), and lookup is bilinear (default) or nearest.
* **Lighting**: ``ambient + diffuse * max(0, n . l)`` times the albedo, clipped to 1, with
  smooth normals inside creases below ``crease_angle_deg`` and flat ones across sharper edges;
  two-sided (a back face is lit as seen from the camera). The default light comes from the
  camera's upper left (a camera-frame direction, so every view is lit alike);
  ``random_light`` draws a world-frame direction, shared by the views of one object.
* **Normalisation**: ``load_mesh`` turns the file's up axis into +z (glTF/GLB: y-up by
  spec; OBJ: y-up by common convention; STL, PLY, OFF: assumed z-up; ``up_axis="y"|"z"``
  overrides), ``normalize_mesh`` centres the bounding box on the origin and scales the
  farthest vertex to distance 1, so a camera at ``distance_to_fit(fovy)`` frames it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import torch
import trimesh

# The y-up -> z-up world turn MVDream's cameras use ((x, y, z) -> (x, -z, y)), shared so that
# meshes and cameras can never disagree about it.
from ..cameras import Y_UP_TO_Z_UP, get_rays

__all__ = [
    "DEFAULT_GREY",
    "Light",
    "PreparedMesh",
    "distance_to_fit",
    "load_mesh",
    "load_normalized_mesh",
    "normalize_mesh",
    "prepare_mesh",
    "random_light",
    "render_views",
    "supported_file_types",
]

DEFAULT_GREY = (180, 180, 180)  # uint8 RGB of meshes without colours
UP_AXES = ("auto", "y", "z")
TEXTURE_FILTERS = ("bilinear", "nearest")
LIGHT_FRAMES = ("camera", "world")
# glTF is y-up by its specification; OBJ has no rule but Blender, Maya and most exporters
# write y-up. Everything else (STL, PLY, OFF) comes mostly from CAD/scanning tools: z-up.
_Y_UP_FILE_TYPES = ("glb", "gltf", "obj")
_Y_TO_Z = np.asarray(Y_UP_TO_Z_UP, dtype=np.float64)[:3, :3]
# Rays per intersect call: large enough to amortise the per-call overhead over many views
# (256 views at 64x64), small enough to keep the float arrays of a chunk around 100 MB.
_MAX_RAYS_PER_CHUNK = 1 << 20

# ----------------------------------------------------------------------------- validation


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {value!r}")
    return int(value)


def _check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value  # type: ignore[return-value]


def _resolution_hw(resolution: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(resolution, (int, np.integer)) and not isinstance(resolution, bool):
        side = _check_positive_int("resolution", resolution)
        return side, side
    if isinstance(resolution, Sequence) and len(resolution) == 2:
        return (_check_positive_int("resolution (height)", resolution[0]),
                _check_positive_int("resolution (width)", resolution[1]))
    raise ValueError(f"resolution must be a positive int or (height, width), got {resolution!r}")


def _normalize_rows(v: np.ndarray) -> np.ndarray:
    """(..., 3) -> unit rows; zero rows stay zero (degenerate triangles shade as ambient)."""
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(norm, 1e-20)


# ----------------------------------------------------------------------------- loading


def supported_file_types() -> tuple[str, ...]:
    """Mesh file types ``load_mesh`` accepts: trimesh's mesh formats that can hold triangles."""
    from trimesh.exchange.load import mesh_formats

    return tuple(sorted(set(mesh_formats()) - {"xyz"}))  # xyz is a point cloud


def _file_type_of(path_or_file: str | os.PathLike | BinaryIO, file_type: str | None) -> str:
    if file_type is None:
        if not isinstance(path_or_file, (str, os.PathLike)):
            raise ValueError("file_type is required when loading from a file object "
                             f"(one of {', '.join(supported_file_types())})")
        file_type = os.path.splitext(os.fspath(path_or_file))[1].lstrip(".")
    file_type = file_type.lower().lstrip(".")
    allowed = supported_file_types()
    if file_type not in allowed:
        raise ValueError(f"file_type must be one of {', '.join(allowed)}, got {file_type!r}")
    return file_type


def _source_up_axis(file_type: str, up_axis: str) -> str:
    _check_choice("up_axis", up_axis, UP_AXES)
    if up_axis != "auto":
        return up_axis
    return "y" if file_type in _Y_UP_FILE_TYPES else "z"


def _scene_meshes(scene: trimesh.Scene) -> list[trimesh.Trimesh]:
    """Every triangle mesh instance of a scene with its node transform baked in.

    ``Scene.dump`` keeps each geometry's own visual (texture, UVs, colours), which is exact;
    concatenating first would repack textures into one atlas (resampled).
    """
    return [g for g in scene.dump() if isinstance(g, trimesh.Trimesh) and len(g.faces) > 0]


def load_mesh(path_or_file: str | os.PathLike | BinaryIO, file_type: str | None = None,
              up_axis: str = "auto") -> trimesh.Trimesh | list[trimesh.Trimesh]:
    """Load a mesh file into the z-up world, with its colours/textures, not yet normalised.

    Up axis (``up_axis="auto"``): glTF/GLB are y-up by specification and OBJ y-up by common
    convention, so they are turned z-up by ``(x, y, z) -> (x, -z, y)`` (a glTF model's front,
    +z, then faces -y: MVDream's azimuth-0 camera); STL, PLY and OFF are taken as z-up as
    they are. ``up_axis="y"`` or ``"z"`` states the file's up axis instead. The rotation is
    kept in ``mesh.metadata["up_rotation"]`` ((3, 3) list) for ``normalize_mesh``.

    Args:
        path_or_file: a local path, or a binary file object (then ``file_type`` is required;
            OBJ textures are found only through a path).
        file_type: one of ``supported_file_types()``; default: the path's extension.
        up_axis: ``"auto"``, ``"y"`` or ``"z"``.

    Returns:
        One ``trimesh.Trimesh``, or a list of them when the file is a scene of several meshes
        (node transforms applied, each mesh keeping its own visual).

    Raises:
        ValueError: unknown ``file_type`` or ``up_axis``, or a file without triangles.
    """
    file_type = _file_type_of(path_or_file, file_type)
    source_up = _source_up_axis(file_type, up_axis)
    source = os.fspath(path_or_file) if isinstance(path_or_file, os.PathLike) else path_or_file
    meshes = _scene_meshes(trimesh.load_scene(source, file_type=file_type))
    if not meshes:
        raise ValueError(f"mesh file {path_or_file!r} (file_type={file_type!r}) contains no "
                         "triangles")
    rotation = _Y_TO_Z if source_up == "y" else np.eye(3)
    transform = np.eye(4)
    transform[:3, :3] = rotation
    for mesh in meshes:
        if source_up == "y":
            mesh.apply_transform(transform)
        mesh.metadata["up_axis"] = source_up
        mesh.metadata["up_rotation"] = rotation.tolist()
    return meshes[0] if len(meshes) == 1 else meshes


def normalize_mesh(mesh: trimesh.Trimesh | Sequence[trimesh.Trimesh]
                   ) -> tuple[trimesh.Trimesh | list[trimesh.Trimesh], dict[str, Any]]:
    """Centre the bounding box on the origin and scale the farthest vertex to distance 1.

    A list (a scene's meshes) is normalised as one object. The input is not modified.

    Returns:
        mesh: normalised copy (same kind as the input: one mesh or a list).
        info: JSON-ready dict: ``scale`` (float), ``offset`` (3,), ``rotation`` (3, 3) (the
            up-axis turn ``load_mesh`` applied, identity if none), ``up_axis`` (the file's,
            ``"y"``/``"z"``, or None if unknown) and ``matrix`` (4, 4), with
            ``x_normalised = scale * (rotation @ x_file + offset)`` = ``matrix @ [x_file, 1]``.

    Raises:
        ValueError: no vertices or faces, or every vertex at one point.
    """
    meshes = [mesh] if isinstance(mesh, trimesh.Trimesh) else list(mesh)
    if not meshes or any(not isinstance(m, trimesh.Trimesh) for m in meshes):
        raise ValueError("mesh must be a trimesh.Trimesh or a non-empty list of them")
    if sum(len(m.faces) for m in meshes) == 0 or sum(len(m.vertices) for m in meshes) == 0:
        raise ValueError("mesh is empty (no vertices or faces): nothing to normalise")
    vertices = np.concatenate([np.asarray(m.vertices, dtype=np.float64) for m in meshes])
    centre = 0.5 * (vertices.min(axis=0) + vertices.max(axis=0))
    radius = float(np.linalg.norm(vertices - centre, axis=1).max())
    if not radius > 0:
        raise ValueError("mesh is degenerate: all its vertices are at one point")
    scale = 1.0 / radius
    step = np.eye(4)
    step[:3, :3] *= scale
    step[:3, 3] = -scale * centre
    out = []
    for m in meshes:
        copy = m.copy()
        copy.apply_transform(step)
        out.append(copy)
    rotation = np.asarray(meshes[0].metadata.get("up_rotation", np.eye(3)), dtype=np.float64)
    matrix = step.copy()
    matrix[:3, :3] = scale * rotation
    info = {"scale": scale, "offset": (-centre).tolist(), "rotation": rotation.tolist(),
            "up_axis": meshes[0].metadata.get("up_axis"), "matrix": matrix.tolist()}
    return (out[0] if isinstance(mesh, trimesh.Trimesh) else out), info


def load_normalized_mesh(path_or_file: str | os.PathLike | BinaryIO, file_type: str | None = None,
                         up_axis: str = "auto"
                         ) -> tuple[trimesh.Trimesh | list[trimesh.Trimesh], dict[str, Any]]:
    """``normalize_mesh(load_mesh(...))``: z-up, centred, inside the unit sphere."""
    return normalize_mesh(load_mesh(path_or_file, file_type=file_type, up_axis=up_axis))


def distance_to_fit(fovy_deg: float | np.ndarray | torch.Tensor, margin: float = 1.0):
    """Camera distance at which the unit sphere just fills the vertical field of view.

    The sphere's tangent cone from distance ``d`` has half-angle ``asin(1 / d)``; setting it to
    ``fovy / 2`` gives ``d = 1 / sin(fovy / 2)``, times ``margin`` (> 1 leaves room around).

    Args:
        fovy_deg: scalar, (N,) numpy array or tensor, degrees in (0, 180).
        margin: > 0.

    Returns:
        Same kind as ``fovy_deg`` (a float for a Python number).
    """
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin!r}")
    values = fovy_deg.detach().cpu().numpy() if isinstance(fovy_deg, torch.Tensor) else fovy_deg
    if not np.all((np.asarray(values) > 0) & (np.asarray(values) < 180)):
        raise ValueError(f"fovy_deg must lie in the open interval (0, 180) degrees, got {fovy_deg!r}")
    if isinstance(fovy_deg, torch.Tensor):
        return margin / torch.sin(0.5 * torch.deg2rad(fovy_deg))
    if isinstance(fovy_deg, np.ndarray):
        return margin / np.sin(0.5 * np.deg2rad(fovy_deg))
    return margin / math.sin(0.5 * math.radians(float(fovy_deg)))


# ----------------------------------------------------------------------------- lighting


@dataclass(frozen=True)
class Light:
    """Ambient + Lambertian directional light.

    Attributes:
        ambient: weight of the unshaded albedo.
        diffuse: weight of ``max(0, n . l)`` times the albedo.
        direction: (3,) or (N, 3) direction **towards** the light (normalised when used).
        frame: ``"camera"``: ``direction`` in each camera's OpenGL axes (x right, y up,
            z towards the viewer), so the light moves with the camera; ``"world"``: in the
            z-up world, fixed for all views.
    """

    ambient: float = 0.35
    diffuse: float = 0.65
    direction: Any = (-0.5, 0.5, 1.0)  # from the camera's upper left, in front of the object
    frame: str = "camera"

    def __post_init__(self) -> None:
        _check_choice("light.frame", self.frame, LIGHT_FRAMES)
        if not (self.ambient >= 0 and self.diffuse >= 0):
            raise ValueError(f"light.ambient and light.diffuse must be >= 0, got "
                             f"{self.ambient!r}, {self.diffuse!r}")

    def world_directions(self, c2w: np.ndarray) -> np.ndarray:
        """(N, 4, 4) c2w -> (N, 3) unit directions towards the light, world frame."""
        n = c2w.shape[0]
        d = np.asarray(self.direction, dtype=np.float64)
        if d.shape not in ((3,), (n, 3)):
            raise ValueError(f"light.direction must have shape (3,) or (N, 3) = ({n}, 3), "
                             f"got {d.shape}")
        d = np.broadcast_to(d, (n, 3))
        if not np.all(np.linalg.norm(d, axis=-1) > 0):
            raise ValueError("light.direction must be non-zero")
        if self.frame == "camera":
            d = np.einsum("nij,nj->ni", c2w[:, :3, :3], d)
        return _normalize_rows(d)


def _uniform(generator: Any, count: int) -> np.ndarray:
    """``count`` uniforms in [0, 1) from a seed, numpy Generator or torch Generator."""
    if isinstance(generator, torch.Generator):
        return torch.rand(count, generator=generator, dtype=torch.float64).numpy()
    if isinstance(generator, np.random.Generator):
        return generator.random(count)
    if generator is None or isinstance(generator, (int, np.integer)):
        return np.random.default_rng(generator).random(count)
    raise ValueError("generator must be None, an int seed, a numpy Generator or a torch "
                     f"Generator, got {type(generator).__name__}")


def random_light(generator: int | np.random.Generator | torch.Generator | None = None, *,
                 elevation_deg: tuple[float, float] = (15.0, 75.0), ambient: float = 0.35,
                 diffuse: float = 0.65) -> Light:
    """A world-frame light from a random direction above the horizon (deterministic per seed).

    One direction per call, so all views of an object see the same light (multi-view
    consistent, as an environment map would be): azimuth uniform in [0, 360), elevation
    uniform in ``elevation_deg``. Same generator state -> same light.
    """
    if not -90.0 <= elevation_deg[0] <= elevation_deg[1] <= 90.0:
        raise ValueError(f"elevation_deg must satisfy -90 <= low <= high <= 90, got {elevation_deg!r}")
    u_azimuth, u_elevation = _uniform(generator, 2)
    azimuth = 2.0 * math.pi * u_azimuth
    elevation = math.radians(elevation_deg[0] + u_elevation * (elevation_deg[1] - elevation_deg[0]))
    direction = (math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth),
                 math.sin(elevation))
    return Light(ambient=ambient, diffuse=diffuse, direction=direction, frame="world")


# ----------------------------------------------------------------------------- preparation


@dataclass
class _Texture:
    """One texture for faces ``[start, stop)`` of the prepared mesh."""

    start: int
    stop: int
    image: np.ndarray  # (h, w, 3) uint8, row 0 at the top of the image


@dataclass
class PreparedMesh:
    """Everything rendering needs, built once per mesh and reused for any number of views.

    Attributes (F = faces of all parts):
        v0, e1, e2: (F, 3) float32 first vertex and the two edges of every triangle.
        corner_normals: (F, 3, 3) float32 unit shading normals at the triangle corners.
        corner_colors: (F, 3, 3) float32 RGB in [0, 1]: the albedo, or for textured faces
            the factor the texture is multiplied by.
        corner_uv: (F, 3, 2) float32 UVs (zeros on untextured faces).
        textures: the textured face ranges and their images.
        intersector: the Embree ray intersector of all faces.
    """

    v0: np.ndarray
    e1: np.ndarray
    e2: np.ndarray
    corner_normals: np.ndarray
    corner_colors: np.ndarray
    corner_uv: np.ndarray
    textures: list[_Texture] = field(default_factory=list)
    intersector: Any = None

    @property
    def num_faces(self) -> int:
        return int(self.v0.shape[0])


def _corner_normals(vertices: np.ndarray, faces: np.ndarray, crease_angle_deg: float
                    ) -> np.ndarray:
    """(F, 3, 3) shading normals: smooth where faces meet at less than the crease angle.

    Vertices at the same position are merged first, so UV seams (split vertices) do not show
    as shading seams; the average weights face normals by area.
    """
    tri = vertices[faces]
    area_normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2 area
    face_normals = _normalize_rows(area_normals)
    _, position_id = np.unique(vertices, axis=0, return_inverse=True)
    corner_position = position_id.reshape(-1)[faces]  # (F, 3)
    count = int(corner_position.max()) + 1
    sums = np.stack([np.bincount(corner_position.ravel(), np.repeat(area_normals[:, k], 3),
                                 minlength=count) for k in range(3)], axis=-1)
    smooth = _normalize_rows(sums)[corner_position]  # (F, 3, 3)
    cosine = np.einsum("fkc,fc->fk", smooth, face_normals)
    sharp = cosine < math.cos(math.radians(crease_angle_deg))
    corner = np.where(sharp[..., None], face_normals[:, None, :], smooth)
    return corner.astype(np.float32)


def _material_texture(material: Any) -> tuple[Any, np.ndarray]:
    """(PIL image or None, (3,) float RGB factor) of a trimesh material."""
    image = getattr(material, "baseColorTexture", None)
    if image is None:
        image = getattr(material, "image", None)
    if hasattr(material, "baseColorFactor"):  # glTF PBR: multiplies the texture; unset = white
        factor = material.baseColorFactor
    elif image is None:  # OBJ Kd (ignored beside a texture, as trimesh does), other materials
        factor = getattr(material, "diffuse", None)
        factor = getattr(material, "main_color", None) if factor is None else factor
    else:
        factor = None
    rgb = np.ones(3) if factor is None else np.asarray(factor, dtype=np.float64)[:3] / 255.0
    return image, rgb


def _part_colors(mesh: trimesh.Trimesh) -> tuple[np.ndarray, np.ndarray | None, Any]:
    """Colours of one mesh: ((F, 3, 3) corner RGB, (F, 3, 2) corner UV or None, image)."""
    faces = np.asarray(mesh.faces, dtype=np.int64)
    visual = mesh.visual
    if isinstance(visual, trimesh.visual.TextureVisuals):
        image, factor = _material_texture(visual.material)
        colors = np.broadcast_to(factor.astype(np.float32), (len(faces), 3, 3))
        uv = visual.uv
        if image is not None and uv is not None and len(uv) == len(mesh.vertices):
            return colors, np.asarray(uv, dtype=np.float32)[faces], image
        return colors, None, None
    kind = getattr(visual, "kind", None)
    if kind == "vertex":
        rgb = np.asarray(visual.vertex_colors, dtype=np.float32)[:, :3] / 255.0
        return rgb[faces], None, None
    if kind == "face":
        rgb = np.asarray(visual.face_colors, dtype=np.float32)[:, :3] / 255.0
        return np.repeat(rgb[:, None, :], 3, axis=1), None, None
    grey = np.asarray(DEFAULT_GREY, dtype=np.float32) / 255.0
    return np.broadcast_to(grey, (len(faces), 3, 3)), None, None


def _as_meshes(mesh: Any) -> list[trimesh.Trimesh]:
    if isinstance(mesh, trimesh.Trimesh):
        meshes = [mesh]
    elif isinstance(mesh, trimesh.Scene):
        meshes = _scene_meshes(mesh)
    elif isinstance(mesh, Sequence) and all(isinstance(m, trimesh.Trimesh) for m in mesh):
        meshes = list(mesh)
    else:
        raise ValueError("mesh must be a trimesh.Trimesh, a trimesh.Scene, a list of "
                         f"trimesh.Trimesh or a PreparedMesh, got {type(mesh).__name__}")
    meshes = [m for m in meshes if len(m.faces) > 0]
    if not meshes:
        raise ValueError("mesh is empty (no faces): nothing to render")
    return meshes


def _embree_intersector(vertices: np.ndarray, faces: np.ndarray) -> Any:
    if not trimesh.ray.has_embree:
        raise ImportError("the mesh renderer needs Embree ray casting: pip install embreex")
    from trimesh.ray.ray_pyembree import RayMeshIntersector

    geometry = trimesh.Trimesh(vertices=vertices, faces=faces, process=False)
    intersector = RayMeshIntersector(geometry)
    # Embree builds its BVH lazily on the first query: build it now, once, so that threads
    # rendering chunks in parallel never race to build it.
    intersector.intersects_first(np.zeros((1, 3)), np.array([[0.0, 0.0, 1.0]]))
    return intersector


def prepare_mesh(mesh: Any, crease_angle_deg: float = 45.0) -> PreparedMesh:
    """Flatten a mesh, scene or list of meshes into one ray-castable, shadable structure.

    Each part keeps its own visual (textures stay exact; no atlas repacking); all faces go into
    one Embree scene so every view needs a single intersect call. A ``PreparedMesh`` is
    returned as is.

    Args:
        mesh: ``trimesh.Trimesh``, ``trimesh.Scene`` (node transforms applied), a list of
            ``trimesh.Trimesh``, or a ``PreparedMesh``.
        crease_angle_deg: edges sharper than this keep flat shading (a cube stays a cube).
    """
    if isinstance(mesh, PreparedMesh):
        return mesh
    meshes = _as_meshes(mesh)
    vertices, faces, normals, colors, uvs, textures = [], [], [], [], [], []
    vertex_offset = face_offset = 0
    for part in meshes:
        v = np.asarray(part.vertices, dtype=np.float64)
        f = np.asarray(part.faces, dtype=np.int64)
        part_colors, part_uv, image = _part_colors(part)
        vertices.append(v)
        faces.append(f + vertex_offset)
        normals.append(_corner_normals(v, f, crease_angle_deg))
        colors.append(part_colors)
        uvs.append(np.zeros((len(f), 3, 2), np.float32) if part_uv is None else part_uv)
        if image is not None:
            pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
            textures.append(_Texture(face_offset, face_offset + len(f), pixels))
        vertex_offset += len(v)
        face_offset += len(f)
    all_vertices, all_faces = np.concatenate(vertices), np.concatenate(faces)
    tri = all_vertices[all_faces]
    return PreparedMesh(
        # float32, like Embree and the rays: halves the memory traffic of shading.
        v0=tri[:, 0].astype(np.float32), e1=(tri[:, 1] - tri[:, 0]).astype(np.float32),
        e2=(tri[:, 2] - tri[:, 0]).astype(np.float32),
        corner_normals=np.concatenate(normals),
        corner_colors=np.ascontiguousarray(np.concatenate(colors), dtype=np.float32),
        corner_uv=np.concatenate(uvs), textures=textures,
        intersector=_embree_intersector(all_vertices, all_faces))


# ----------------------------------------------------------------------------- shading


def _sample_texture(image: np.ndarray, uv: np.ndarray, texture_filter: str) -> np.ndarray:
    """(h, w, 3) uint8 image, (M, 2) UVs (bottom-left origin, wrapping) -> (M, 3) float32."""
    h, w = image.shape[:2]
    flat = image.reshape(h * w, 3)
    uv = np.nan_to_num(uv.astype(np.float64))
    x = uv[:, 0] * w  # texel j covers x in [j, j + 1): its centre is at j + 0.5
    y = (1.0 - uv[:, 1]) * h  # v points up, image rows go down
    if texture_filter == "nearest":
        col = np.floor(x).astype(np.int64) % w
        row = np.floor(y).astype(np.int64) % h
        return flat[row * w + col].astype(np.float32) / 255.0
    x, y = x - 0.5, y - 0.5
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0).astype(np.float32)[:, None], (y - y0).astype(np.float32)[:, None]
    c0, r0 = x0.astype(np.int64) % w, y0.astype(np.int64) % h
    c1, r1 = (c0 + 1) % w, (r0 + 1) % h  # wrap: REPEAT also between the last and first texel
    top = flat[r0 * w + c0] * (1 - fx) + flat[r0 * w + c1] * fx
    bottom = flat[r1 * w + c0] * (1 - fx) + flat[r1 * w + c1] * fx
    return (top * (1 - fy) + bottom * fy) / 255.0


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot product of (M, 3) arrays -> (M,) (cheaper than einsum for 3 columns)."""
    return a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1] + a[:, 2] * b[:, 2]


def _interpolate(bary: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """(M, 3) barycentric weights, (M, 3, C) corner values -> (M, C)."""
    return (bary[:, 0:1] * corners[:, 0] + bary[:, 1:2] * corners[:, 1]
            + bary[:, 2:3] * corners[:, 2])


def _barycentrics(prepared: PreparedMesh, face: np.ndarray, origins: np.ndarray,
                  directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Moller-Trumbore on known hits: (M,) faces, (M, 3) rays -> (M, 3) bary, (M,) front.

    Embree already found the triangle, so only the weights are computed (no inside test).
    ``front`` is True where the ray meets the triangle's front (counter-clockwise) side.
    """
    e1, e2 = prepared.e1[face], prepared.e2[face]
    p = np.cross(directions, e2)
    det = _dot(e1, p)
    inv = 1.0 / np.where(np.abs(det) > 1e-30, det, 1.0)  # a grazing hit: its weights are moot
    s = origins - prepared.v0[face]
    b1 = _dot(s, p) * inv
    b2 = _dot(directions, np.cross(s, e1)) * inv
    # Embree and this step work in float32: clamp hits reported just outside the triangle.
    np.clip(b1, 0.0, 1.0, out=b1)
    np.clip(b2, 0.0, 1.0, out=b2)
    over = np.maximum(b1 + b2, 1.0)
    b1 /= over
    b2 /= over
    return np.stack([1.0 - b1 - b2, b1, b2], axis=-1), det > 0


def _shade_hits(prepared: PreparedMesh, face: np.ndarray, bary: np.ndarray, front: np.ndarray,
                light_dir: np.ndarray, light: Light, texture_filter: str) -> np.ndarray:
    """Shaded RGB of M hits: (M,) faces, (M, 3) bary, (M,) front, (M, 3) light -> (M, 3)."""
    albedo = _interpolate(bary, prepared.corner_colors[face])
    for texture in prepared.textures:
        on = (face >= texture.start) & (face < texture.stop)
        if on.any():
            uv = _interpolate(bary[on], prepared.corner_uv[face[on]])
            albedo[on] *= _sample_texture(texture.image, uv, texture_filter)
    normal = _normalize_rows(_interpolate(bary, prepared.corner_normals[face]))
    lambert = _dot(normal, light_dir)
    lambert[~front] *= -1.0  # two-sided: light the side the camera sees
    shade = light.ambient + light.diffuse * np.maximum(lambert, 0.0)
    return np.clip(albedo * shade[:, None], 0.0, 1.0)


def _render_chunk(prepared: PreparedMesh, c2w: torch.Tensor, fovy: torch.Tensor,
                  height: int, width: int, light_dirs: np.ndarray, light: Light,
                  texture_filter: str) -> np.ndarray:
    """Views of one chunk -> (n, height, width, 4) float32 RGBA (alpha 0 or 1).

    One Embree call for all rays of all the chunk's views; then only the hits are shaded.
    """
    origins, directions = get_rays(c2w, fovy, height, width)
    origins = origins.reshape(-1, 3).numpy()
    directions = directions.reshape(-1, 3).numpy()
    face = prepared.intersector.intersects_first(origins, directions)
    ray = np.flatnonzero(face >= 0)
    face = face[ray]
    bary, front = _barycentrics(prepared, face, origins[ray], directions[ray])
    view = ray // (height * width)
    rgb = _shade_hits(prepared, face, bary, front, light_dirs[view], light, texture_filter)
    out = np.zeros((c2w.shape[0] * height * width, 4), np.float32)
    out[ray, :3] = rgb
    out[ray, 3] = 1.0
    return out.reshape(c2w.shape[0], height, width, 4)


def _downsample(rgba: np.ndarray, factor: int) -> np.ndarray:
    """(n, H*s, W*s, 4) straight-alpha floats -> (n, H, W, 4): coverage-weighted colour."""
    if factor == 1:
        return rgba
    n, hs, ws, _ = rgba.shape
    blocks = rgba.reshape(n, hs // factor, factor, ws // factor, factor, 4)
    alpha = blocks[..., 3].mean(axis=(2, 4))
    premultiplied = (blocks[..., :3] * blocks[..., 3:]).mean(axis=(2, 4))
    rgb = premultiplied / np.maximum(alpha, 1e-8)[..., None]
    return np.concatenate([rgb, alpha[..., None]], axis=-1)


def _as_c2w(c2w: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = c2w if isinstance(c2w, torch.Tensor) else torch.as_tensor(np.asarray(c2w))
    t = t.detach().to(device="cpu", dtype=torch.float32)
    if t.ndim != 3 or tuple(t.shape[1:]) != (4, 4):
        raise ValueError(f"c2w must have shape (N, 4, 4), got {tuple(t.shape)}")
    return t


def render_views(mesh: Any, c2w: torch.Tensor | np.ndarray,
                 fovy_deg: float | Sequence[float] | np.ndarray | torch.Tensor,
                 resolution: int | tuple[int, int], *, light: Light | None = None,
                 antialias: int = 1, texture_filter: str = "bilinear",
                 num_threads: int = 1) -> np.ndarray:
    """Render a mesh from N cameras to straight-alpha RGBA, on the CPU with Embree.

    Args:
        mesh: ``trimesh.Trimesh``, ``trimesh.Scene``, list of meshes, or a ``PreparedMesh``
            (``prepare_mesh``; reuse it to skip the per-call BVH build when rendering the same
            mesh many times).
        c2w: (N, 4, 4) camera-to-world, torch or numpy (z-up world, OpenGL camera axes).
        fovy_deg: scalar or (N,) vertical field of view, degrees in (0, 180).
        resolution: image side ``S`` (square) or ``(H, W)``, each >= 1.
        light: ``Light`` (default: ``Light()``, from the camera's upper left);
            see ``random_light``.
        antialias: ``s >= 1``: cast ``s x s`` rays per pixel and average (soft edges).
        texture_filter: ``"bilinear"`` or ``"nearest"`` texel lookup.
        num_threads: threads rendering chunks of views in parallel (Embree and numpy
            release the GIL); the result does not depend on it.

    Returns:
        (N, H, W, 4) uint8 RGBA, straight alpha (RGB 0 where alpha is 0).
    """
    height, width = _resolution_hw(resolution)
    factor = _check_positive_int("antialias", antialias)
    threads = _check_positive_int("num_threads", num_threads)
    _check_choice("texture_filter", texture_filter, TEXTURE_FILTERS)
    cameras = _as_c2w(c2w)
    n = cameras.shape[0]
    fovy = torch.as_tensor(np.asarray(fovy_deg.detach().cpu() if isinstance(fovy_deg, torch.Tensor)
                                      else fovy_deg, dtype=np.float32)).reshape(-1)
    if fovy.shape[0] not in (1, n):
        raise ValueError(f"fovy_deg must be a scalar or have shape (N,) = ({n},), "
                         f"got {tuple(fovy.shape)}")
    fovy = fovy.expand(n)
    light = Light() if light is None else light
    light_dirs = light.world_directions(cameras.numpy().astype(np.float64)).astype(np.float32)
    prepared = prepare_mesh(mesh)

    hs, ws = height * factor, width * factor
    # Chunks of whole views: one Embree call each; with threads, at least one chunk per thread
    # (Embree and numpy's large-array loops release the GIL, so chunks run in parallel).
    per_chunk = max(1, min(_MAX_RAYS_PER_CHUNK // (hs * ws), math.ceil(n / threads)))
    out = np.empty((n, height, width, 4), np.uint8)

    def render_chunk(start: int) -> None:
        stop = min(n, start + per_chunk)
        rgba = _render_chunk(prepared, cameras[start:stop], fovy[start:stop], hs, ws,
                             light_dirs[start:stop], light, texture_filter)
        rgba = _downsample(rgba, factor)
        rgba[..., :3] *= rgba[..., 3:] > 0  # straight alpha: no colour where nothing is
        out[start:stop] = np.clip(np.rint(rgba * 255.0), 0, 255).astype(np.uint8)

    starts = range(0, n, per_chunk)
    if threads == 1 or len(starts) == 1:
        for start in starts:
            render_chunk(start)
    else:
        with ThreadPoolExecutor(min(threads, len(starts))) as pool:
            list(pool.map(render_chunk, starts))  # list(): re-raise any worker's error
    return out
