"""Datasets over prepared training data on any fsspec URI: multi-view renders and text-image pairs.

Both read the layout of :mod:`mvdream_platform.data.layout` and return items in the project's
conventions: images float32 in [-1, 1] shaped (F, 3, H, W), cameras (F, 16) row-major c2w.

* :class:`MultiViewDataset`: one item per rendered object: ``num_views`` views 360/num_views
  degrees apart (random start), composited over a random grey background, cameras normalised
  to unit distance as MVDream does.
* :class:`TextImageDataset`: one item per image-caption pair from parquet or webdataset tar
  shards, resized (shorter side) and cropped to the model resolution.

Randomness (view start, background grey, crop) is a pure function of ``(seed, epoch, index)``,
so an item is the same in any process, worker or order (``set_epoch`` or ``load(i, epoch)``).

Bad records: ``load`` / ``__getitem__`` raise :class:`BadRecord`, whose ``reason`` is one of
:data:`MULTIVIEW_REASONS` / :data:`IMAGE_REASONS`. The mixture loader (:mod:`.mixture`) catches
it, skips the record, counts it by reason and logs a rate-limited warning
(:func:`warn_skip`); a plain ``torch.utils.data.DataLoader`` over these datasets would raise
instead. Problems found while listing (bad manifest lines, unreadable shards) are skipped at
construction and counted in ``dataset.listing_skips``.

:func:`validate_multiview` and :func:`validate_text_images` check a whole prepared folder
(every view of every object, every row) and return a JSON-able report for
``jobs/prepare_data.py mode=validate``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import tarfile
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from fsspec.core import url_to_fs
from PIL import Image
from torch.utils.data import Dataset

from mvdream_platform import storage
from mvdream_platform.cameras import normalize_camera
from mvdream_platform.data.layout import (
    CAMERAS_FILE,
    IMAGES_MANIFEST,
    MANIFEST,
    OBJECTS_DIR,
    ObjectRecord,
    view_name,
)
from mvdream_platform.data.shards import SCHEMA as SHARD_SCHEMA
from mvdream_platform.data.shards import is_sharded, read_shards_manifest, record_from_row

__all__ = [
    "IMAGE_REASONS",
    "MULTIVIEW_REASONS",
    "BadRecord",
    "MultiViewDataset",
    "TextImageDataset",
    "list_image_shards",
    "read_multiview_manifest",
    "select_views",
    "validate_multiview",
    "validate_text_images",
    "warn_skip",
]

log = logging.getLogger(__name__)

MULTIVIEW_REASONS = {
    "missing_cameras": "no cameras.json: the object is incomplete (its render never finished)",
    "bad_json": "cameras.json is not valid JSON or lacks / mistypes a field",
    "missing_caption": "the caption is missing or empty",
    "num_views": "the rendered view count is not a positive multiple of num_views",
    "missing_view": "a chosen view_XXX.png does not exist",
    "bad_png": "a chosen view is not a decodable image (corrupt or truncated)",
    "wrong_size": "a view's size differs from cameras.json's resolution",
    "unreadable": "the storage raised an I/O error",
}
IMAGE_REASONS = {
    "bad_parquet": "the row group holding the row cannot be read",
    "missing_image": "the row / sample has no image bytes",
    "bad_image": "the image bytes are not a decodable image (corrupt or truncated)",
    "missing_caption": "the caption is missing, empty or not UTF-8",
    "wrong_size": "the decoded size differs from the row's width/height columns",
    "unreadable": "the storage raised an I/O error",
}

# Tags keep the random streams of different purposes independent for the same seed.
_TAG_MULTIVIEW_ITEM = 0x3D
_TAG_IMAGE_ITEM = 0x2D
_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_MAX_LISTED = 1000  # bad records named one by one in a validation report (counts are complete)


class BadRecord(Exception):
    """A record that cannot be used. ``reason`` is a short stable code used for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # keep reason/detail when pickled across processes
        return (type(self), (self.reason, self.detail))


# ----------------------------------------------------------------------------- warnings


class RateLimitedWarning:
    """Log the first ``burst`` warnings of each key, then at most one per ``interval_s``.

    Why: one corrupt shard can produce thousands of identical warnings per second, which would
    drown the training log; the counts (not the log) are the record of what was skipped.
    """

    def __init__(self, logger: logging.Logger, burst: int = 5, interval_s: float = 60.0):
        self.logger, self.burst, self.interval_s = logger, burst, interval_s
        self._seen: Counter[str] = Counter()
        self._suppressed: Counter[str] = Counter()
        self._last: dict[str, float] = {}

    def warn(self, key: str, message: str) -> bool:
        """Log ``message`` unless rate-limited; returns whether it was logged."""
        self._seen[key] += 1
        now = time.monotonic()
        if self._seen[key] > self.burst and now - self._last.get(key, -math.inf) < self.interval_s:
            self._suppressed[key] += 1
            return False
        suppressed = self._suppressed.pop(key, 0)
        suffix = f" ({suppressed} similar warnings suppressed)" if suppressed else ""
        self.logger.warning("%s%s", message, suffix)
        self._last[key] = now
        return True


_SKIP_WARNINGS = RateLimitedWarning(log)


