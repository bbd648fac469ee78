"""The 3D / 2D training mixture: homogeneous batches, deterministic per seed, sharded for DDP.

MVDream trains 70% of its steps on multi-view renders (F = 4 views, camera embedding and 3D
attention on) and 30% on text-image pairs (F = 1, no camera). A step is one kind or the
other, never mixed, so the model runs one code path per step. :class:`MixtureLoader` yields
those batches.

How a batch is decided (everything a pure function of the configuration and the step):

* **kind of step s**: ``"multiview"`` with probability ``p_multiview``, drawn from
  ``(seed, s)`` only, so every DDP rank runs the same kind at step s (the camera MLP gets
  gradients on all ranks or on none; DDP would otherwise wait for gradients that one rank
  never computes).
* **records**: each dataset has an infinite per-rank stream. Epoch e of dataset D is a
  seeded permutation ``perm_e`` of its indices; rank r reads ``perm_e[r::world_size]``
  (disjoint across ranks, together everything once, no duplicate within an epoch), then
  rolls over to epoch e + 1. The n-th batch of kind D takes the next ``batch_size`` positions
  of D's stream, so epochs of the two datasets roll over independently, and a batch may
  straddle two epochs.
* **per-item randomness** (view start, background grey, crop): ``(dataset seed, epoch,
  index)``; see :mod:`.datasets`.

The main process turns steps into :class:`BatchPlan` s (a few integers each); a
``torch.utils.data.DataLoader`` (``num_workers`` >= 0) decodes them, in order, so
``num_workers=2`` yields exactly the batches of ``num_workers=0``.

Bad records are skipped and the batch is **topped up** to its full size from ``spares``:
records drawn at random (seeded by step and rank) from the same epoch's shard of the rank, so
batch shapes stay constant. A replacement may repeat a record already seen this epoch; only
if the spares run out too is a batch smaller (if no record at all could be read, the step
raises: the data is broken, not one record). Every skip is counted by reason in the batch
(``batch.skipped``), so counts made in worker processes reach the main process, which sums
them into :attr:`MixtureLoader.stats`.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mvdream_platform.data.datasets import (
    BadRecord,
    MultiViewDataset,
    TextImageDataset,
    warn_skip,
)

__all__ = [
    "IMAGE",
    "MULTIVIEW",
    "BatchPlan",
    "BatchPlanner",
    "MixtureLoader",
    "RankStream",
    "collate_images",
    "collate_multiview",
    "epoch_permutation",
    "step_kind",
]

log = logging.getLogger(__name__)

MULTIVIEW, IMAGE = "multiview", "image"
KINDS = (MULTIVIEW, IMAGE)
# Tags keep the random streams of different purposes independent for the same seed.
_TAG_KIND = 0x4B1D
_TAG_PERMUTATION = {MULTIVIEW: 0x3D9E, IMAGE: 0x2D9E}
_TAG_SPARES = 0x5FA2


def step_kind(step: int, seed: int, p_multiview: float) -> str:
    """Kind of training step ``step``: a pure function of (seed, step), the same on every rank."""
    u = np.random.default_rng([_TAG_KIND, seed, step]).random()
    return MULTIVIEW if u < p_multiview else IMAGE


def epoch_permutation(num_items: int, seed: int, epoch: int, tag: int) -> np.ndarray:
    """(num_items,) int64: the order of one dataset's epoch (identical on every rank)."""
    return np.random.default_rng([tag, seed, epoch]).permutation(num_items)


