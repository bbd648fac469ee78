"""Data preparation: render multi-view objects and build text-image shards, at any scale.

Multi-view (``prepare_multiview``): every object (a procedural shape or a mesh file) is
rendered at ``views`` azimuths evenly spaced from 0 degrees (MVDream renders 32), with one
elevation / fov / distance per object drawn from the paper's ranges, into
``out/objects/<id>/`` (see :mod:`.layout`). Objects are independent tasks, run serially, on a
process pool or as Ray tasks; an object whose ``cameras.json`` exists is finished and skipped
on a rerun, so an interrupted job resumes where it stopped. The manifest is rebuilt from the
finished objects at the end.

Text-image pairs (``prepare_text_images``): images + captions from a folder/URI, or the
built-in default 2D set (single renders of procedural objects plus real photographs shipped by
scikit-image, with captions written here), into LAION-style parquet shards.
"""

from __future__ import annotations

import glob as globlib
import io
import json
import logging
import math
import multiprocessing
import os
import re
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
from fsspec.core import url_to_fs
from tqdm import tqdm

from .. import storage
from ..cameras import mvdream_to_orbit_azimuth, orbit_camera_to_world
from . import layout, shards
from .datasets import read_multiview_manifest
from .layout import ObjectRecord

log = logging.getLogger(__name__)

MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BACKENDS = ("serial", "process", "ray")


# ------------------------------------------------------------------------------ settings
@dataclass
class RenderSettings:
    """How each object is rendered (defaults: the paper's ranges, REFERENCE.md).

    ``fill`` in [lo, hi]: the camera distance is ``fill / sin(fovy / 2)``, so the unit sphere
    around the normalised object just fits the frame at ``fill = 1`` ("distance scaled so the
    object fills the frame").
    """

    views: int = 32
    resolution: int = 256
    elevation_deg: tuple[float, float] = (0.0, 30.0)
    fovy_deg: tuple[float, float] = (15.0, 60.0)
    fill: tuple[float, float] = (1.0, 1.15)
    random_light: bool = True
    antialias: int = 2
    seed: int = 0
    # shapes only (None = the grammar's default, ``shapes.DEFAULT_P_*``): share of objects whose
    # (first) part carries a front marker, share of two-part objects, and the chance that the
    # caption leaves out each attribute (colour, adjective, marker colour, side).
    front_share: float | None = None
    composite_share: float | None = None
    open_share: float | None = None
    # shapes only: marked objects are single parts with every attribute captioned
    # (``shapes.make_object``'s ``closed_fronts``).
    closed_fronts: bool = False

    @property
    def grammar(self) -> dict[str, Any]:
        """``make_object``'s keyword arguments for these shares."""
        return grammar_shares(self.front_share, self.composite_share, self.open_share,
                              self.closed_fronts)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.grammar  # noqa: B018 -- raises if a share is out of [0, 1] or closed_fronts not a bool
        if self.views < 1:
            raise ValueError(f"views must be >= 1, got {self.views}")
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8 pixels, got {self.resolution}")
        for name in ("elevation_deg", "fovy_deg", "fill"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} range must be (low, high) with low <= high, got {(lo, hi)}")
        if not (0 < self.fovy_deg[0] and self.fovy_deg[1] < 180):
            raise ValueError(f"fovy_deg must lie in (0, 180), got {self.fovy_deg}")
        if not (-90 < self.elevation_deg[0] and self.elevation_deg[1] < 90):
            raise ValueError(f"elevation_deg must lie in (-90, 90), got {self.elevation_deg}")