def warn_skip(kind: str, where: str, error: BaseException) -> None:
    """Rate-limited warning for a skipped record (one rate limit per kind and reason)."""
    reason = getattr(error, "reason", type(error).__name__)
    _SKIP_WARNINGS.warn(f"{kind}/{reason}", f"skipping {kind} record {where}: {error}")


# ----------------------------------------------------------------------------- helpers


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return seed


def _check_resolution(resolution: object, allow_none: bool) -> int | None:
    if resolution is None and allow_none:
        return None
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive integer"
                         f"{' or None' if allow_none else ''}, got {resolution!r}")
    return resolution


def item_rng(tag: int, seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one item: a pure function of (tag, seed, epoch, index)."""
    return np.random.default_rng([tag, seed, epoch, index])


def _read(uri: str, missing_reason: str) -> bytes:
    """Bytes at ``uri``; a missing file or an I/O error becomes a :class:`BadRecord`."""
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError as error:
        raise BadRecord(missing_reason, f"{uri} does not exist") from error
    except OSError as error:
        raise BadRecord("unreadable", f"{uri}: {error}") from error


def decode_image(data: bytes, reason: str,
                 draft: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode image bytes fully (truncation is detected here, not later).

    Args:
        data: encoded PNG/JPEG/WebP bytes.
        reason: the :class:`BadRecord` reason raised when decoding fails.
        draft: optional (w, h) lower bound for JPEG draft decoding (a cheap DCT-domain
            downscale: the decoded image keeps both sides >= draft).

    Returns:
        (the loaded image, its stored (width, height) before any draft downscale).
    """
    try:
        # No context manager: closing would free the decoded pixels (the BytesIO needs none).
        img = Image.open(io.BytesIO(data))
        size = img.size
        if draft is not None:
            img.draft("RGB", draft)
        img.load()
        return img, size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadRecord(reason, f"{type(error).__name__}: {error}") from error


def image_to_unit(image: Image.Image) -> torch.Tensor:
    """(H, W, C) uint8 PIL image -> (C, H, W) float32 in [0, 1]."""
    # np.array, not asarray: PIL hands out a read-only buffer that torch warns about.
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255.0)


def composite_over(rgba: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Straight-alpha RGBA over a solid colour.

    Args:
        rgba: (N, 4, H, W) in [0, 1].
        background: (3,) in [0, 1].

    Returns:
        (N, 3, H, W) in [0, 1].
    """
    alpha = rgba[:, 3:]
    return rgba[:, :3] * alpha + background.view(1, 3, 1, 1) * (1.0 - alpha)


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> (N, C, size, size), antialiased bilinear.

    Bilinear with antialias is a triangle filter widened by the scale: no ringing or overshoot
    at the hard silhouette edges of renders (bicubic would brighten them).
    """
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)


def parse_background(background: object) -> tuple[float, float, float] | None:
    """``"random_grey"`` -> None (drawn per item); a name, grey level or RGB triple -> RGB."""
    named = {"white": 1.0, "black": 0.0, "grey": 0.5, "gray": 0.5}
    if background in ("random_grey", "random_gray"):
        return None
    if isinstance(background, str) and background in named:
        return (named[background],) * 3
    if isinstance(background, (int, float)) and not isinstance(background, bool):
        background = (background,) * 3
    if (isinstance(background, Sequence) and not isinstance(background, str)
            and len(background) == 3
            and all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in background)):
        return tuple(float(v) for v in background)
    raise ValueError("background must be 'random_grey', 'white', 'black', 'grey', a grey level "
                     f"in [0, 1] or an (r, g, b) triple in [0, 1], got {background!r}")


# ----------------------------------------------------------------------------- multi-view


def select_views(num_rendered: int, num_views: int, start: int) -> np.ndarray:
    """Indices of ``num_views`` rendered views evenly spaced in azimuth from view ``start``.

    With V = ``num_rendered`` evenly spaced azimuths (V divisible by ``num_views``), view
    ``start + j * V / num_views`` (mod V) for j = 0..num_views-1: with V = 32 and 4 views,
    ``k, k+8, k+16, k+24`` -- 90 degrees apart.

    Returns:
        (num_views,) int64.
    """
    if num_rendered < num_views or num_rendered % num_views:
        raise BadRecord("num_views", f"{num_rendered} rendered views cannot give {num_views} "
                        "evenly spaced views (need a positive multiple)")
    step = num_rendered // num_views
    return (start + step * np.arange(num_views, dtype=np.int64)) % num_rendered