class RankStream:
    """The infinite sequence of (epoch, index) one rank reads from one dataset.

    Position p is element ``p % L`` of ``perm_e[rank::world_size]`` with ``e = p // L`` and
    ``L`` the rank's shard length (``ceil((N - rank) / world_size)``: with N not divisible by
    world_size some ranks read one record more per epoch; nothing is dropped or padded).
    """

    def __init__(self, num_items: int, seed: int, tag: int, rank: int, world_size: int):
        self.num_items, self.seed, self.tag = num_items, seed, tag
        self.rank, self.world_size = rank, world_size
        self.shard_len = len(range(rank, num_items, world_size))
        if self.shard_len == 0:
            raise ValueError(f"a dataset of {num_items} records cannot be sharded over "
                             f"world_size={world_size} ranks (rank {rank} would get none)")
        self._shards: OrderedDict[int, np.ndarray] = OrderedDict()

    def shard(self, epoch: int) -> np.ndarray:
        """(L,) indices this rank reads in ``epoch`` (the last two epochs are cached)."""
        if epoch not in self._shards:
            perm = epoch_permutation(self.num_items, self.seed, epoch, self.tag)
            self._shards[epoch] = perm[self.rank::self.world_size]
            while len(self._shards) > 2:
                self._shards.popitem(last=False)
        return self._shards[epoch]

    def take(self, start: int, count: int) -> list[tuple[int, int]]:
        """(epoch, index) at positions start .. start + count - 1."""
        out = []
        for p in range(start, start + count):
            epoch, offset = divmod(p, self.shard_len)
            out.append((epoch, int(self.shard(epoch)[offset])))
        return out

    def spares(self, epoch: int, exclude: set[int], count: int,
               rng: np.random.Generator) -> list[tuple[int, int]]:
        """Up to ``count`` random records of this rank's ``epoch`` shard, none in ``exclude``."""
        shard = self.shard(epoch)
        picks = rng.choice(self.shard_len, size=min(self.shard_len, count + len(exclude)),
                           replace=False)
        out = [(epoch, int(shard[p])) for p in picks if int(shard[p]) not in exclude]
        return out[:count]


@dataclass(frozen=True)
class BatchPlan:
    """What one step loads: cheap to make in the main process, to pickle and to replay.

    Attributes:
        step: the global training step.
        kind: ``"multiview"`` or ``"image"``.
        items: (epoch, index) of the records, in batch order.
        spares: (epoch, index) replacements for records that turn out bad, in order.
    """

    step: int
    kind: str
    items: tuple[tuple[int, int], ...]
    spares: tuple[tuple[int, int], ...]


class BatchPlanner:
    """Steps -> :class:`BatchPlan` s for one rank (pure function of the arguments and the step).

    Args:
        sizes: records per kind present, e.g. ``{"multiview": 2000, "image": 5000}``.
        batch_sizes: records per batch per kind (objects for multi-view, images for 2D).
        p_multiview: probability of a multi-view step when both kinds are present.
        seed, rank, world_size: as in :class:`MixtureLoader`.
    """

    def __init__(self, sizes: dict[str, int], batch_sizes: dict[str, int], p_multiview: float,
                 seed: int, rank: int, world_size: int):
        self.batch_sizes, self.p_multiview = batch_sizes, p_multiview
        self.seed, self.rank = seed, rank
        self.streams = {kind: RankStream(n, seed, _TAG_PERMUTATION[kind], rank, world_size)
                        for kind, n in sizes.items()}

    def kind(self, step: int) -> str:
        if len(self.streams) == 1:
            return next(iter(self.streams))
        return step_kind(step, self.seed, self.p_multiview)

    def plans(self, start_step: int = 0, stop_step: int | None = None) -> Iterator[BatchPlan]:
        """Plans of steps ``start_step`` .. ``stop_step - 1`` (forever when None)."""
        position = dict.fromkeys(self.streams, 0)
        for step in range(start_step):  # fast-forward (resume): only the kinds are needed
            kind = self.kind(step)
            position[kind] += self.batch_sizes[kind]
        step = start_step
        while stop_step is None or step < stop_step:
            kind = self.kind(step)
            stream, size = self.streams[kind], self.batch_sizes[kind]
            items = stream.take(position[kind], size)
            position[kind] += size
            rng = np.random.default_rng([_TAG_SPARES, self.seed, self.rank, step])
            # Generous: spares cost a few integers unless used, and they keep batches full
            # even when a large fraction of the data is bad.
            spares = stream.spares(items[-1][0], {i for _, i in items}, 2 * size + 4, rng)
            yield BatchPlan(step, kind, tuple(items), tuple(spares))
            step += 1


