"""The on-disk layout of prepared data (any fsspec URI), shared by writers and readers.

Multi-view renders (``jobs/prepare_data.py source=shapes|meshes``)::

    OUT/
      manifest.jsonl                 one JSON line per finished object (see ObjectRecord)
      objects/<object_id>/
        view_000.png ... view_{V-1}.png   RGBA, resolution x resolution, straight alpha
        cameras.json                      written LAST: its presence marks the object complete

``cameras.json`` holds every field of :class:`ObjectRecord` plus the per-view cameras:
``azimuths_deg`` (V,) in MVDream's convention (evenly spaced from 0), ``camera_to_world``
(V, 4, 4) nested lists (z-up world, OpenGL camera axes, at the rendered distance: NOT
normalised; readers normalise for the model), one ``elevation_deg``/``fovy_deg``/``distance``
per object.

Text-image pairs (``source=images``), LAION style::

    OUT/
      shard-00000.parquet ...        columns: key (str), image (PNG/JPEG bytes), caption (str),
                                     width (int), height (int)
      manifest.json                  {"shards": [...], "rows": N, "source": ...}

Webdataset tar shards (``*.tar`` with ``<key>.jpg|png`` + ``<key>.txt``) are read too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST = "manifest.jsonl"
OBJECTS_DIR = "objects"
CAMERAS_FILE = "cameras.json"
IMAGES_MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{index:05d}.parquet"
LAYOUT_VERSION = 1


def view_name(index: int) -> str:
    """File name of view ``index`` inside an object folder."""
    return f"view_{index:03d}.png"


@dataclass
class ObjectRecord:
    """One rendered object: what ``cameras.json`` holds and the manifest lists.

    Attributes:
        object_id: folder name under ``objects/`` (letters, digits, ``-``, ``_``).
        caption: the text prompt describing the object.
        attributes: structured facts (shapes, colours, relation, source file, ...).
        resolution: side of every view in pixels.
        azimuths_deg: (V,) MVDream azimuth of each view, degrees.
        elevation_deg, fovy_deg, distance: shared by the object's views.
        camera_to_world: (V, 4, 4) nested lists.
    """

    object_id: str
    caption: str
    attributes: dict[str, Any]
    resolution: int
    azimuths_deg: list[float]
    elevation_deg: float
    fovy_deg: float
    distance: float
    camera_to_world: list[list[list[float]]]
    layout_version: int = LAYOUT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_views(self) -> int:
        return len(self.azimuths_deg)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def manifest_entry(self) -> dict[str, Any]:
        """The manifest line: everything but the per-view matrices."""
        entry = self.to_json()
        entry.pop("camera_to_world")
        entry["num_views"] = self.num_views
        entry["path"] = f"{OBJECTS_DIR}/{self.object_id}"
        return entry

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ObjectRecord:
        """Parse ``cameras.json``; raises ``ValueError`` naming a missing or bad field."""
        required = ("object_id", "caption", "attributes", "resolution", "azimuths_deg",
                    "elevation_deg", "fovy_deg", "distance", "camera_to_world")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"cameras.json lacks fields {missing}")
        record = cls(**{k: data[k] for k in required},
                     layout_version=int(data.get("layout_version", LAYOUT_VERSION)),
                     extra=dict(data.get("extra", {})))
        if len(record.camera_to_world) != record.num_views:
            raise ValueError(
                f"cameras.json: {record.num_views} azimuths but {len(record.camera_to_world)} cameras"
            )
        if any(len(m) != 4 or any(len(row) != 4 for row in m) for m in record.camera_to_world):
            raise ValueError("cameras.json: camera_to_world must be a list of 4x4 matrices")
        return record