def read_multiview_manifest(uri: str) -> tuple[list[dict[str, Any]], Counter[str]]:
    """The objects of a multi-view folder and a count of listing problems.

    Reads ``manifest.jsonl`` (the last line wins for a repeated object_id: a resumed job may
    append). Without a manifest, lists the object folders that have ``cameras.json`` (an
    interrupted prepare job may not have written it yet).

    Returns:
        (entries sorted by object_id, each a dict with at least ``object_id`` and ``path``;
        Counter of problems: ``bad_manifest_line``).
    """
    problems: Counter[str] = Counter()
    manifest_uri = storage.join(uri, MANIFEST)
    if not storage.exists(manifest_uri):
        return _glob_objects(uri), problems
    entries: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(storage.read_bytes(manifest_uri).decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            object_id = entry["object_id"]
            if not isinstance(object_id, str) or not object_id:
                raise ValueError("object_id must be a non-empty string")
        except (ValueError, KeyError, TypeError) as error:
            problems["bad_manifest_line"] += 1
            warn_skip("multiview", f"{manifest_uri}:{number}", BadRecord("bad_manifest_line",
                                                                            str(error)))
            continue
        entry.setdefault("path", f"{OBJECTS_DIR}/{object_id}")
        entries[object_id] = entry
    return [entries[k] for k in sorted(entries)], problems


def _glob_objects(uri: str) -> list[dict[str, Any]]:
    fs, root = url_to_fs(uri)
    pattern = f"{root.rstrip('/')}/{OBJECTS_DIR}/*/{CAMERAS_FILE}"
    ids = sorted(path.rstrip("/").split("/")[-2] for path in fs.glob(pattern))
    return [{"object_id": i, "path": f"{OBJECTS_DIR}/{i}"} for i in ids]


def read_object_record(folder: str) -> ObjectRecord:
    """Parse ``<folder>/cameras.json``; every problem becomes a :class:`BadRecord`."""
    raw = _read(storage.join(folder, CAMERAS_FILE), "missing_cameras")
    try:
        data = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as error:
        raise BadRecord("bad_json", f"{folder}/{CAMERAS_FILE}: {error}") from error
    if not isinstance(data, dict):
        raise BadRecord("bad_json", f"{folder}/{CAMERAS_FILE} is not a JSON object")
    caption = data.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise BadRecord("missing_caption", f"{folder}: caption {caption!r}")
    try:
        record = ObjectRecord.from_json(data)
        resolution = _check_resolution(record.resolution, allow_none=False)
        numbers = np.concatenate([np.asarray(record.camera_to_world, np.float64).ravel(),
                                  np.asarray(record.azimuths_deg, np.float64).ravel()])
        if not np.isfinite(numbers).all():
            raise ValueError("camera_to_world / azimuths_deg hold non-finite numbers")
    except (ValueError, TypeError) as error:
        raise BadRecord("bad_json", f"{folder}/{CAMERAS_FILE}: {error}") from error
    record.resolution = resolution
    return record


def read_view_rgba(folder: str, index: int, size: int) -> torch.Tensor:
    """View ``index`` of an object as (4, size, size) float32 straight-alpha RGBA in [0, 1]."""
    uri = storage.join(folder, view_name(index))
    image, stored = decode_image(_read(uri, "missing_view"), "bad_png")
    if stored != (size, size):
        raise BadRecord("wrong_size", f"{uri} is {stored[0]}x{stored[1]}, cameras.json says "
                        f"{size}x{size}")
    return image_to_unit(image.convert("RGBA"))


class _FolderObjects:
    """The objects of the per-object folder layout (``manifest.jsonl`` + ``objects/<id>/``)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.entries, self.listing_skips = read_multiview_manifest(uri)

    def folder(self, index: int) -> str:
        return storage.join(self.uri, self.entries[index]["path"])

    def record(self, index: int) -> ObjectRecord:
        return read_object_record(self.folder(index))

    def view_rgba(self, index: int, view: int, size: int) -> torch.Tensor:
        return read_view_rgba(self.folder(index), view, size)


class _ShardObjects:
    """The objects of multi-view parquet shards (:mod:`.shards`): one row each, read a row
    group at a time through a per-process LRU (shuffled access hits each group many times)."""

    def __init__(self, uri: str, cache_bytes: int = 256 * 2**20):
        self.uri, self.cache_bytes = uri, cache_bytes
        self.listing_skips: Counter[str] = Counter()
        self.shards = read_shards_manifest(uri)["shards"]
        self.starts = np.cumsum([0, *[int(s["rows"]) for s in self.shards]])
        self.entries = [{"object_id": o, "shard": k} for k, s in enumerate(self.shards)
                        for o in s.get("objects") or [f"{s['name']}#{r}" for r in range(s["rows"])]]
        self._groups: dict[int, np.ndarray] = {}  # shard -> row-group starts (read lazily)
        self._cache = _LRU(cache_bytes)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers start with empty caches
        return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_groups")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _cache=_LRU(state["cache_bytes"]), _groups={})

    def _row(self, index: int) -> tuple[dict[str, Any], str]:
        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        uri, local = storage.join(self.uri, self.shards[shard]["name"]), index - int(self.starts[shard])
        try:
            if shard not in self._groups:
                with fsspec.open(uri, "rb") as f:
                    meta = pq.ParquetFile(f).metadata
                self._groups[shard] = np.cumsum([0, *[meta.row_group(g).num_rows
                                                      for g in range(meta.num_row_groups)]])
        except (OSError, ValueError, pa.ArrowException) as error:
            raise BadRecord("bad_parquet", f"{uri}: {error}") from error
        starts = self._groups[shard]
        group = int(np.searchsorted(starts, local, side="right") - 1)
        if not 0 <= group < len(starts) - 1:
            raise BadRecord("bad_parquet", f"{uri} has {int(starts[-1])} rows, the manifest more")
        columns = self._cache.get_or_load((uri, group), lambda: _ParquetShard(
            uri, starts, tuple(SHARD_SCHEMA.names)).read_group(group))
        i = local - int(starts[group])
        return {name: values[i] for name, values in columns.items()}, f"{uri} row {local}"

    def record(self, index: int) -> ObjectRecord:
        row, where = self._row(index)
        try:
            record = record_from_row(row)
            record.resolution = _check_resolution(record.resolution, allow_none=False)
            if len(row["views"] or []) != record.num_views:
                raise ValueError(f"{len(row['views'] or [])} views for {record.num_views} cameras")
        except (ValueError, TypeError, KeyError) as error:
            raise BadRecord("bad_record", f"{where}: {error}") from error
        if not isinstance(record.caption, str) or not record.caption.strip():
            raise BadRecord("missing_caption", f"{where}: caption {record.caption!r}")
        return record

    def view_rgba(self, index: int, view: int, size: int) -> torch.Tensor:
        row, where = self._row(index)
        image, stored = decode_image(row["views"][view], "bad_png")
        if stored != (size, size):
            raise BadRecord("wrong_size", f"{where} view {view} is {stored[0]}x{stored[1]}, the "
                            f"record says {size}x{size}")
        return image_to_unit(image.convert("RGBA"))


class MultiViewDataset(Dataset):
    """Rendered objects as groups of views evenly spaced in azimuth (MVDream training items).

    Args:
        uri: folder (any fsspec URI) written by ``jobs/prepare_data.py source=shapes|meshes``.
        num_views: F, views per item. Each object's rendered view count V must be a multiple
            of F (else the object is skipped, reason ``num_views``).
        resolution: side of the returned views; stored views of another size are resized
            (antialiased bilinear). None: the most common stored resolution in the manifest.
        background: ``"random_grey"`` (one grey level per item, uniform in [0, 1], as MVDream
            trains), or a fixed colour: ``"white"``, ``"black"``, ``"grey"``, a grey level or
            an (r, g, b) triple in [0, 1].
        seed: with the epoch and the index, fixes every random choice of an item.

    An item (``dataset[i]`` at ``set_epoch``'s epoch, or ``load(i, epoch)``) is a dict:
        images: (F, 3, H, W) float32 in [-1, 1], RGBA composited over the background.
        cameras: (F, 16) float32, the stored c2w of each view with the translation normalised
            to unit length (``normalize_camera``, as MVDream does).
        azimuths_deg: (F,) float32 MVDream azimuths of the chosen views.
        view_indices: (F,) int64 indices of the chosen rendered views.
        background: (3,) float32 RGB in [0, 1].
        caption: str; attributes: dict; object_id: str.
    """

    def __init__(self, uri: str, num_views: int = 4, resolution: int | None = None,
                 background: object = "random_grey", seed: int = 0):
        if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
            raise ValueError(f"num_views must be a positive integer, got {num_views!r}")
        self.uri = str(uri).rstrip("/")
        self.num_views = num_views
        self.background = parse_background(background)
        self.seed = _check_seed(seed)
        self.epoch = 0
        self.objects = _ShardObjects(self.uri) if is_sharded(self.uri) else _FolderObjects(self.uri)
        self.entries, self.listing_skips = self.objects.entries, self.objects.listing_skips
        if not self.entries:
            raise ValueError(f"no finished objects in {self.uri!r} (no {MANIFEST} entries, no "
                             f"{OBJECTS_DIR}/*/{CAMERAS_FILE} and no shards)")
        self.resolution = _check_resolution(resolution, allow_none=True) or self._stored_size()

    def _stored_size(self) -> int:
        sizes = Counter(e["resolution"] for e in self.entries
                        if isinstance(e.get("resolution"), int) and e["resolution"] > 0)
        if sizes:
            return sizes.most_common(1)[0][0]
        for index in range(len(self.entries)):  # no manifest: ask the objects themselves
            try:
                return self.objects.record(index).resolution
            except BadRecord:
                continue
        raise ValueError(f"cannot infer the resolution of {self.uri!r}: pass resolution=")

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by ``__getitem__`` (``load`` takes it explicitly)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.load(index, self.epoch)

    def load(self, index: int, epoch: int | None = None) -> dict[str, Any]:
        """Item ``index`` at ``epoch`` (default: ``set_epoch``'s); raises :class:`BadRecord`."""
        epoch = self.epoch if epoch is None else int(epoch)
        record = self.objects.record(index)
        u_start, u_grey = item_rng(_TAG_MULTIVIEW_ITEM, self.seed, epoch, index).random(2)
        return multiview_item(record, lambda v: self.objects.view_rgba(index, v, record.resolution),
                              u_start, u_grey, self.num_views, self.resolution, self.background)


def multiview_item(record: ObjectRecord, read_view, u_start: float, u_grey: float,
                   num_views: int, resolution: int,
                   background: tuple[float, float, float] | None) -> dict[str, Any]:
    """One training item of an object: ``num_views`` views evenly spaced from a start view.

    ``read_view(v)`` returns view ``v`` as (4, S, S) straight-alpha RGBA in [0, 1]; ``u_start``
    and ``u_grey`` are the item's two uniforms (first view, grey level of a random background);
    ``background`` a fixed RGB or None (random grey). Shared by the map-style datasets and the
    Ray Data ingest, so both make the same item of the same record and uniforms.
    """
    views = select_views(record.num_views, num_views,
                         min(int(u_start * record.num_views), record.num_views - 1))
    rgba = torch.stack([read_view(int(v)) for v in views])
    fill = torch.tensor(background or (float(u_grey),) * 3, dtype=torch.float32)
    rgb = composite_over(rgba, fill)  # composite first: resizing straight alpha fringes
    if rgb.shape[-1] != resolution:
        rgb = resize_square(rgb, resolution)
    c2w = torch.from_numpy(np.asarray(record.camera_to_world, np.float64)[views])
    return {
        "images": rgb.mul_(2.0).sub_(1.0),
        "cameras": normalize_camera(c2w),
        "azimuths_deg": torch.tensor([record.azimuths_deg[v] for v in views], dtype=torch.float32),
        "view_indices": torch.from_numpy(views),
        "background": fill,
        "caption": record.caption,
        "attributes": dict(record.attributes),
        "object_id": record.object_id,
    }


# ----------------------------------------------------------------------------- text-image shards


@dataclass
class RawImageRow:
    """One text-image record before decoding."""

    key: str
    image: bytes | None
    caption: Any
    size: tuple[int, int] | None  # declared (width, height), when the shard has it
    where: str  # shard URI and row, for messages


@dataclass
class _ParquetShard:
    uri: str
    row_group_starts: np.ndarray  # (G + 1,) first row of each row group, then the row count
    columns: tuple[str, ...]

    @property
    def num_rows(self) -> int:
        return int(self.row_group_starts[-1])

    def read_group(self, group: int) -> tuple[dict[str, list], int]:
        """(columns of one row group as Python lists, their size in bytes); raises BadRecord."""
        try:
            with fsspec.open(self.uri, "rb") as f:
                table = pq.ParquetFile(f).read_row_group(group, columns=list(self.columns))
            return {name: table.column(name).to_pylist() for name in self.columns}, table.nbytes
        except (OSError, ValueError, pa.ArrowException) as error:
            raise BadRecord("bad_parquet", f"{self.uri} row group {group}: {error}") from error

    def read(self, row: int, cache: _LRU) -> RawImageRow:
        group = int(np.searchsorted(self.row_group_starts, row, side="right") - 1)
        columns = cache.get_or_load((self.uri, group), lambda: self.read_group(group))
        i = row - int(self.row_group_starts[group])

        def cell(name: str) -> Any:
            return columns[name][i] if name in columns else None

        key, width, height = cell("key"), cell("width"), cell("height")
        return RawImageRow(
            key=str(key) if key is not None else f"{self.uri.rsplit('/', 1)[-1]}#{row}",
            image=cell("image"), caption=cell("caption"),
            size=(int(width), int(height)) if width is not None and height is not None else None,
            where=f"{self.uri} row {row}")


@dataclass
class _TarMember:
    offset: int
    size: int


@dataclass
class _TarSample:
    key: str
    image: _TarMember | None = None
    text: _TarMember | None = None


@dataclass
class _TarShard:
    uri: str
    samples: list[_TarSample]

    @property
    def num_rows(self) -> int:
        return len(self.samples)

    def _member(self, member: _TarMember, reason: str) -> bytes:
        try:
            with fsspec.open(self.uri, "rb") as f:
                f.seek(member.offset)
                data = f.read(member.size)
        except OSError as error:
            raise BadRecord("unreadable", f"{self.uri}: {error}") from error
        if len(data) != member.size:
            raise BadRecord(reason, f"{self.uri}: member truncated ({len(data)} of "
                            f"{member.size} bytes)")
        return data

    def read(self, row: int, cache: _LRU) -> RawImageRow:
        sample = self.samples[row]
        image = self._member(sample.image, "bad_image") if sample.image is not None else None
        caption = None
        if sample.text is not None:
            try:
                caption = self._member(sample.text, "missing_caption").decode("utf-8")
            except UnicodeDecodeError as error:
                raise BadRecord("missing_caption", f"{self.uri} {sample.key}: {error}") from error
        return RawImageRow(key=sample.key, image=image, caption=caption, size=None,
                           where=f"{self.uri} sample {sample.key}")


class _LRU:
    """A tiny per-process LRU of read row groups, bounded in bytes (failures cached too).

    Why: parquet is read a row group at a time, so shuffled access to rows of one group would
    otherwise re-read the whole group per row. The newest entry is always kept, whatever its
    size.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes, self.nbytes = max_bytes, 0
        self._data: OrderedDict[Any, tuple[Any, int]] = OrderedDict()

    def get_or_load(self, key: Any, load) -> Any:
        """``load()`` returns (value, size in bytes) and may raise :class:`BadRecord`."""
        if key in self._data:
            self._data.move_to_end(key)
            value = self._data[key][0]
        else:
            try:
                value, size = load()
            except BadRecord as error:
                value, size = error, 0
            self._data[key] = (value, size)
            self.nbytes += size
            while self.nbytes > self.max_bytes and len(self._data) > 1:
                self.nbytes -= self._data.popitem(last=False)[1][1]
        if isinstance(value, BadRecord):
            raise BadRecord(value.reason, value.detail)
        return value


def list_image_shards(uri: str) -> tuple[list[str], Counter[str]]:
    """Shard URIs of a text-image folder: ``manifest.json``'s list, else ``*.parquet``/``*.tar``.

    Manifest shard entries may be names relative to ``uri``, absolute URIs, or dicts with a
    ``name``/``path`` field. Returns (shard URIs, Counter of listing problems).
    """
    problems: Counter[str] = Counter()
    manifest_uri = storage.join(uri, IMAGES_MANIFEST)
    if storage.exists(manifest_uri):
        try:
            shards = [_shard_uri(uri, s) for s in storage.read_json(manifest_uri)["shards"]]
            return shards, problems
        except (ValueError, KeyError, TypeError) as error:
            problems["bad_manifest"] += 1
            warn_skip("image", manifest_uri, BadRecord("bad_manifest", f"{error}; globbing"))
    fs, root = url_to_fs(uri)
    root = root.rstrip("/")
    names = sorted(p[len(root):].lstrip("/") for ext in ("parquet", "tar")
                   for p in fs.glob(f"{root}/*.{ext}"))
    return [storage.join(uri, n) for n in names], problems


def _shard_uri(uri: str, entry: Any) -> str:
    name = entry.get("name") or entry.get("path") if isinstance(entry, dict) else entry
    if not isinstance(name, str) or not name:
        raise ValueError(f"bad shard entry {entry!r}")
    return name if "://" in name or name.startswith("/") else storage.join(uri, name)


def _index_parquet(uri: str) -> _ParquetShard:
    with fsspec.open(uri, "rb") as f:
        meta = pq.ParquetFile(f).metadata
    names = set(meta.schema.names)
    if "image" not in names:
        raise ValueError(f"{uri} has no 'image' column (columns: {sorted(names)})")
    columns = tuple(c for c in ("key", "image", "caption", "width", "height") if c in names)
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    return _ParquetShard(uri, np.cumsum([0, *sizes]), columns)


def _split_key(name: str) -> tuple[str, str]:
    """Webdataset naming: ``dir/0001.jpg`` -> (``dir/0001``, ``jpg``) (first dot of the basename)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _index_tar(uri: str) -> tuple[_TarShard, str | None]:
    """Samples of a tar shard (key -> image/text member offsets); a truncated tar keeps the
    samples listed before the damage and returns the error."""
    samples: dict[str, _TarSample] = {}
    error = None
    with fsspec.open(uri, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, OSError, EOFError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                break
            if info is None:
                break
            if not info.isfile():
                continue
            key, ext = _split_key(info.name)
            sample = samples.setdefault(key, _TarSample(key))
            if ext in _IMAGE_EXTENSIONS:
                sample.image = _TarMember(info.offset_data, info.size)
            elif ext == "txt":
                sample.text = _TarMember(info.offset_data, info.size)
    return _TarShard(uri, list(samples.values())), error


def _index_shard(uri: str) -> tuple[_ParquetShard | _TarShard | None, str | None, str | None]:
    """(shard index or None, problem code, problem detail)."""
    try:
        if uri.endswith(".tar"):
            shard, error = _index_tar(uri)
            return shard, ("truncated_tar" if error else None), error
        return _index_parquet(uri), None, None
    except FileNotFoundError as error:
        return None, "missing_shard", str(error)
    except (OSError, ValueError, tarfile.TarError, pa.ArrowException) as error:
        return None, "bad_shard", f"{type(error).__name__}: {error}"


def index_image_shards(uri: str) -> tuple[list[_ParquetShard | _TarShard], Counter[str],
                                          list[dict[str, str]]]:
    """Index every shard (parquet footers / tar headers; threads: remote reads are latency-bound).

    Returns:
        (usable shards, Counter of listing problems, one dict per problem shard).
    """
    uris, problems = list_image_shards(uri)
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(uris)))) as pool:
        results = list(pool.map(_index_shard, uris))
    shards, bad = [], []
    for shard_uri, (shard, code, detail) in zip(uris, results):
        if code is not None:
            problems[code] += 1
            bad.append({"shard": shard_uri, "reason": code, "detail": detail})
            warn_skip("image", shard_uri, BadRecord(code, detail or ""))
        if shard is not None and shard.num_rows:
            shards.append(shard)
    return shards, problems, bad


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB image; transparency is composited over white (how browsers show LAION images)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, resolution: int, crop_uv: tuple[float, float] | None
                    ) -> Image.Image:
    """Resize so the shorter side is ``resolution`` (antialiased bicubic), then crop a square.

    Args:
        crop_uv: None for the centre crop, else (u, v) in [0, 1) placing a random crop.
    """
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    slack_x, slack_y = size[0] - resolution, size[1] - resolution
    if crop_uv is None:
        left, top = slack_x // 2, slack_y // 2
    else:
        left, top = int(crop_uv[0] * (slack_x + 1)), int(crop_uv[1] * (slack_y + 1))
    return image.crop((left, top, left + resolution, top + resolution))