# ----------------------------------------------------------------------------- batches


@dataclass
class TrainingBatch:
    """One step's batch, as the training loop receives it (one kind per step, never mixed).

    Attributes:
        kind: ``"multiview"`` or ``"image"``.
        step: the training step it belongs to.
        images: (N, 3, H, W) float32 in [-1, 1]; N = B * F with each object's F views
            contiguous (multi-view) or N = B images (F = 1).
        cameras: (N, 16) camera-to-world vectors, or None for text-image batches.
        captions: N captions aligned with ``images`` (an object's caption repeated F times).
        num_frames: F (1 for text-image batches).
        num_objects: B.
        epochs, indices: the dataset records used, one per object or image (epoch, index).
        skipped: ``{"count": int, "reasons": {reason: int}}`` of records replaced by spares.
        azimuths_deg: (N,) the views' MVDream azimuths (multi-view only).
        object_captions, object_ids, attributes: per object (multi-view only).
        keys: per image (text-image only).
    """

    kind: str
    step: int
    images: torch.Tensor
    cameras: torch.Tensor | None
    captions: list[str]
    num_frames: int
    num_objects: int
    epochs: list[int] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    skipped: dict[str, Any] = field(default_factory=lambda: {"count": 0, "reasons": {}})
    azimuths_deg: torch.Tensor | None = None
    object_captions: list[str] | None = None
    object_ids: list[str] | None = None
    attributes: list[dict] | None = None
    keys: list[str] | None = None


def collate_multiview(items: list[dict[str, Any]], step: int = 0) -> TrainingBatch:
    """B multi-view items (F views each) -> one batch, views contiguous per object."""
    num_frames = items[0]["images"].shape[0]
    return TrainingBatch(
        kind=MULTIVIEW, step=step,
        images=torch.cat([it["images"] for it in items]),
        cameras=torch.cat([it["cameras"] for it in items]),
        azimuths_deg=torch.cat([it["azimuths_deg"] for it in items]),
        captions=[it["caption"] for it in items for _ in range(num_frames)],
        object_captions=[it["caption"] for it in items],
        object_ids=[it["object_id"] for it in items],
        attributes=[it["attributes"] for it in items],
        num_frames=num_frames, num_objects=len(items),
    )


def collate_images(items: list[dict[str, Any]], step: int = 0) -> TrainingBatch:
    """B2 text-image items -> images (B2, 3, H, W), captions/keys (B2), cameras None, F = 1."""
    return TrainingBatch(
        kind=IMAGE, step=step, images=torch.cat([it["images"] for it in items]), cameras=None,
        captions=[it["caption"] for it in items], keys=[it["key"] for it in items],
        num_frames=1, num_objects=len(items),
    )


def load_with_topup(dataset: Any, kind: str, plan: BatchPlan, size: int
                    ) -> tuple[list[dict[str, Any]], list[tuple[int, int]], Counter[str]]:
    """Load the plan's records, replacing bad ones by spares, up to ``size`` items.

    Returns:
        (items, the (epoch, index) of each item, Counter of skip reasons).
    """
    items, used, reasons = [], [], Counter()
    for epoch, index in (*plan.items, *plan.spares):
        if len(items) == size:
            break
        try:
            items.append(dataset.load(index, epoch))
            used.append((epoch, index))
        except BadRecord as error:
            reasons[error.reason] += 1
            warn_skip(kind, f"{index} (epoch {epoch}, step {plan.step})", error)
        except Exception as error:  # noqa: BLE001 - one odd record must never end training
            reasons[f"error:{type(error).__name__}"] += 1
            warn_skip(kind, f"{index} (epoch {epoch}, step {plan.step})", error)
    if not items:
        raise RuntimeError(f"step {plan.step}: none of the {len(plan.items) + len(plan.spares)} "
                           f"{kind} records tried could be read (reasons: {dict(reasons)}); "
                           "check the data with jobs/prepare_data.py mode=validate")
    return items, used, reasons