def grammar_shares(front_share: float | None = None, composite_share: float | None = None,
                   open_share: float | None = None, closed_fronts: bool = False) -> dict[str, Any]:
    """``make_object``'s ``p_front``, ``p_composite``, ``p_open`` and ``closed_fronts`` for the
    prepare settings' shares (None: the grammar's default).

    Raises:
        ValueError: a share is not None and outside [0, 1], or closed_fronts is not a bool
            (named in the message).
    """
    from . import shapes

    shares = {"front_share": (front_share, "p_front", shapes.DEFAULT_P_FRONT),
              "composite_share": (composite_share, "p_composite", shapes.DEFAULT_P_COMPOSITE),
              "open_share": (open_share, "p_open", shapes.DEFAULT_P_OPEN)}
    out = {}
    for name, (value, keyword, default) in shares.items():
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1] (or be null), got {value}")
        out[keyword] = default if value is None else float(value)
    if not isinstance(closed_fronts, bool):
        raise ValueError(f"closed_fronts must be true or false, got {closed_fronts!r}")
    out["closed_fronts"] = closed_fronts
    return out


@dataclass
class ObjectSpec:
    """One unit of work: enough to rebuild the object in any worker process."""

    object_id: str
    kind: str  # "shape" | "mesh"
    index: int  # shapes: the object's index in the procedural set
    path: str | None = None  # meshes: file path or URI
    caption: str | None = None
    up_axis: str = "auto"


@dataclass
class PrepareSummary:
    objects: int = 0
    rendered: int = 0
    skipped_existing: int = 0
    failed: int = 0
    views: int = 0
    seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)

    def line(self) -> str:
        rate = self.rendered * self.views / self.seconds if self.seconds else 0.0
        return (f"{self.objects} objects ({self.rendered} rendered, {self.skipped_existing} already "
                f"done, {self.failed} failed), {self.views} views each, {self.seconds:.1f} s "
                f"({rate:.1f} views/s)")


# ------------------------------------------------------------------------------ planning
def plan_shapes(num_objects: int, seed: int = 0) -> list[ObjectSpec]:
    """Specs for objects 0..N-1 of the procedural set (object i depends only on seed and i)."""
    from .shapes import object_id_for

    if num_objects < 0:
        raise ValueError(f"num_objects must be >= 0, got {num_objects}")
    return [ObjectSpec(object_id=object_id_for(i), kind="shape", index=i) for i in range(num_objects)]


def plan_meshes(input_glob: str, captions: dict[str, str] | None = None,
                up_axis: str = "auto") -> list[ObjectSpec]:
    """Specs for every mesh file matching ``input_glob`` (a local glob or fsspec URL glob).

    Captions come from ``captions`` (keyed by file stem or name), else a sidecar
    ``<stem>.json`` ({"caption", "up_axis"}) or ``<stem>.txt`` next to the mesh, else the file
    name ("BoxTextured.glb" -> "a box textured"). ``up_axis`` applies to files whose
    ``<stem>.json`` does not set one.
    """
    paths = sorted(p for p in glob_files(input_glob) if p.lower().endswith(MESH_SUFFIXES))
    if not paths:
        raise ValueError(f"input={input_glob!r} matches no mesh files ({', '.join(MESH_SUFFIXES)})")
    captions = captions or {}
    specs, seen = [], set()
    for index, path in enumerate(paths):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        stem = name.rsplit(".", 1)[0]
        meta = _sidecar_metadata(path)
        caption = (captions.get(name) or captions.get(stem) or meta.get("caption")
                   or _sidecar_caption(path) or caption_from_name(stem))
        object_id = _object_id_for_path(stem, path)
        if object_id in seen:  # two files with one stem in one folder (a.glb, a.obj)
            object_id = f"{object_id}-{index}"
        seen.add(object_id)
        specs.append(ObjectSpec(object_id=object_id, kind="mesh", index=index, path=path,
                                caption=caption, up_axis=meta.get("up_axis", up_axis)))
    return specs