class TextImageDataset(Dataset):
    """Image-caption pairs from parquet shards (LAION style) or webdataset tar shards.

    Args:
        uri: folder (any fsspec URI) of ``*.parquet`` shards (columns key, image, caption,
            width, height; only ``image`` is required) and/or ``*.tar`` shards
            (``<key>.jpg|jpeg|png|webp`` + ``<key>.txt``). Shards come from ``manifest.json``
            when present, else by globbing.
        resolution: side of the returned square images.
        crop: ``"center"`` or ``"random"`` (a random square after the shorter-side resize).
        seed: with the epoch and the index, fixes the random crop.
        cache_mb: parquet row groups kept per process (MB of encoded images). Random access
            reads a whole row group per miss: write shards with small row groups (tens of
            rows), or keep the data set within the cache.

    An item is a dict: images (1, 3, H, W) float32 in [-1, 1]; caption: str; key: str.
    """

    def __init__(self, uri: str, resolution: int, *, crop: str = "center", seed: int = 0,
                 cache_mb: float = 256.0):
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        self.uri = str(uri).rstrip("/")
        self.resolution = _check_resolution(resolution, allow_none=False)
        self.crop, self.seed, self.epoch = crop, _check_seed(seed), 0
        self.shards, self.listing_skips, self.bad_shards = index_image_shards(self.uri)
        self._starts = np.cumsum([0, *(s.num_rows for s in self.shards)])
        if len(self) == 0:
            raise ValueError(f"no readable text-image rows in {self.uri!r} "
                             f"(listing problems: {dict(self.listing_skips)})")
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache = _LRU(self.cache_bytes)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None  # never ship cached row groups to worker processes
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cache = _LRU(self.cache_bytes)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def read_raw(self, index: int) -> RawImageRow:
        """The undecoded record ``index`` (raises :class:`BadRecord` for unreadable rows)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        return self.shards[shard].read(index - int(self._starts[shard]), self._cache)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.load(index, self.epoch)

    def load(self, index: int, epoch: int | None = None) -> dict[str, Any]:
        """Item ``index`` at ``epoch`` (default: ``set_epoch``'s); raises :class:`BadRecord`."""
        epoch = self.epoch if epoch is None else int(epoch)
        crop_uv = item_rng(_TAG_IMAGE_ITEM, self.seed, epoch, index).random(2)
        return text_image_item(self.read_raw(index), crop_uv, self.resolution, self.crop)


def text_image_item(raw: RawImageRow, crop_uv, resolution: int, crop: str) -> dict[str, Any]:
    """One training item of a text-image row (``crop_uv``: the random crop's two uniforms)."""
    caption = check_caption(raw)
    image = decode_row(raw, draft=(resolution, resolution))
    image = resize_and_crop(image, resolution, None if crop == "center" else tuple(crop_uv))
    images = image_to_unit(image).mul_(2.0).sub_(1.0)
    return {"images": images[None], "caption": caption, "key": raw.key}


def check_caption(raw: RawImageRow) -> str:
    if not isinstance(raw.caption, str) or not raw.caption.strip():
        raise BadRecord("missing_caption", f"{raw.where}: caption {raw.caption!r}")
    return raw.caption


def decode_row(raw: RawImageRow, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode and check a row's image -> RGB PIL image (raises :class:`BadRecord`)."""
    if not raw.image:
        raise BadRecord("missing_image", raw.where)
    image, size = decode_image(raw.image, "bad_image", draft=draft)
    if raw.size is not None and raw.size != size:
        raise BadRecord("wrong_size", f"{raw.where}: image is {size[0]}x{size[1]}, columns say "
                        f"{raw.size[0]}x{raw.size[1]}")
    return to_rgb(image)


# ----------------------------------------------------------------------------- validation


def _object_folders(uri: str) -> tuple[set[str], set[str]]:
    """(every folder under objects/, the folders that have cameras.json)."""
    fs, root = url_to_fs(uri)
    objects = f"{root.rstrip('/')}/{OBJECTS_DIR}"
    if not fs.exists(objects):
        return set(), set()
    folders = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(objects, detail=False)
               if fs.isdir(p)}
    complete = {p.rstrip("/").split("/")[-2] for p in fs.glob(f"{objects}/*/{CAMERAS_FILE}")}
    return folders, complete


def _check_object(folder: str, num_views: int) -> None:
    """Every view of one object decodes at the declared size (raises :class:`BadRecord`)."""
    record = read_object_record(folder)
    select_views(record.num_views, num_views, 0)
    for v in range(record.num_views):
        read_view_rgba(folder, v, record.resolution)


def validate_multiview(uri: str, num_views: int = 4) -> dict[str, Any]:
    """Check a whole multi-view folder: every object of the manifest, every view.

    Returns a JSON-able report: ``ok`` (bool: nothing is wrong); counts ``objects_listed``
    (manifest objects), ``objects_ok``, ``objects_bad``, ``objects_incomplete`` (object
    folders without cameras.json: renders that never finished), ``objects_unlisted``
    (complete folders missing from the manifest), ``reasons`` (bad objects per reason),
    ``manifest_errors``; lists (first 1000 each): ``bad`` (``{"object_id", "reason",
    "detail"}``), ``incomplete``, ``unlisted`` (object ids).
    """
    uri = str(uri).rstrip("/")
    if is_sharded(uri):
        return _validate_multiview_shards(uri, num_views)
    entries, problems = read_multiview_manifest(uri)
    folders, complete = _object_folders(uri)
    bad, reasons = [], Counter()
    for entry in entries:
        try:
            _check_object(storage.join(uri, entry["path"]), num_views)
        except BadRecord as error:
            reasons[error.reason] += 1
            if len(bad) < _MAX_LISTED:
                bad.append({"object_id": entry["object_id"], "reason": error.reason,
                            "detail": error.detail})
    listed = {e["object_id"] for e in entries}
    incomplete, unlisted = sorted(folders - complete), sorted(complete - listed)
    n_bad = sum(reasons.values())
    return {
        "uri": uri, "kind": "multiview", "num_views": num_views,
        "ok": n_bad == 0 and not incomplete and not unlisted and not problems,
        "objects_listed": len(entries), "objects_ok": len(entries) - n_bad,
        "objects_bad": n_bad, "objects_incomplete": len(incomplete),
        "objects_unlisted": len(unlisted), "reasons": dict(reasons),
        "manifest_errors": dict(problems), "bad": bad, "incomplete": incomplete[:_MAX_LISTED],
        "unlisted": unlisted[:_MAX_LISTED],
    }


def _validate_multiview_shards(uri: str, num_views: int) -> dict[str, Any]:
    """:func:`validate_multiview` of a sharded set: every row's record and every view decoded."""
    objects = _ShardObjects(uri)
    bad, reasons = [], Counter()
    for index, entry in enumerate(objects.entries):
        try:
            record = objects.record(index)
            if record.num_views % num_views:
                raise BadRecord("num_views", f"{record.num_views} views, not a multiple of {num_views}")
            for view in range(record.num_views):
                objects.view_rgba(index, view, record.resolution)
        except BadRecord as error:
            reasons[error.reason] += 1
            if len(bad) < _MAX_LISTED:
                bad.append({"object_id": entry["object_id"], "reason": error.reason, "detail": error.detail})
    n_bad = sum(reasons.values())
    return {"uri": uri, "kind": "multiview", "layout": "shards", "num_views": num_views,
            "ok": n_bad == 0, "shards": len(objects.shards), "objects_listed": len(objects.entries),
            "objects_ok": len(objects.entries) - n_bad, "objects_bad": n_bad, "reasons": dict(reasons),
            "bad": bad}


def _check_rows(shards: list[_ParquetShard | _TarShard]) -> Iterator[tuple[str, str | None,
                                                                          BadRecord | None]]:
    """(where, key, problem or None) for every row, read sequentially."""
    cache = _LRU(0)  # sequential: one row group at a time
    for shard in shards:
        for row in range(shard.num_rows):
            where, key = f"{shard.uri} row {row}", None
            try:
                raw = shard.read(row, cache)
                where, key = raw.where, raw.key
                check_caption(raw)
                decode_row(raw)
                yield where, key, None
            except BadRecord as error:
                yield where, key, error


def validate_text_images(uri: str) -> dict[str, Any]:
    """Check every row of a text-image folder (image decodes at its declared size, caption).

    Returns a JSON-able report: ``ok`` (bool: nothing is wrong); counts ``shards``
    (readable), ``rows_listed`` (rows in them), ``rows_ok``, ``rows_bad``, ``reasons`` (bad
    rows per reason), ``manifest_rows`` (the manifest's row count, None without one),
    ``listing_problems`` (unreadable shards etc.: their rows are not counted); lists: ``bad``
    (first 1000 of ``{"where", "key", "reason", "detail"}``), ``bad_shards`` (``{"shard",
    "reason", "detail"}``).
    """
    uri = str(uri).rstrip("/")
    shards, problems, bad_shards = index_image_shards(uri)
    bad, reasons, rows = [], Counter(), 0
    for where, key, error in _check_rows(shards):
        rows += 1
        if error is not None:
            reasons[error.reason] += 1
            if len(bad) < _MAX_LISTED:
                bad.append({"where": where, "key": key, "reason": error.reason,
                            "detail": error.detail})
    manifest_rows = None
    if storage.exists(storage.join(uri, IMAGES_MANIFEST)):
        try:
            manifest_rows = storage.read_json(storage.join(uri, IMAGES_MANIFEST)).get("rows")
        except (ValueError, AttributeError):
            manifest_rows = None
    n_bad = sum(reasons.values())
    return {
        "uri": uri, "kind": "images",
        "ok": n_bad == 0 and not problems and manifest_rows in (None, rows),
        "shards": len(shards), "rows_listed": rows, "rows_ok": rows - n_bad, "rows_bad": n_bad,
        "manifest_rows": manifest_rows, "reasons": dict(reasons),
        "listing_problems": dict(problems), "bad": bad, "bad_shards": bad_shards,
    }
