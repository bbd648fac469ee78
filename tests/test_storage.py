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