def _sidecar_metadata(path: str) -> dict[str, Any]:
    """``<stem>.json`` next to a mesh: {"caption": ..., "up_axis": "y"|"z"} for that file.

    Files that break the format's usual up axis (a y-up PLY scan, a z-up OBJ export) are common,
    and one ``up_axis`` for a whole glob cannot serve them all.
    """
    sidecar = path.rsplit(".", 1)[0] + ".json"
    if not storage.exists(sidecar):
        return {}
    try:
        meta = json.loads(storage.read_bytes(sidecar).decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"mesh metadata {sidecar}: not valid JSON ({error})") from error
    if not isinstance(meta, dict):
        raise ValueError(f"mesh metadata {sidecar}: expected a JSON object")
    if meta.get("up_axis", "auto") not in ("auto", "y", "z"):
        raise ValueError(f"mesh metadata {sidecar}: up_axis must be auto, y or z, got {meta['up_axis']!r}")
    return meta


def caption_from_name(stem: str) -> str:
    """'BoxTextured' / 'red_chair-02' -> 'a box textured' / 'a red chair'."""
    words = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", stem)
    words = re.sub(r"[_\-.]+|\d+", " ", words).strip().lower()
    words = re.sub(r"\s+", " ", words) or "object"
    return f"an {words}" if words[0] in "aeiou" else f"a {words}"


