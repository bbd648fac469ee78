"""Ray Data ingest of the training mixture: sharded records streamed, decoded on whichever
CPUs the cluster has, split across the Ray Train workers.

Driver side (:func:`build_datasets`): each kind is ``ray.data.read_parquet`` over its shards
(multi-view shards of :mod:`.shards`, LAION-style text-image shards), repeated for the epochs
the run needs, each epoch's block order shuffled with its own seed, decoded by
``map_batches`` (view selection, random grey background, PNG/JPEG decode, resize: the same
:func:`.datasets.multiview_item` / :func:`.datasets.text_image_item` the map-style datasets
use). Ray Train's ``DataConfig`` splits both datasets across the workers.

Worker side (:class:`RayDataMixture`): every step has the kind the shared planner gives it
(:func:`.mixture.step_kind`: every rank runs the same kind, the 70/30 mixture kept), and takes
the next ``batch`` good rows of that kind from its own split. A bad record is decoded to a row
flagged ``ok=False`` with its reason: the worker skips it, counts it, and takes the next row,
so every batch is full.

What is deterministic: the kinds of the steps; the content of an item (views, background,
crop) as a function of (seed, epoch, record); each epoch's block order. What is not: which
worker receives which block, and so the order of items within a worker's stream (Ray Data's
streaming split hands blocks to whichever worker asks first). Resuming after a failure starts
each kind's stream at the epoch the checkpoint had reached (the rows of that epoch already seen
are seen again; no run starts again from epoch 0).
"""

from __future__ import annotations

import json
import math
import zlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .. import storage
from .datasets import (
    _TAG_IMAGE_ITEM,
    _TAG_MULTIVIEW_ITEM,
    BadRecord,
    RawImageRow,
    decode_image,
    image_to_unit,
    item_rng,
    list_image_shards,
    multiview_item,
    parse_background,
    text_image_item,
)
from .mixture import IMAGE, MULTIVIEW, TrainingBatch, step_kind
from .shards import read_shards_manifest, record_from_row

__all__ = ["DecodeImages", "DecodeMultiView", "RayDataMixture", "build_datasets", "epochs_needed",
           "read_group", "work_items"]

MULTIVIEW_COLUMNS = ["object_id", "caption", "attributes", "resolution", "azimuths_deg",
                     "elevation_deg", "fovy_deg", "distance", "camera_to_world", "extra", "views"]


def record_id(name: str) -> int:
    """A stable integer of a record's id (its per-epoch random stream is keyed on it)."""
    return zlib.crc32(name.encode())


class DecodeMultiView:
    """``map_batches`` of multi-view shard rows -> training items (numpy columns)."""

    def __init__(self, num_views: int, resolution: int, background: object, seed: int):
        self.num_views, self.resolution, self.seed = num_views, resolution, seed
        self.background = parse_background(background)

    def empty(self) -> dict[str, np.ndarray]:
        return self({name: np.empty(0, object) for name in MULTIVIEW_COLUMNS} | {"epoch": np.empty(0, np.int64)})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, f, r = len(batch["object_id"]), self.num_views, self.resolution
        out = {"images": np.zeros((n, f, 3, r, r), np.float32), "cameras": np.zeros((n, f, 16), np.float32),
               "azimuths_deg": np.zeros((n, f), np.float32), "caption": np.empty(n, object),
               "object_id": np.empty(n, object), "attributes": np.empty(n, object),
               "ok": np.zeros(n, bool), "reason": np.empty(n, object),
               "epoch": np.asarray(batch["epoch"], np.int64)}
        for i in range(n):
            row = {name: batch[name][i] for name in MULTIVIEW_COLUMNS}
            epoch = int(batch["epoch"][i])
            out["object_id"][i], out["caption"][i], out["attributes"][i], out["reason"][i] = (
                str(row["object_id"]), "", "{}", "")
            try:
                record = record_from_row(row)
                views = list(row["views"])

                def read_view(v: int, views=views, size=record.resolution) -> torch.Tensor:
                    image, stored = decode_image(views[v], "bad_png")
                    if stored != (size, size):
                        raise BadRecord("wrong_size", f"view {v} is {stored}, not {size}x{size}")
                    return image_to_unit(image.convert("RGBA"))

                u_start, u_grey = item_rng(_TAG_MULTIVIEW_ITEM, self.seed, epoch,
                                           record_id(record.object_id)).random(2)
                item = multiview_item(record, read_view, u_start, u_grey, f, r, self.background)
            except BadRecord as error:
                out["reason"][i] = error.reason
                continue
            except (ValueError, TypeError, KeyError, IndexError) as error:
                out["reason"][i] = f"bad_record:{type(error).__name__}"
                continue
            out["images"][i], out["cameras"][i] = item["images"].numpy(), item["cameras"].numpy()
            out["azimuths_deg"][i] = item["azimuths_deg"].numpy()
            out["caption"][i], out["attributes"][i] = item["caption"], json.dumps(item["attributes"])
            out["ok"][i] = True
        return out


