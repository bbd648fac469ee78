"""Ray Data ingest of the training mixture (data.loader=ray_data): decoding, work items, the
mixture over two workers' splits on a real local Ray cluster, and a training run with resume."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from mvdream_platform import storage
from mvdream_platform.data import shards
from mvdream_platform.data.datasets import (
    _TAG_MULTIVIEW_ITEM,
    image_to_unit,
    item_rng,
    multiview_item,
)
from mvdream_platform.data.mixture import IMAGE, MULTIVIEW, step_kind
from mvdream_platform.data.prepare import shard_folders
from mvdream_platform.data.ray_ingest import (
    MULTIVIEW_COLUMNS,
    DecodeMultiView,
    RayDataMixture,
    _decode,
    build_datasets,
    epochs_needed,
    read_group,
    record_id,
    work_items,
)

from conftest import shutdown_ray
from jobs_helpers import compose, import_job, prepare_training_data


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ingest")
    prepare_training_data(root, 8, "rows_per_shard=4")
    shard_folders(str(root / "mv"), str(root / "mv_shards"), objects_per_shard=3)
    return {"folders": str(root / "mv"), "mv": str(root / "mv_shards"), "2d": str(root / "2d")}


def batch_of(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows -> the numpy column batch Ray Data hands map_batches."""
    out = {}
    for name in rows[0]:
        column = np.empty(len(rows), object)
        column[:] = [r.get(name) for r in rows]
        out[name] = column if name != "epoch" else np.asarray([r[name] for r in rows], np.int64)
    return out


def test_decoded_items_are_the_map_style_item_of_the_same_uniforms(data):
    first = shards.read_shards_manifest(data["mv"])["shards"][0]["name"]
    rows = read_group({"epoch": 2, "file": storage.join(data["mv"], first), "group": 0}, MULTIVIEW_COLUMNS)
    assert len(rows) == 3 and all(r["epoch"] == 2 and r["unreadable"] == "" for r in rows)
    out = _decode(batch_of(rows), DecodeMultiView(4, 16, "random_grey", seed=5))
    assert out["ok"].all() and out["images"].shape == (3, 4, 3, 16, 16) and out["cameras"].shape == (3, 4, 16)
    record = shards.record_from_row(rows[1])
    u_start, u_grey = item_rng(_TAG_MULTIVIEW_ITEM, 5, 2, record_id(record.object_id)).random(2)
    from mvdream_platform.data.datasets import decode_image

    expected = multiview_item(record, lambda v: image_to_unit(decode_image(rows[1]["views"][v], "x")[0].convert("RGBA")),
                              u_start, u_grey, 4, 16, None)
    assert torch.equal(torch.from_numpy(out["images"][1]), expected["images"])
    assert torch.equal(torch.from_numpy(out["cameras"][1]), expected["cameras"])
    assert out["caption"][1] == record.caption and out["object_id"][1] == record.object_id
    # another epoch, another item of the same record; the same epoch, the same item
    again = _decode(batch_of(rows), DecodeMultiView(4, 16, "random_grey", seed=5))
    assert np.array_equal(again["images"], out["images"])
    other = _decode(batch_of([dict(r, epoch=3) for r in rows]), DecodeMultiView(4, 16, "random_grey", seed=5))
    assert not np.array_equal(other["images"], out["images"])


def test_bad_rows_and_unreadable_row_groups_are_flagged_not_fatal(data, tmp_path):
    first = shards.read_shards_manifest(data["mv"])["shards"][0]["name"]
    rows = read_group({"epoch": 0, "file": storage.join(data["mv"], first), "group": 0}, MULTIVIEW_COLUMNS)
    rows[0]["views"] = [b"not a png"] * len(rows[0]["views"])
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 truncated")
    rows += read_group({"epoch": 0, "file": str(broken), "group": 0}, MULTIVIEW_COLUMNS)
    assert rows[-1]["unreadable"]
    out = _decode(batch_of(rows), DecodeMultiView(4, 16, "random_grey", seed=0))
    assert out["ok"].tolist() == [False, True, True, False]
    assert out["reason"][0] == "bad_png" and out["reason"][3] == "bad_parquet"


