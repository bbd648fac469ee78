"""fsspec storage helpers: atomic writes, folder round trips to local paths and memory://."""

from __future__ import annotations

from pathlib import Path

import pytest

from mvdream_platform import storage


def test_json_round_trip_and_no_temp_files_left(tmp_path):
    target = tmp_path / "a" / "b" / "record.json"
    storage.write_json(target, {"x": 1, "y": [1, 2]})
    assert storage.read_json(target) == {"x": 1, "y": [1, 2]}
    assert [p.name for p in target.parent.iterdir()] == ["record.json"]


@pytest.mark.parametrize("remote", [False, True])
def test_put_and_get_dir_round_trip(tmp_path, remote):
    src = tmp_path / "src"
    (src / "unet").mkdir(parents=True)
    (src / "model_index.json").write_text("{}")
    (src / "unet" / "weights.bin").write_bytes(b"\x00\x01" * 100)
    uri = f"memory://models/run-{int(remote)}" if remote else str(tmp_path / "dst" / "pipe")
    storage.put_dir(src, uri)
    storage.put_dir(src, uri)  # replacing an existing folder works
    local = storage.get_dir(uri, cache_root=tmp_path)
    expected = (src / "unet" / "weights.bin").read_bytes()
    assert (Path(local) / "unet" / "weights.bin").read_bytes() == expected
    assert storage.exists(storage.join(uri, "model_index.json"))


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        storage.get_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        storage.get_dir("memory://does/not/exist")


def test_absolute_resolves_local_relative_paths_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("data/set") == str(tmp_path / "data" / "set")
    assert storage.absolute("file://data/set") == str(tmp_path / "data" / "set")
    assert storage.absolute("/abs/path") == "/abs/path"
    assert storage.absolute("s3://bucket/key") == "s3://bucket/key"
    assert storage.absolute(None) is None and storage.absolute("") == ""


def test_jsonable_turns_arrays_tensors_and_tuples_into_json_types():
    import numpy as np
    import torch

    value = {"a": (1, 2), 3: np.float32(0.5), "t": torch.tensor([1.0, 2.0]), "n": np.arange(2)}
    assert storage.jsonable(value) == {"a": [1, 2], "3": 0.5, "t": [1.0, 2.0], "n": [0, 1]}
    assert storage.jsonable(object).startswith("<class")
    with pytest.raises(TypeError, match="cannot store type as JSON"):
        storage.jsonable(object, strict=True)