class _BatchBuilder(Dataset):
    """Map-style dataset whose keys are :class:`BatchPlan` s: runs in DataLoader workers."""

    def __init__(self, datasets: dict[str, Any], batch_sizes: dict[str, int]):
        self.datasets, self.batch_sizes = datasets, batch_sizes

    def __getitem__(self, plan: BatchPlan) -> TrainingBatch:
        items, used, reasons = load_with_topup(self.datasets[plan.kind], plan.kind, plan,
                                               self.batch_sizes[plan.kind])
        collate = collate_multiview if plan.kind == MULTIVIEW else collate_images
        batch = collate(items, plan.step)
        batch.epochs, batch.indices = [e for e, _ in used], [i for _, i in used]
        batch.skipped = {"count": sum(reasons.values()), "reasons": dict(reasons)}
        return batch


class _PlanSampler:
    """The DataLoader's sampler: yields the plans of a step range."""

    def __init__(self, planner: BatchPlanner, start_step: int, stop_step: int | None):
        self.planner, self.start_step, self.stop_step = planner, start_step, stop_step

    def __iter__(self) -> Iterator[BatchPlan]:
        return self.planner.plans(self.start_step, self.stop_step)


def _identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


# ----------------------------------------------------------------------------- the loader


class MixtureLoader:
    """Iterable of homogeneous training batches mixing multi-view and text-image data.

    Args:
        multiview: a :class:`MultiViewDataset` (or anything with ``load(index, epoch)`` and
            ``len``), or None for 2D only.
        images: a :class:`TextImageDataset`, or None for multi-view only (MVDream's "3D data
            only" ablation).
        multiview_batch: B, objects per multi-view step (B * F images).
        image_batch: B2, images per 2D step.
        p_multiview: probability of a multi-view step (0.7 in MVDream); ignored when one
            dataset is None.
        seed: fixes the kinds of steps, the epoch permutations and the spares.
        rank, world_size: this process's DDP rank and the number of ranks.
        num_workers: DataLoader worker processes decoding batches (0: in this process).
        start_step: first step to yield (resume); ``num_steps``: stop before this step
            (None: forever).
        prefetch_factor, pin_memory, multiprocessing_context: passed to the DataLoader.

    Iterating yields :class:`TrainingBatch` es.

    A new ``for`` loop continues after the last batch consumed (``state_dict`` /
    ``load_state_dict`` save and restore that position and the counts).
    """

    def __init__(self, multiview: MultiViewDataset | None, images: TextImageDataset | None, *,
                 multiview_batch: int = 8, image_batch: int = 32, p_multiview: float = 0.7,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 start_step: int = 0, num_steps: int | None = None,
                 prefetch_factor: int | None = None, pin_memory: bool = False,
                 multiprocessing_context: str | None = None):
        _check_config(multiview, images, multiview_batch, image_batch, p_multiview, seed, rank,
                      world_size, num_workers)
        self.datasets = {k: d for k, d in ((MULTIVIEW, multiview), (IMAGE, images))
                         if d is not None}
        self.batch_sizes = {MULTIVIEW: multiview_batch, IMAGE: image_batch}
        self.p_multiview = p_multiview
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.num_steps = num_workers, num_steps
        self.step = start_step
        self._loader_options = {"prefetch_factor": prefetch_factor, "pin_memory": pin_memory,
                                "multiprocessing_context": multiprocessing_context}
        self.planner = BatchPlanner({k: len(d) for k, d in self.datasets.items()},
                                    self.batch_sizes, p_multiview, seed, rank, world_size)
        self._stats = _empty_stats()

    @classmethod
    def from_uris(cls, uri: str | None, image_uri: str | None, *, resolution: int,
                  num_views: int = 4, background: object = "random_grey", crop: str = "center",
                  seed: int = 0, **kwargs: Any) -> MixtureLoader:
        """Build both datasets from their folders (either may be None) and the loader."""
        multiview = (MultiViewDataset(uri, num_views=num_views, resolution=resolution,
                                      background=background, seed=seed) if uri else None)
        images = (TextImageDataset(image_uri, resolution, crop=crop, seed=seed)
                  if image_uri else None)
        return cls(multiview, images, seed=seed, **kwargs)

    def kind_of_step(self, step: int) -> str:
        """The kind of batch step ``step`` yields (identical on every rank)."""
        return self.planner.kind(step)

    def __iter__(self) -> Iterator[TrainingBatch]:
        builder = _BatchBuilder(self.datasets, self.batch_sizes)
        sampler = _PlanSampler(self.planner, self.step, self.num_steps)
        options = dict(self._loader_options) if self.num_workers else {
            "pin_memory": self._loader_options["pin_memory"]}
        loader = DataLoader(builder, sampler=sampler, batch_size=None, collate_fn=_identity,
                            num_workers=self.num_workers, **options)
        for batch in loader:
            self._record(batch)
            self.step = batch.step + 1
            yield batch

    def _record(self, batch: TrainingBatch) -> None:
        kind, skipped = batch.kind, batch.skipped
        self._stats["batches"][kind] += 1
        self._stats[f"skipped_{kind}"] += skipped["count"]
        for reason, n in skipped["reasons"].items():
            self._stats["reasons"][kind][reason] = self._stats["reasons"][kind].get(reason, 0) + n
        self._stats["epoch"][kind] = max(batch.epochs)

    @property
    def stats(self) -> dict[str, Any]:
        """Counts so far: ``skipped_multiview``, ``skipped_image``, ``reasons`` (per kind, per
        reason), ``listing`` (problems met while listing each dataset: bad manifest lines,
        unreadable shards), ``batches`` (per kind), ``epoch`` (current epoch per kind), ``step``.
        """
        stats = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self._stats.items()}
        stats["reasons"] = {k: dict(v) for k, v in self._stats["reasons"].items()}
        stats["listing"] = {k: dict(getattr(d, "listing_skips", {}))
                            for k, d in self.datasets.items()}
        stats["step"] = self.step
        return stats

    def state_dict(self) -> dict[str, Any]:
        """Position and counts, to resume exactly (the same batches follow)."""
        return {"step": self.step, "stats": self.stats}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        saved = state.get("stats", {})
        self._stats = _empty_stats()
        for key in ("skipped_multiview", "skipped_image"):
            self._stats[key] = int(saved.get(key, 0))
        for key in ("reasons", "batches", "epoch"):
            for kind, value in saved.get(key, {}).items():
                self._stats[key][kind] = dict(value) if isinstance(value, dict) else value


