"""Multi-view parquet shards: written directly or converted, read back exactly, resumable,
corrupt rows counted and skipped."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mvdream_platform import storage
from mvdream_platform.data import shards
from mvdream_platform.data.datasets import BadRecord, MultiViewDataset, validate_multiview
from mvdream_platform.data.mixture import MixtureLoader
from mvdream_platform.data.prepare import shard_folders

from jobs_helpers import compose, import_job

RENDER = ["source=shapes", "num_objects=5", "views=8", "resolution=16", "backend=serial"]


def _prepare(*overrides: str) -> dict:
    return import_job("prepare_data").run(compose("prepare_data", list(overrides)))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("mv") / "folders")
    assert _prepare(*RENDER, f"out={out}")["rendered"] == 5
    return out


def assert_same_items(a: MultiViewDataset, b: MultiViewDataset) -> None:
    assert len(a) == len(b) and a.resolution == b.resolution
    for index in range(len(a)):
        for epoch in (0, 3):
            x, y = a.load(index, epoch), b.load(index, epoch)
            assert x.keys() == y.keys()
            for key in x:
                if isinstance(x[key], torch.Tensor):
                    assert torch.equal(x[key], y[key]), key
                else:
                    assert x[key] == y[key], key


def test_converted_shards_read_back_as_the_folders_do(folders, tmp_path):
    out = str(tmp_path / "shards")
    manifest = shard_folders(folders, out, objects_per_shard=2)
    assert [s["rows"] for s in manifest["shards"]] == [2, 2, 1] and manifest["rows"] == 5
    table = pq.read_table(storage.join(out, manifest["shards"][0]["name"]))
    assert table.schema.equals(shards.SCHEMA) and len(table.column("views")[0]) == 8
    assert_same_items(MultiViewDataset(folders, num_views=4, seed=1),
                      MultiViewDataset(out, num_views=4, seed=1))
    assert validate_multiview(out)["ok"] and validate_multiview(out)["objects_ok"] == 5


def test_written_directly_as_shards_resumable_and_identical(folders, tmp_path):
    out = str(tmp_path / "direct")
    first = _prepare(*RENDER, "layout=shards", "objects_per_shard=2", f"out={out}")
    assert first["rendered"] == 5 and first["failed"] == 0
    assert not storage.exists(storage.join(out, ".staging"))  # packed and cleaned up
    names = [s["name"] for s in shards.read_shards_manifest(out)["shards"]]
    again = _prepare(*RENDER, "layout=shards", "objects_per_shard=2", f"out={out}")
    assert again["rendered"] == 0 and again["skipped_existing"] == 5
    assert [s["name"] for s in shards.read_shards_manifest(out)["shards"]] == names
    # the renders are seeded per object: the same pixels as the folder layout's
    assert_same_items(MultiViewDataset(folders, num_views=4), MultiViewDataset(out, num_views=4))


def test_an_interrupted_conversion_continues_without_duplicates(folders, tmp_path):
    out = str(tmp_path / "resume")
    ids = sorted(e["object_id"] for e in MultiViewDataset(folders).entries)
    shards.append_shard(out, shards.rows_of_objects(folders, ids[:3]))  # then "the job died"
    manifest = shard_folders(folders, out, objects_per_shard=4)
    assert [s["objects"] for s in manifest["shards"]] == [ids[:3], ids[3:]]
    assert len(MultiViewDataset(out)) == 5


def test_a_corrupt_row_is_a_bad_record_counted_and_skipped(folders, tmp_path):
    out = str(tmp_path / "bad")
    rows = shards.rows_of_objects(folders, sorted(e["object_id"] for e in MultiViewDataset(folders).entries))
    rows[1]["views"][2] = b"not a png"
    rows[3]["camera_to_world"] = rows[3]["camera_to_world"][:-5]
    shards.append_shard(out, rows)
    dataset = MultiViewDataset(out, num_views=8)
    with pytest.raises(BadRecord) as bad_png:
        dataset.load(1)
    with pytest.raises(BadRecord) as bad_row:
        dataset.load(3)
    assert (bad_png.value.reason, bad_row.value.reason) == ("bad_png", "bad_record")
    report = validate_multiview(out, num_views=8)
    assert not report["ok"] and report["reasons"] == {"bad_png": 1, "bad_record": 1}
    loader = MixtureLoader(dataset, None, multiview_batch=2, p_multiview=1.0, num_steps=6, seed=0)
    batches = list(loader)
    assert all(b.images.shape[0] == 2 * 8 for b in batches)  # spares filled every batch
    assert not {1, 3} & {i for b in batches for i in b.indices}
    assert loader.stats["skipped_multiview"] >= 1
    assert set(loader.stats["reasons"]["multiview"]) <= {"bad_png", "bad_record"}


def test_a_truncated_shard_file_is_a_bad_record_not_a_crash(folders, tmp_path):
    out = str(tmp_path / "trunc")
    shard_folders(folders, out, objects_per_shard=5)
    name = shards.read_shards_manifest(out)["shards"][0]["name"]
    path = storage.join(out, name)
    storage.write_bytes(path, storage.read_bytes(path)[:100])
    with pytest.raises(BadRecord, match="bad_parquet|mv-shard"):
        MultiViewDataset(out, resolution=16).load(0)


def test_shard_rows_round_trip_the_record_exactly(folders):
    ids = sorted(e["object_id"] for e in MultiViewDataset(folders).entries)
    (row,) = shards.rows_of_objects(folders, ids[:1])
    table = pa.Table.from_pylist([row], schema=shards.SCHEMA)
    back = shards.record_from_row(table.to_pylist()[0])
    original = storage.read_json(storage.join(folders, "objects", ids[0], "cameras.json"))
    assert back.to_json() == original | {"extra": original.get("extra", {})}