class DecodeImages:
    """``map_batches`` of text-image shard rows -> training items (numpy columns)."""

    def __init__(self, resolution: int, crop: str, seed: int):
        self.resolution, self.crop, self.seed = resolution, crop, seed

    def empty(self) -> dict[str, np.ndarray]:
        return self({"image": np.empty(0, object), "caption": np.empty(0, object),
                     "epoch": np.empty(0, np.int64)})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, r = len(batch["image"]), self.resolution
        out = {"images": np.zeros((n, 3, r, r), np.float32), "caption": np.empty(n, object),
               "key": np.empty(n, object), "ok": np.zeros(n, bool), "reason": np.empty(n, object),
               "epoch": np.asarray(batch["epoch"], np.int64)}
        for i in range(n):
            key = str(batch["key"][i]) if "key" in batch else f"row-{i}"
            out["key"][i], out["caption"][i], out["reason"][i] = key, "", ""
            width = batch["width"][i] if "width" in batch else None
            height = batch["height"][i] if "height" in batch else None
            raw = RawImageRow(key=key, image=batch["image"][i], caption=batch["caption"][i],
                              size=(int(width), int(height)) if width is not None and height is not None else None,
                              where=key)
            crop_uv = item_rng(_TAG_IMAGE_ITEM, self.seed, int(batch["epoch"][i]), record_id(key)).random(2)
            try:
                item = text_image_item(raw, crop_uv, r, self.crop)
            except BadRecord as error:
                out["reason"][i] = error.reason
                continue
            out["images"][i], out["caption"][i], out["ok"][i] = item["images"][0].numpy(), item["caption"], True
        return out


def epochs_needed(steps: int, batch: int, world: int, share: float, records: int) -> int:
    """Epochs of one kind that ``steps`` steps consume (a 10% margin for skipped records)."""
    if records <= 0 or share <= 0:
        return 0
    return max(1, math.ceil(1.1 * steps * share * batch * world / records) + 1)


def row_groups(files: list[str]) -> list[tuple[str, int]]:
    """(file, row group) of every row group of the parquet ``files`` (footers only)."""
    import fsspec
    import pyarrow.parquet as pq

    out = []
    for uri in files:
        with fsspec.open(uri, "rb") as f:
            out += [(uri, g) for g in range(pq.ParquetFile(f).metadata.num_row_groups)]
    return out


