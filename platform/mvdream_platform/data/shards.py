"""Multi-view records as parquet shards: one row per object, all of its views inside the row.

The per-object folder layout (:mod:`.layout`) is one PNG per view: at the paper's scale
(about 350K objects x 32 views) that is 11 million small files and thousands of object-store
requests per training step. A shard holds ``objects_per_shard`` objects, one row each::

    OUT/
      mv-shard-00000.parquet ...   columns (see SCHEMA): object_id, caption, attributes (JSON
                                   text), resolution, azimuths_deg, elevation_deg, fovy_deg,
                                       distance, camera_to_world (V*16 floats, row-major),
                                   extra (JSON text), views (V PNG byte strings, view order)
      shards.json                  {"kind": "multiview", "layout_version", "shards": [{"name",
                                    "rows", "objects": [ids]}], "rows": N} (rewritten after
                                    every shard: a resumed job skips the objects it lists)

Why parquet (not webdataset tar): the text-image data already uses it and pyarrow reads it;
a reader can take the small columns (captions, cameras) without the image bytes; a row group
is the unit of reading, so a shuffled reader caches row groups (``datasets._LRU``); and Ray
Data reads it natively (``ray.data.read_parquet``), one block per row group.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from .layout import CAMERAS_FILE, OBJECTS_DIR, ObjectRecord, view_name

log = logging.getLogger(__name__)

SHARDS_MANIFEST = "shards.json"
SHARD_PATTERN = "mv-shard-{index:05d}.parquet"
SHARDS_LAYOUT_VERSION = 1
ROWS_PER_GROUP = 16  # objects per parquet row group: the unit a shuffled reader fetches

SCHEMA = pa.schema([
    ("object_id", pa.string()), ("caption", pa.string()), ("attributes", pa.string()),
    ("resolution", pa.int32()), ("azimuths_deg", pa.list_(pa.float64())),
    ("elevation_deg", pa.float64()), ("fovy_deg", pa.float64()), ("distance", pa.float64()),
    ("camera_to_world", pa.list_(pa.float64())), ("extra", pa.string()),
    ("views", pa.list_(pa.binary())),
])

__all__ = ["SCHEMA", "SHARDS_MANIFEST", "append_shard", "ensure_manifest", "is_sharded", "read_shards_manifest",
           "record_from_row", "row_of", "rows_of_objects", "sharded_objects", "write_shard"]


def is_sharded(uri: str) -> bool:
    """True when ``uri`` holds multi-view shards (a ``shards.json``)."""
    return storage.exists(storage.join(uri, SHARDS_MANIFEST))


def read_shards_manifest(uri: str) -> dict[str, Any]:
    """``shards.json`` of ``uri`` (an empty manifest when there is none yet)."""
    path = storage.join(uri, SHARDS_MANIFEST)
    if not storage.exists(path):
        return {"kind": "multiview", "layout_version": SHARDS_LAYOUT_VERSION, "shards": [], "rows": 0}
    manifest = storage.read_json(path)
    if manifest.get("kind") != "multiview" or not isinstance(manifest.get("shards"), list):
        raise ValueError(f"{path} is not a multi-view shard manifest")
    return manifest


def row_of(record: ObjectRecord, views: list[bytes]) -> dict[str, Any]:
    """One shard row: the record's fields and its views' PNG bytes (view order)."""
    if len(views) != record.num_views:
        raise ValueError(f"{record.object_id}: {len(views)} views for {record.num_views} cameras")
    return {"object_id": record.object_id, "caption": record.caption,
            "attributes": json.dumps(record.attributes, sort_keys=True),
            "resolution": int(record.resolution), "azimuths_deg": [float(a) for a in record.azimuths_deg],
            "elevation_deg": float(record.elevation_deg), "fovy_deg": float(record.fovy_deg),
            "distance": float(record.distance),
            "camera_to_world": [float(x) for m in record.camera_to_world for r in m for x in r],
            "extra": json.dumps(record.extra, sort_keys=True), "views": list(views)}


def record_from_row(row: dict[str, Any]) -> ObjectRecord:
    """A shard row back to its :class:`ObjectRecord` (raises ValueError/TypeError if malformed)."""
    flat = row["camera_to_world"]
    if flat is None or len(flat) % 16:
        raise ValueError(f"camera_to_world holds {0 if flat is None else len(flat)} numbers, not V*16")
    c2w = [[list(flat[k + 4 * r: k + 4 * r + 4]) for r in range(4)] for k in range(0, len(flat), 16)]
    return ObjectRecord.from_json({
        "object_id": row["object_id"], "caption": row["caption"],
        "attributes": json.loads(row["attributes"] or "{}"), "resolution": row["resolution"],
        "azimuths_deg": list(row["azimuths_deg"]), "elevation_deg": row["elevation_deg"],
        "fovy_deg": row["fovy_deg"], "distance": row["distance"], "camera_to_world": c2w,
        "extra": json.loads(row.get("extra") or "{}")})


def write_shard(rows: list[dict[str, Any]], uri: str) -> None:
    """Write ``rows`` as one parquet file at ``uri``, atomically (readers never see half of it)."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=ROWS_PER_GROUP, compression="none")  # PNGs are compressed
    storage.write_bytes(uri, sink.getvalue())


def rows_of_objects(folder_uri: str, object_ids: Iterable[str]) -> list[dict[str, Any]]:
    """Rows of finished objects of a folder layout (``objects/<id>/``); raises on a bad one."""
    rows = []
    for object_id in object_ids:
        folder = storage.join(folder_uri, OBJECTS_DIR, object_id)
        record = ObjectRecord.from_json(storage.read_json(storage.join(folder, CAMERAS_FILE)))
        views = [storage.read_bytes(storage.join(folder, view_name(v))) for v in range(record.num_views)]
        rows.append(row_of(record, views))
    return rows


def append_shard(out_uri: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Write ``rows`` as the next shard of ``out_uri`` and record it in ``shards.json``."""
    manifest = read_shards_manifest(out_uri)
    name = SHARD_PATTERN.format(index=len(manifest["shards"]))
    write_shard(rows, storage.join(out_uri, name))
    manifest["shards"].append({"name": name, "rows": len(rows),
                               "objects": [r["object_id"] for r in rows]})
    manifest["rows"] = sum(s["rows"] for s in manifest["shards"])
    storage.write_json(storage.join(out_uri, SHARDS_MANIFEST), manifest)  # the commit
    return manifest


def ensure_manifest(out_uri: str) -> dict[str, Any]:
    """Write an empty ``shards.json`` when ``out_uri`` has none (a set that rendered nothing is
    still a sharded set); returns the manifest."""
    manifest = read_shards_manifest(out_uri)
    if not is_sharded(out_uri):
        storage.write_json(storage.join(out_uri, SHARDS_MANIFEST), manifest)
    return manifest


def sharded_objects(out_uri: str) -> set[str]:
    """Object ids already in a shard of ``out_uri``."""
    return {o for s in read_shards_manifest(out_uri)["shards"] for o in s.get("objects", [])}
