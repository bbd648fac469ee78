"""The 3D/2D mixture loader: proportions, homogeneous batches, determinism, DDP sharding,
DataLoader workers, bad records skipped and counted, resume."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mvdream_platform.data.datasets import MultiViewDataset, TextImageDataset
from mvdream_platform.data.mixture import (
    IMAGE,
    MULTIVIEW,
    BatchPlanner,
    MixtureLoader,
    TrainingBatch,
    step_kind,
)
from test_datasets import (
    write_corrupt_images,
    write_corrupt_multiview,
    write_multiview_fixture,
    write_parquet_fixture,
)

NUM_OBJECTS, NUM_ROWS = 11, 13


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    write_multiview_fixture(str(root / "mv"), num_objects=NUM_OBJECTS, num_rendered=8,
                            resolution=8)
    write_parquet_fixture(str(root / "img"), num_rows=NUM_ROWS, rows_per_shard=5, size=(12, 8))
    return root


def datasets(root, multiview=True, images=True):
    return (MultiViewDataset(str(root / "mv"), resolution=8) if multiview else None,
            TextImageDataset(str(root / "img"), resolution=8) if images else None)


def run(loader: MixtureLoader) -> list[TrainingBatch]:
    return list(loader)  # loaders here have num_steps set


def assert_same_batches(a: list[TrainingBatch], b: list[TrainingBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in (f.name for f in dataclasses.fields(TrainingBatch)):
            u, v = getattr(x, key), getattr(y, key)
            if isinstance(u, torch.Tensor):
                assert torch.equal(u, v), key
            else:
                assert u == v, key


def test_step_kinds_follow_p_multiview_and_depend_on_seed_and_step_only():
    kinds = [step_kind(s, seed=0, p_multiview=0.7) for s in range(5000)]
    assert 0.68 < kinds.count(MULTIVIEW) / len(kinds) < 0.72
    assert 0.28 < [step_kind(s, 3, 0.3) for s in range(5000)].count(MULTIVIEW) / 5000 < 0.32
    assert kinds == [step_kind(s, seed=0, p_multiview=0.7) for s in range(5000)]
    assert kinds != [step_kind(s, seed=1, p_multiview=0.7) for s in range(5000)]
    assert {step_kind(s, 0, 1.0) for s in range(100)} == {MULTIVIEW}
    assert {step_kind(s, 0, 0.0) for s in range(100)} == {IMAGE}


def test_batches_are_homogeneous_with_documented_shapes(data_root):
    loader = MixtureLoader(*datasets(data_root), multiview_batch=2, image_batch=3, num_steps=24)
    batches = run(loader)
    kinds = [b.kind for b in batches]
    assert kinds == [loader.kind_of_step(s) for s in range(24)]
    assert set(kinds) == {MULTIVIEW, IMAGE}
    for step, b in enumerate(batches):
        assert b.step == step and b.images.dtype == torch.float32
        assert b.images.min() >= -1 and b.images.max() <= 1
        if b.kind == MULTIVIEW:
            assert b.images.shape == (8, 3, 8, 8) and b.cameras.shape == (8, 16)
            assert b.num_frames == 4 and b.num_objects == 2
            assert b.azimuths_deg.shape == (8,) and len(b.object_ids) == 2
            assert b.captions == [c for c in b.object_captions for _ in range(4)]
            assert torch.allclose(b.cameras.reshape(8, 4, 4)[:, :3, 3].norm(dim=-1),
                                  torch.ones(8), atol=1e-5)
        else:
            assert b.images.shape == (3, 3, 8, 8) and b.cameras is None
            assert b.num_frames == 1 and len(b.captions) == len(b.keys) == 3
    assert loader.stats["batches"] == {MULTIVIEW: kinds.count(MULTIVIEW),
                                       IMAGE: kinds.count(IMAGE)}
    assert loader.stats["skipped_multiview"] == loader.stats["skipped_image"] == 0


def test_every_rank_runs_the_same_kind_and_seeds_reproduce(data_root):
    def batches(rank, seed=0):
        return run(MixtureLoader(*datasets(data_root), multiview_batch=2, image_batch=3,
                                 seed=seed, rank=rank, world_size=2, num_steps=12))

    rank0, rank1 = batches(0), batches(1)
    assert [b.kind for b in rank0] == [b.kind for b in rank1]
    assert all(a.indices != b.indices for a, b in zip(rank0, rank1))
    assert_same_batches(rank0, batches(0))
    assert [b.kind for b in rank0] != [b.kind for b in batches(0, seed=5)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_shards_are_disjoint_and_complete_every_epoch(world_size):
    sizes = {MULTIVIEW: NUM_OBJECTS, IMAGE: NUM_ROWS}
    seen = {kind: {} for kind in sizes}  # kind -> (epoch, rank) -> indices in order
    for rank in range(world_size):
        planner = BatchPlanner(sizes, {MULTIVIEW: 2, IMAGE: 3}, 0.7, seed=0, rank=rank,
                               world_size=world_size)
        for plan in planner.plans(0, 120):
            for epoch, index in plan.items:
                seen[plan.kind].setdefault((epoch, rank), []).append(index)
    for kind, n in sizes.items():
        for epoch in range(3):
            per_rank = [seen[kind][(epoch, r)] for r in range(world_size)]
            assert sum(len(p) for p in per_rank) == n  # all of it, once
            assert sorted(i for p in per_rank for i in p) == list(range(n))
            for r, p in enumerate(per_rank):
                assert len(set(p)) == len(p) and len(p) == len(range(r, n, world_size))
        # A new permutation each epoch.
        assert seen[kind][(0, 0)] != seen[kind][(1, 0)]


def test_ddp_sharding_through_the_loader(data_root):
    union = {}
    for rank in range(2):
        loader = MixtureLoader(*datasets(data_root, images=False), multiview_batch=2,
                               rank=rank, world_size=2, num_steps=3)  # 6 >= ceil(11 / 2)
        epoch0 = [i for b in run(loader) for e, i in zip(b.epochs, b.indices) if e == 0]
        union[rank] = epoch0
        assert len(set(epoch0)) == len(epoch0)
    assert not set(union[0]) & set(union[1])
    assert sorted(union[0] + union[1]) == list(range(NUM_OBJECTS))


def test_workers_yield_exactly_the_batches_of_the_main_process(data_root):
    def batches(num_workers):
        return run(MixtureLoader(*datasets(data_root), multiview_batch=2, image_batch=3,
                                 num_workers=num_workers, num_steps=10))

    assert_same_batches(batches(0), batches(2))


def test_one_absent_dataset_means_all_of_the_other(data_root):
    only_mv = run(MixtureLoader(*datasets(data_root, images=False), num_steps=6,
                                multiview_batch=2))
    assert {b.kind for b in only_mv} == {MULTIVIEW}
    only_img = run(MixtureLoader(*datasets(data_root, multiview=False), num_steps=6,
                                 image_batch=3))
    assert {b.kind for b in only_img} == {IMAGE}


def test_resume_from_state_dict_continues_the_same_sequence(data_root):
    full = run(MixtureLoader(*datasets(data_root), multiview_batch=2, image_batch=3,
                             num_steps=9))
    first = MixtureLoader(*datasets(data_root), multiview_batch=2, image_batch=3, num_steps=5)
    run(first)
    state = first.state_dict()
    assert state["step"] == 5
    resumed = MixtureLoader(*datasets(data_root), multiview_batch=2, image_batch=3, num_steps=9)
    resumed.load_state_dict(state)
    assert_same_batches(full[5:], run(resumed))
    assert resumed.stats["batches"] == {k: sum(b.kind == k for b in full)
                                        for k in (MULTIVIEW, IMAGE)}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_records_are_skipped_counted_and_batches_topped_up(tmp_path, num_workers):
    bad_objects = write_corrupt_multiview(
        tmp_path / "mv", ["bad_json", "bad_png", "missing_caption", "missing_cameras",
                          "missing_view", "num_views", "truncated_png", "wrong_size"], healthy=12)
    image_reasons = write_corrupt_images(tmp_path / "img")
    mv = MultiViewDataset(str(tmp_path / "mv"))
    img = TextImageDataset(str(tmp_path / "img"), resolution=8)
    bad_ids = {i for i, e in enumerate(mv.entries) if e["object_id"] in bad_objects}

    loader = MixtureLoader(mv, img, multiview_batch=2, image_batch=3, num_steps=40,
                           num_workers=num_workers)
    batches = run(loader)
    for b in batches:  # every batch full, no bad record in it
        assert b.num_objects == (2 if b.kind == MULTIVIEW else 3)
        if b.kind == MULTIVIEW:
            assert not set(b.indices) & bad_ids
    stats = loader.stats
    assert set(stats["reasons"][MULTIVIEW]) == set(bad_objects.values())
    assert set(stats["reasons"][IMAGE]) == set(image_reasons)
    assert stats["skipped_multiview"] == sum(stats["reasons"][MULTIVIEW].values())
    assert stats["skipped_image"] == sum(stats["reasons"][IMAGE].values())
    assert stats["skipped_multiview"] == sum(b.skipped["count"] for b in batches
                                             if b.kind == MULTIVIEW)
    assert stats["listing"] == {MULTIVIEW: {}, IMAGE: {"bad_shard": 1}}
    # Two full epochs of each dataset went by: every bad record was met at least twice.
    assert stats["epoch"][MULTIVIEW] >= 2 and stats["epoch"][IMAGE] >= 2
    assert stats["skipped_multiview"] >= 2 * len(bad_objects)
    assert stats["skipped_image"] >= 2 * sum(image_reasons.values())


def test_a_batch_with_no_readable_record_is_a_clear_error(tmp_path):
    write_corrupt_multiview(tmp_path, ["bad_png", "bad_json"], healthy=0)
    loader = MixtureLoader(MultiViewDataset(str(tmp_path)), None, multiview_batch=1,
                           num_steps=1)
    with pytest.raises(RuntimeError, match="none of the 2 multiview records"):
        run(loader)


def test_clear_errors_for_bad_configurations(data_root):
    mv, img = datasets(data_root)
    with pytest.raises(ValueError, match="rank"):
        MixtureLoader(mv, img, rank=2, world_size=2)
    with pytest.raises(ValueError, match="p_multiview"):
        MixtureLoader(mv, img, p_multiview=1.5)
    with pytest.raises(ValueError, match="multiview_batch"):
        MixtureLoader(mv, img, multiview_batch=0)
    with pytest.raises(ValueError, match="needs a multi-view dataset"):
        MixtureLoader(None, None)
    with pytest.raises(ValueError, match="resolution"):
        MixtureLoader(mv, TextImageDataset(str(data_root / "img"), resolution=4))
    with pytest.raises(ValueError, match="cannot be sharded"):
        MixtureLoader(mv, img, rank=11, world_size=12)


def test_from_uris_builds_the_mixture(data_root):
    loader = MixtureLoader.from_uris(str(data_root / "mv"), None, resolution=8, num_steps=2,
                                     multiview_batch=2)
    assert [b.images.shape for b in loader] == [(8, 3, 8, 8)] * 2