def read_group(item: dict[str, Any], columns: list[str] | None = None) -> list[dict[str, Any]]:
    """``flat_map`` of one work item ``{"epoch", "file", "group"}`` -> its rows, with the epoch.

    An unreadable row group becomes one row flagged ``bad_parquet`` (counted, never fatal)."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with fsspec.open(item["file"], "rb") as f:
            table = pq.ParquetFile(f).read_row_group(int(item["group"]), columns=columns)
    except (OSError, ValueError, pa.ArrowException):
        return [{"epoch": item["epoch"], "unreadable": f"{item['file']} row group {item['group']}"}]
    return [dict(row, epoch=item["epoch"], unreadable="") for row in table.to_pylist()]


def _decode(batch: dict[str, np.ndarray], decoder) -> dict[str, np.ndarray]:
    """``map_batches``: rows of an unreadable row group pass through flagged, others decode."""
    bad = np.asarray([bool(u) for u in batch.get("unreadable", [""] * len(batch["epoch"]))])
    if not bad.any():
        return decoder({k: v for k, v in batch.items() if k != "unreadable"})
    good = {k: v[~bad] for k, v in batch.items() if k != "unreadable"}
    decoded = decoder(good) if (~bad).any() else None
    n, out = len(bad), {}
    template = decoded if decoded is not None else decoder.empty()
    for name, column in template.items():
        full = np.zeros((n, *column.shape[1:]), column.dtype) if column.dtype != object else np.empty(n, object)
        if decoded is not None:
            full[~bad] = column
        out[name] = full
    out["ok"][bad], out["reason"][bad], out["epoch"] = False, "bad_parquet", np.asarray(batch["epoch"], np.int64)
    for i in np.flatnonzero(bad):
        for name in ("caption", "object_id", "key", "attributes"):
            if name in out:
                out[name][i] = "{}" if name == "attributes" else ""
    return out


def work_items(files: list[str], first_epoch: int, epochs: int, seed: int, tag: int) -> list[dict[str, Any]]:
    """(epoch, file, row group) items of ``epochs`` epochs from ``first_epoch``; each epoch's
    row groups in their own seeded order."""
    groups = row_groups(files)
    items = []
    for epoch in range(first_epoch, first_epoch + epochs):
        order = np.random.default_rng([tag, seed, epoch]).permutation(len(groups))
        items += [{"epoch": epoch, "file": groups[k][0], "group": groups[k][1]} for k in order]
    return items


def build_datasets(data, *, seed: int, steps: int, world: int, start_epochs: dict[str, int] | None = None,
                   crop: str = "center", cpus_per_task: float = 0.5) -> dict[str, Any]:
    """The Ray Datasets of a run: ``{"multiview": ..., "image": ...}`` (kinds with data only).

    ``data`` is the run's :class:`~mvdream_platform.training.config.DataConfig`; ``steps`` the
    steps still to run; ``start_epochs`` the epoch each kind's stream starts at (resume).
    Each dataset is a stream of (epoch, shard, row group) work items, read by ``flat_map``
    tasks and decoded by ``map_batches`` tasks on any node (``cpus_per_task`` each).
    """
    import ray.data

    start_epochs = start_epochs or {}
    share = {MULTIVIEW: data.p_multiview if data.image_uri else 1.0,
             IMAGE: 1.0 - data.p_multiview if data.uri else 1.0}
    out = {}
    kinds = []
    if data.uri:
        manifest = read_shards_manifest(data.uri)
        if not manifest["shards"]:
            raise ValueError(f"data.loader=ray_data needs multi-view shards: {data.uri!r} has no "
                             "shards.json (jobs/prepare_data.py layout=shards, or mode=shard)")
        files = [storage.join(data.uri, s["name"]) for s in manifest["shards"]]
        epochs = epochs_needed(steps, data.multiview_batch, world, share[MULTIVIEW], manifest["rows"])
        kinds.append((MULTIVIEW, files, epochs, MULTIVIEW_COLUMNS,
                      DecodeMultiView(data.num_views, data.resolution, data.background, seed)))
    if data.image_uri:
        files, _ = list_image_shards(data.image_uri)
        files = [f for f in files if f.endswith(".parquet")]
        if not files:
            raise ValueError(f"data.loader=ray_data reads parquet text-image shards; none in {data.image_uri!r}")
        rows = sum(_parquet_rows(f) for f in files)
        epochs = epochs_needed(steps, data.image_batch, world, share[IMAGE], rows)
        kinds.append((IMAGE, files, epochs, None, DecodeImages(data.resolution, crop, seed)))
    for tag, (kind, files, epochs, columns, decoder) in enumerate(kinds):
        items = work_items(files, start_epochs.get(kind, 0), epochs, seed, tag)
        out[kind] = (ray.data.from_items(items, override_num_blocks=len(items))
                     .flat_map(read_group, fn_kwargs={"columns": columns}, num_cpus=cpus_per_task)
                     .map_batches(_decode, fn_kwargs={"decoder": decoder}, batch_size=16,
                                  batch_format="numpy", num_cpus=cpus_per_task))
    return out


def _parquet_rows(uri: str) -> int:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(uri, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


class RayDataMixture:
    """The training loop's loader over Ray Train's dataset shards (same interface as
    :class:`~mvdream_platform.data.mixture.MixtureLoader`: iterate, ``stats``, ``state_dict``).

    Args:
        shards: ``{"multiview": DataIterator, "image": DataIterator}`` of this worker
            (``ray.train.get_dataset_shard``); kinds without data are absent.
        batch_sizes: objects per multi-view step, images per 2D step.
        p_multiview, seed: the step mixture (:func:`step_kind`).
        start_step: the first step (resume); ``num_steps``: stop before it (None: forever).
    """

    def __init__(self, shards: dict[str, Any], batch_sizes: dict[str, int], *, p_multiview: float,
                 seed: int, start_step: int = 0, num_steps: int | None = None):
        self.shards, self.batch_sizes = shards, batch_sizes
        self.p_multiview, self.seed = p_multiview, seed
        self.step, self.num_steps = start_step, num_steps
        self._rows: dict[str, Iterator[dict[str, Any]]] = {}
        self._stats = {"batches": Counter(), "reasons": {MULTIVIEW: Counter(), IMAGE: Counter()},
                       "epoch": {}, f"skipped_{MULTIVIEW}": 0, f"skipped_{IMAGE}": 0}

    def kind_of_step(self, step: int) -> str:
        if len(self.shards) == 1:
            return next(iter(self.shards))
        return step_kind(step, self.seed, self.p_multiview)

    def _good_rows(self, kind: str) -> Iterator[dict[str, Any]]:
        """This worker's rows of ``kind`` that decoded, in stream order; bad ones counted."""
        for batch in self.shards[kind].iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["ok"])):
                self._stats["epoch"][kind] = max(self._stats["epoch"].get(kind, 0), int(batch["epoch"][i]))
                if not batch["ok"][i]:
                    self._stats[f"skipped_{kind}"] += 1
                    self._stats["reasons"][kind][str(batch["reason"][i])] += 1
                    continue
                yield {name: column[i] for name, column in batch.items()}
        raise RuntimeError(f"the {kind} stream ran out: more steps than the epochs planned "
                           "(ray_ingest.epochs_needed)")

    def _take(self, kind: str) -> list[dict[str, Any]]:
        rows = self._rows.setdefault(kind, self._good_rows(kind))
        return [next(rows) for _ in range(self.batch_sizes[kind])]

    def __iter__(self) -> Iterator[TrainingBatch]:
        while self.num_steps is None or self.step < self.num_steps:
            kind = self.kind_of_step(self.step)
            rows = self._take(kind)
            if kind == MULTIVIEW:
                f = rows[0]["images"].shape[0]
                batch = TrainingBatch(
                    kind=kind, step=self.step,
                    images=torch.from_numpy(np.concatenate([r["images"] for r in rows])),
                    cameras=torch.from_numpy(np.concatenate([r["cameras"] for r in rows])),
                    azimuths_deg=torch.from_numpy(np.concatenate([r["azimuths_deg"] for r in rows])),
                    captions=[str(r["caption"]) for r in rows for _ in range(f)],
                    object_captions=[str(r["caption"]) for r in rows],
                    object_ids=[str(r["object_id"]) for r in rows],
                    attributes=[json.loads(r["attributes"]) for r in rows],
                    num_frames=f, num_objects=len(rows), epochs=[int(r["epoch"]) for r in rows])
            else:
                batch = TrainingBatch(
                    kind=kind, step=self.step, images=torch.from_numpy(np.stack([r["images"] for r in rows])),
                    cameras=None, captions=[str(r["caption"]) for r in rows],
                    keys=[str(r["key"]) for r in rows], num_frames=1, num_objects=len(rows),
                    epochs=[int(r["epoch"]) for r in rows])
            self._stats["batches"][kind] += 1
            self.step += 1
            yield batch

    @property
    def stats(self) -> dict[str, Any]:
        return {"batches": dict(self._stats["batches"]),
                "reasons": {k: dict(v) for k, v in self._stats["reasons"].items()},
                "epoch": dict(self._stats["epoch"]), "skipped_multiview": self._stats[f"skipped_{MULTIVIEW}"],
                "skipped_image": self._stats[f"skipped_{IMAGE}"], "step": self.step, "listing": {}}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "stats": self.stats, "loader": "ray_data"}