def test_work_items_cover_every_row_group_each_epoch_in_a_seeded_order(data):
    files = [storage.join(data["mv"], s["name"]) for s in shards.read_shards_manifest(data["mv"])["shards"]]
    items = work_items(files, first_epoch=3, epochs=2, seed=0, tag=0)
    assert [i["epoch"] for i in items] == [3, 3, 4, 4]  # 2 shards x 1 row group of 3 objects
    assert {(i["file"], i["group"]) for i in items[:2]} == {(f, 0) for f in files}
    assert items == work_items(files, first_epoch=3, epochs=2, seed=0, tag=0)
    assert epochs_needed(steps=10, batch=2, world=2, share=0.7, records=6) == 7
    assert epochs_needed(steps=10, batch=2, world=2, share=0.0, records=6) == 0


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    shutdown_ray()


@pytest.mark.slow
def test_two_workers_run_the_same_kinds_on_disjoint_rows(data, ray_cluster):
    from mvdream_platform.training.config import DataConfig

    cfg = DataConfig(uri=data["mv"], image_uri=data["2d"], resolution=16, multiview_batch=2,
                     image_batch=3, loader="ray_data", background="white")
    steps = 8
    datasets = build_datasets(cfg, seed=0, steps=steps, world=2)
    splits = {k: ds.streaming_split(2, equal=False) for k, ds in datasets.items()}  # as Ray Train does
    seen: dict[int, list] = {}

    def rank(r: int) -> None:
        loader = RayDataMixture({k: s[r] for k, s in splits.items()}, {MULTIVIEW: 2, IMAGE: 3},
                                p_multiview=0.7, seed=0, num_steps=steps)
        seen[r] = list(loader)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    kinds = [step_kind(s, 0, 0.7) for s in range(steps)]
    for r in (0, 1):
        assert [b.kind for b in seen[r]] == kinds  # every rank runs the same kind of step
        for b in seen[r]:
            assert b.images.shape == ((8, 3, 16, 16) if b.kind == MULTIVIEW else (3, 3, 16, 16))
            if b.kind == MULTIVIEW:
                assert b.cameras.shape == (8, 16) and len(b.captions) == 8
                assert torch.all(b.images[:, :, 0, 0] == 1.0)  # data.background=white
    # within an epoch a row goes to one rank only
    first_epoch = [{(e, o) for b in seen[r] if b.kind == MULTIVIEW for e, o in zip(b.epochs, b.object_ids)}
                   for r in (0, 1)]
    assert not first_epoch[0] & first_epoch[1]


@pytest.mark.slow
def test_training_streams_through_ray_data_and_resumes_at_its_epoch(data, tmp_path, ray_cluster):
    job = import_job("train")
    base = ["model=tiny_init", "data=shapes", "cluster=local_cpu", "logger=disabled",
            "data.resolution=16", "data.multiview_batch=2", "data.image_batch=4", "data.loader=ray_data",
            "trainer.warmup_steps=2", "trainer.log_every=1", "trainer.lr=1e-3", "samples.every=0",
            f"data.uri={data['mv']}", f"data.image_uri={data['2d']}", f"run.storage_path={tmp_path / 'runs'}",
            "run.name=rd", "trainer.checkpoint_every=2"]
    first = job.run(compose("train", base + ["trainer.max_steps=4"]))
    assert first["metrics"]["step"] == 4 and np.isfinite(first["metrics"]["loss"])
    run = tmp_path / "runs" / "rd"
    states = sorted(run.glob("checkpoint_*/state.json"))
    state = json.loads(states[-1].read_text())
    assert state["loader"]["loader"] == "ray_data" and state["loader"]["stats"]["epoch"]
    second = job.run(compose("train", base + ["trainer.max_steps=6"]))
    assert second["metrics"]["step"] == 6
    steps = [json.loads(line)["step"] for line in (run / "tracking" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="mode=shard"):  # a folder layout is refused up front
        job.run(compose("train", base[:-4] + [f"data.uri={data['folders']}", f"data.image_uri={data['2d']}",
                                              f"run.storage_path={tmp_path / 'r2'}", "trainer.max_steps=2"]))
    assert Path(data["mv"]).exists()