def _object_id_for_path(stem: str, path: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", stem).strip("-").lower()[:40] or "mesh"
    return f"{slug}-{zlib.crc32(path.encode()) & 0xFFFFFFFF:08x}"


def glob_files(pattern: str) -> list[str]:
    """Files matching a local or fsspec glob (a folder means its direct children), sorted."""
    if storage.is_local(pattern):
        local = storage.local_path(pattern)
        if os.path.isdir(local):
            local = os.path.join(local, "*")
        return sorted(globlib.glob(os.path.expanduser(local)))
    fs, path = url_to_fs(pattern)
    if fs.isdir(path):
        path = path.rstrip("/") + "/*"
    protocol = pattern.split("://", 1)[0]
    return sorted(f"{protocol}://{p.lstrip('/')}" if protocol == "memory" else f"{protocol}://{p}"
                  for p in fs.glob(path))


def _sidecar_caption(path: str) -> str | None:
    sidecar = path.rsplit(".", 1)[0] + ".txt"
    try:
        if storage.exists(sidecar):
            return storage.read_bytes(sidecar).decode().strip() or None
    except OSError:
        return None
    return None


# ------------------------------------------------------------------------------ rendering
def object_cameras(spec: ObjectSpec, settings: RenderSettings) -> dict[str, Any]:
    """The object's cameras: ``views`` azimuths from 0, one elevation/fovy/distance per object.

    Drawn from a generator seeded by (settings.seed, object id), so a rerun or another worker
    draws the same cameras for the same object.
    """
    rng = np.random.default_rng([settings.seed, zlib.crc32(spec.object_id.encode())])
    elevation = float(rng.uniform(*settings.elevation_deg))
    fovy = float(rng.uniform(*settings.fovy_deg))
    distance = float(rng.uniform(*settings.fill)) / math.sin(math.radians(fovy) / 2)
    azimuths = [360.0 * k / settings.views for k in range(settings.views)]
    c2w = orbit_camera_to_world(
        elevation, mvdream_to_orbit_azimuth(np.asarray(azimuths)), distance
    )
    light_seed = int(rng.integers(0, 2**31 - 1))
    return {"elevation_deg": elevation, "fovy_deg": fovy, "distance": distance,
            "azimuths_deg": azimuths, "c2w": c2w, "light_seed": light_seed}


def build_object(spec: ObjectSpec, settings: RenderSettings):
    """(mesh, caption, attributes) for a spec; meshes are normalised to the unit sphere."""
    from . import render

    if spec.kind == "shape":
        from .shapes import make_object

        obj = make_object(spec.index, seed=settings.seed, **settings.grammar)
        return obj.mesh, obj.caption, dict(obj.attributes)
    if spec.kind == "mesh":
        with _local_copy(spec.path) as local:
            mesh, info = render.load_normalized_mesh(local, up_axis=spec.up_axis)
        attributes = {"source_file": spec.path, "normalization": storage.jsonable(info)}
        return mesh, spec.caption, attributes
    raise ValueError(f"unknown object kind {spec.kind!r}; allowed: shape, mesh")


def render_object(spec: ObjectSpec, settings: RenderSettings, out_uri: str) -> ObjectRecord:
    """Render one object's views and write its folder; ``cameras.json`` goes last."""
    from . import render

    mesh, caption, attributes = build_object(spec, settings)
    cams = object_cameras(spec, settings)
    rgba = render.render_views(
        mesh, cams["c2w"], cams["fovy_deg"], settings.resolution,
        light=render.random_light(cams["light_seed"]) if settings.random_light else None,
        antialias=settings.antialias,
    )  # (V, H, W, 4) uint8
    folder = storage.join(out_uri, layout.OBJECTS_DIR, spec.object_id)
    for k, view in enumerate(rgba):
        storage.write_bytes(storage.join(folder, layout.view_name(k)), storage.encode_png(view))
    record = ObjectRecord(
        object_id=spec.object_id, caption=caption, attributes=attributes,
        resolution=settings.resolution, azimuths_deg=cams["azimuths_deg"],
        elevation_deg=cams["elevation_deg"], fovy_deg=cams["fovy_deg"],
        distance=cams["distance"], camera_to_world=cams["c2w"].tolist(),
        extra={"kind": spec.kind, "render_seed": settings.seed},
    )
    storage.write_json(storage.join(folder, layout.CAMERAS_FILE), record.to_json())
    return record


def _render_task(spec: ObjectSpec, settings: RenderSettings, out_uri: str) -> tuple[str, str | None]:
    """Worker entry point: never raises, so one bad object cannot stop the job."""
    try:
        render_object(spec, settings, out_uri)
        return spec.object_id, None
    except Exception as error:  # recorded as a failure with its reason
        return spec.object_id, f"{type(error).__name__}: {error}"


def is_finished(out_uri: str, object_id: str) -> bool:
    return storage.exists(storage.join(out_uri, layout.OBJECTS_DIR, object_id, layout.CAMERAS_FILE))


def prepare_multiview(specs: list[ObjectSpec], out_uri: str, settings: RenderSettings, *,
                      backend: str = "process", workers: int = 0, progress: bool = True,
                      objects_per_shard: int | None = None) -> PrepareSummary:
    """Render every unfinished object of ``specs`` into ``out_uri``, then write the manifest.

    Args:
        backend: ``serial`` (in this process), ``process`` (a process pool) or ``ray`` (one Ray
            task per object on the current cluster; a local one is started if none is running).
        workers: parallel workers for ``process``/``ray`` (0 = number of CPUs).
        objects_per_shard: None writes the per-object folder layout; a number writes parquet
            shards of that many objects (:mod:`.shards`): each chunk is rendered into
            ``out_uri/.staging/``, packed, and committed to ``shards.json``; a rerun skips the
            objects already in a shard.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if objects_per_shard is not None and objects_per_shard < 1:
        raise ValueError(f"objects_per_shard must be >= 1 or None, got {objects_per_shard}")
    start = time.perf_counter()
    summary = PrepareSummary(objects=len(specs), views=settings.views)
    if objects_per_shard is None:
        todo = [s for s in specs if not is_finished(out_uri, s.object_id)]
    else:
        done = shards.sharded_objects(out_uri)
        todo = [s for s in specs if s.object_id not in done]
    summary.skipped_existing = len(specs) - len(todo)
    bar = tqdm(total=len(todo), desc="render", unit="obj", disable=not progress)

    def record(results: Iterable[tuple[str, str | None]]) -> list[str]:
        ok = []
        for object_id, error in results:
            if error is None:
                summary.rendered += 1
                ok.append(object_id)
            else:
                summary.failed += 1
                summary.failures.append({"object_id": object_id, "error": error})
                log.warning("object %s failed: %s", object_id, error)
            bar.update(1)
        return ok

    if objects_per_shard is None:
        record(_run(todo, settings, out_uri, backend, workers))
        write_manifest(out_uri)
    else:
        # Staging under out_uri (not a local temp folder): Ray tasks on other nodes write there
        # too, and a chunk interrupted by a crash keeps its finished objects for the rerun.
        for first in range(0, len(todo), objects_per_shard):
            chunk = todo[first:first + objects_per_shard]
            staging = storage.join(out_uri, ".staging", chunk[0].object_id)
            again = [s for s in chunk if not is_finished(staging, s.object_id)]
            record(_run(again, settings, staging, backend, workers))
            ids = [s.object_id for s in chunk if is_finished(staging, s.object_id)]  # plan order
            if ids:
                shards.append_shard(out_uri, shards.rows_of_objects(staging, ids))
            storage.remove_tree(staging)
        storage.remove_tree(storage.join(out_uri, ".staging"))
        shards.ensure_manifest(out_uri)
    bar.close()
    summary.seconds = time.perf_counter() - start
    storage.write_json(storage.join(out_uri, "prepare_summary.json"), asdict(summary))
    return summary


def _run(todo: list[ObjectSpec], settings: RenderSettings, out_uri: str, backend: str,
         workers: int) -> Iterator[tuple[str, str | None]]:
    if not todo:
        return
    if backend == "serial":
        for spec in todo:
            yield _render_task(spec, settings, out_uri)
    elif backend == "process":
        # spawn, not fork: forking a process whose torch/OpenMP or Embree threads already run
        # can deadlock the children.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers or os.cpu_count(), mp_context=context) as pool:
            futures = [pool.submit(_render_task, s, settings, out_uri) for s in todo]
            for future in as_completed(futures):
                yield future.result()
    else:
        yield from _run_ray(todo, settings, out_uri, workers)


def _run_ray(todo, settings, out_uri, workers) -> Iterator[tuple[str, str | None]]:
    import ray

    from ..cluster import ensure_ray

    ensure_ray(num_cpus=workers or None, log_to_driver=False)
    task = ray.remote(num_cpus=1)(_render_task)
    pending = [task.remote(s, settings, out_uri) for s in todo]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


# ------------------------------------------------------------------------------ manifest
def finished_records(out_uri: str) -> Iterator[ObjectRecord]:
    """Every complete object under ``out_uri`` (sorted by id); unreadable ones are skipped."""
    root = storage.join(out_uri, layout.OBJECTS_DIR)
    if not storage.exists(root):
        return
    fs, path = url_to_fs(root)
    for entry in sorted(fs.ls(path, detail=False)):
        object_id = entry.rstrip("/").rsplit("/", 1)[-1]
        cameras = storage.join(root, object_id, layout.CAMERAS_FILE)
        if not storage.exists(cameras):
            continue  # unfinished: no cameras.json yet
        try:
            yield ObjectRecord.from_json(storage.read_json(cameras))
        except (ValueError, TypeError, json.JSONDecodeError) as error:
            log.warning("skipping %s in the manifest: %s", cameras, error)


def write_manifest(out_uri: str) -> int:
    """Rewrite ``manifest.jsonl`` from the finished objects; returns the number of lines."""
    lines = [json.dumps(r.manifest_entry(), sort_keys=True) for r in finished_records(out_uri)]
    storage.write_text(storage.join(out_uri, layout.MANIFEST), "".join(line + "\n" for line in lines))
    return len(lines)


# ------------------------------------------------------------------------------ multi-view shards
def shard_folders(src_uri: str, out_uri: str, objects_per_shard: int = 64) -> dict[str, Any]:
    """Convert a folder layout (``manifest.jsonl`` + ``objects/``) into shards; resumable.

    Objects already in a shard of ``out_uri`` are skipped, so a rerun after a crash continues.
    Returns the shard manifest.
    """
    if objects_per_shard < 1:
        raise ValueError(f"objects_per_shard must be >= 1, got {objects_per_shard}")
    entries, _ = read_multiview_manifest(src_uri)
    done = shards.sharded_objects(out_uri)
    todo = [e["object_id"] for e in entries if e["object_id"] not in done]
    for start in range(0, len(todo), objects_per_shard):
        manifest = shards.append_shard(out_uri, shards.rows_of_objects(src_uri, todo[start:start + objects_per_shard]))
        log.info("shard %d: %d objects", len(manifest["shards"]) - 1, manifest["shards"][-1]["rows"])
    return shards.ensure_manifest(out_uri)


# ------------------------------------------------------------------------------ text-image shards
# Real photographs shipped inside the scikit-image wheel, with captions written for them.
BUILTIN_PHOTOS = {
    "astronaut": "a portrait photo of an astronaut in a space suit in front of a flag",
    "chelsea": "a photo of a ginger tabby cat",
    "coffee": "a photo of a cup of coffee on a saucer",
    "rocket": "a photo of a rocket on its launch pad",
    "hubble_deep_field": "a telescope image of many distant galaxies in deep space",
    "retina": "a medical photo of a human retina",
    "immunohistochemistry": "a microscope image of stained tissue",
    "colorwheel": "a colour wheel",
    "camera": "a black and white photo of a man with a camera on a tripod",
    "coins": "a black and white photo of old coins",
    "moon": "a black and white photo of the surface of the moon",
    "brick": "a grey photo of a brick wall",
    "grass": "a black and white photo of grass",
    "gravel": "a black and white photo of gravel",
}


@dataclass
class ImagePair:
    key: str
    image: bytes  # encoded PNG or JPEG
    caption: str


def builtin_pairs(num_objects: int, seed: int = 0, resolution: int = 256,
                  front_share: float | None = None, composite_share: float | None = None,
                  open_share: float | None = None,
                  closed_fronts: bool = False) -> Iterator[ImagePair]:
    """The default 2D set: one render of each procedural object, then the bundled photos.

    Procedural objects use indices from 1_000_000 on, so the 2D set never repeats an object of
    the multi-view set; each gets one random view (random elevation, azimuth, fov).
    The shares: as :class:`RenderSettings`' (None = the grammar's default).
    """
    from skimage import data as photos

    from . import render
    from .shapes import make_object

    grammar = grammar_shares(front_share, composite_share, open_share, closed_fronts)
    rng = np.random.default_rng(seed)
    for i in range(num_objects):
        obj = make_object(1_000_000 + i, seed=seed, **grammar)
        elevation, azimuth = rng.uniform(0, 30), rng.uniform(0, 360)
        fovy = rng.uniform(30, 50)
        distance = rng.uniform(1.0, 1.15) / math.sin(math.radians(fovy) / 2)
        c2w = orbit_camera_to_world(elevation, azimuth, distance)
        rgba = render.render_views(obj.mesh, c2w, fovy, resolution, antialias=2)[0]
        grey = rng.uniform(0.2, 0.9) * 255  # composite on grey, as LAION images have no alpha
        alpha = rgba[..., 3:4].astype(np.float32) / 255
        rgb = (rgba[..., :3] * alpha + grey * (1 - alpha)).round().astype(np.uint8)
        yield ImagePair(key=f"render-{i:06d}", image=storage.encode_png(rgb), caption=obj.caption)
    for name, caption in BUILTIN_PHOTOS.items():
        array = getattr(photos, name)()
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        yield ImagePair(key=f"photo-{name}", image=storage.encode_png(array[..., :3].astype(np.uint8)),
                        caption=caption)


def folder_pairs(input_uri: str, captions: dict[str, str] | None = None) -> Iterator[ImagePair]:
    """Images under ``input_uri`` (folder or glob) with captions from ``captions`` or sidecars."""
    captions = captions or {}
    paths = sorted(p for p in glob_files(input_uri) if p.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise ValueError(f"input={input_uri!r} matches no images ({', '.join(IMAGE_SUFFIXES)})")
    for path in paths:
        name = path.rsplit("/", 1)[-1]
        stem = name.rsplit(".", 1)[0]
        caption = captions.get(name) or captions.get(stem) or _sidecar_caption(path)
        if not caption:
            log.warning("skipping %s: no caption (give captions= or a %s.txt sidecar)", path, stem)
            continue
        yield ImagePair(key=re.sub(r"[^A-Za-z0-9_-]+", "-", stem), image=storage.read_bytes(path),
                        caption=caption)


def prepare_text_images(pairs: Iterable[ImagePair], out_uri: str, rows_per_shard: int = 1000,
                        source: str = "", progress: bool = True) -> dict[str, Any]:
    """Write ``pairs`` as parquet shards + ``manifest.json``; returns the manifest.

    Unreadable images are skipped and counted, never written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    shards, rows, skipped, buffer = [], 0, 0, []

    def flush() -> None:
        name = layout.SHARD_PATTERN.format(index=len(shards))
        table = pa.table({k: [row[k] for row in buffer] for k in ("key", "image", "caption", "width", "height")})
        sink = io.BytesIO()
        # Small row groups: readers fetch one row group per random access.
        pq.write_table(table, sink, row_group_size=64)
        storage.write_bytes(storage.join(out_uri, name), sink.getvalue())
        shards.append({"name": name, "rows": len(buffer)})
        buffer.clear()

    for pair in tqdm(pairs, desc="images", unit="img", disable=not progress):
        try:
            with PIL.Image.open(io.BytesIO(pair.image)) as image:
                image.load()
                width, height = image.size
        except Exception as error:  # noqa: BLE001 - any decoding failure means "skip it"
            skipped += 1
            log.warning("skipping image %s: %s", pair.key, error)
            continue
        buffer.append({"key": pair.key, "image": pair.image, "caption": pair.caption,
                       "width": width, "height": height})
        rows += 1
        if len(buffer) == rows_per_shard:
            flush()
    if buffer:
        flush()
    manifest = {"shards": shards, "rows": rows, "skipped": skipped, "source": source,
                "layout_version": layout.LAYOUT_VERSION}
    storage.write_json(storage.join(out_uri, layout.IMAGES_MANIFEST), manifest)
    return manifest