def _empty_stats() -> dict[str, Any]:
    return {"skipped_multiview": 0, "skipped_image": 0,
            "reasons": {MULTIVIEW: {}, IMAGE: {}}, "batches": {MULTIVIEW: 0, IMAGE: 0},
            "epoch": {MULTIVIEW: 0, IMAGE: 0}}


def _check_config(multiview: Any, images: Any, multiview_batch: int, image_batch: int,
                  p_multiview: float, seed: int, rank: int, world_size: int,
                  num_workers: int) -> None:
    """Clear errors naming the bad argument and its allowed values."""
    if multiview is None and images is None:
        raise ValueError("MixtureLoader needs a multi-view dataset, an image dataset or both")
    for name, value, low in (("multiview_batch", multiview_batch, 1),
                             ("image_batch", image_batch, 1), ("world_size", world_size, 1),
                             ("num_workers", num_workers, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")
    if not 0.0 <= p_multiview <= 1.0:
        raise ValueError(f"p_multiview must be in [0, 1], got {p_multiview!r}")
    res = [getattr(d, "resolution", None) for d in (multiview, images) if d is not None]
    if len(res) == 2 and res[0] != res[1]:
        raise ValueError(f"the multi-view resolution ({res[0]}) and the image resolution "
                         f"({res[1]}) must match: the model trains at one resolution")