# ------------------------------------------------------------------------------ helpers
class _local_copy:
    """Context manager: a local path for a mesh file, downloading remote files with siblings.

    OBJ/glTF files reference materials, textures and buffers by relative path, so the other
    files of the same folder with those suffixes come along.
    """

    SIBLINGS = (".mtl", ".png", ".jpg", ".jpeg", ".bin", ".tga", ".bmp")

    def __init__(self, path: str):
        self.path = path
        self.tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> str:
        if storage.is_local(self.path):
            return storage.local_path(self.path)
        self.tmp = tempfile.TemporaryDirectory(prefix="mvdream-mesh-")
        folder = self.path.rsplit("/", 1)[0]
        name = self.path.rsplit("/", 1)[-1]
        needed = [self.path]
        if name.lower().endswith((".obj", ".gltf")):
            needed += [p for p in glob_files(folder) if p.lower().endswith(self.SIBLINGS)]
        for remote in needed:
            target = Path(self.tmp.name) / remote.rsplit("/", 1)[-1]
            target.write_bytes(storage.read_bytes(remote))
        return str(Path(self.tmp.name) / name)

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()


def load_captions(uri: str | None) -> dict[str, str]:
    """A captions file: JSON object {name: caption} or JSONL lines {"file"|"key", "caption"}."""
    if not uri:
        return {}
    text = storage.read_bytes(uri).decode()
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            return {str(k): str(v) for k, v in data.items()}
    except json.JSONDecodeError:
        pass
    captions = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[str(row.get("file") or row["key"])] = str(row["caption"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"captions file {uri}: line {number} is not "
                             f'{{"file": ..., "caption": ...}} ({error})') from error
    return captions

