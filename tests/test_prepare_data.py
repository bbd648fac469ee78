"""jobs/prepare_data.py: multi-view renders and text-image shards, resumable, on any URI."""

from __future__ import annotations

import io
import json
import re
import shutil

import numpy as np
import PIL.Image
import pyarrow.parquet as pq
import pytest

from mvdream_platform import storage
from mvdream_platform.cameras import mvdream_to_orbit_azimuth, orbit_camera_to_world
from mvdream_platform.data import layout
from mvdream_platform.data.prepare import BUILTIN_PHOTOS

from conftest import MESHES, shutdown_ray
from jobs_helpers import compose, import_job, run_job


def _prepare(*overrides: str) -> dict:
    return import_job("prepare_data").run(compose("prepare_data", list(overrides)))


def _png(uri: str) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(storage.read_bytes(uri))))


def test_shapes_rendered_to_memory_uri_with_cameras_and_manifest():
    out = "memory://prep/shapes"
    summary = _prepare("source=shapes", "num_objects=3", "views=8", "resolution=32",
                       "backend=serial", f"out={out}")
    assert summary["rendered"] == 3 and summary["failed"] == 0 and summary["views"] == 8
    lines = storage.read_bytes(storage.join(out, layout.MANIFEST)).decode().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["object_id"] for e in entries] == sorted(e["object_id"] for e in entries)
    assert len(entries) == 3 and all(e["num_views"] == 8 and e["caption"] for e in entries)
    record = layout.ObjectRecord.from_json(
        storage.read_json(storage.join(out, entries[0]["path"], layout.CAMERAS_FILE)))
    assert record.azimuths_deg == [0.0, 45.0, 90.0, 135.0, 180.0, 225.0, 270.0, 315.0]
    assert 0 <= record.elevation_deg <= 30 and 15 <= record.fovy_deg <= 60
    # the object fills the frame: distance = fill / sin(fovy/2) with fill in [1, 1.15]
    fill = record.distance * np.sin(np.radians(record.fovy_deg) / 2)
    assert fill >= 1.0 and fill <= 1.15
    expected = orbit_camera_to_world(record.elevation_deg,
                                     mvdream_to_orbit_azimuth(np.asarray(record.azimuths_deg)),
                                     record.distance)
    np.testing.assert_allclose(np.asarray(record.camera_to_world), expected.numpy(), atol=1e-6)
    for k in range(8):
        view = _png(storage.join(out, entries[0]["path"], layout.view_name(k)))
        assert view.shape == (32, 32, 4) and view[..., 3].max() == 255 and view[0, 0, 3] == 0


def test_rerun_resumes_and_parallel_backends_match_serial(tmp_path):
    args = ["source=shapes", "num_objects=4", "views=4", "resolution=24"]
    serial = _prepare(*args, "backend=serial", f"out={tmp_path / 'serial'}")
    assert serial["rendered"] == 4
    again = _prepare(*args, "backend=serial", f"out={tmp_path / 'serial'}")
    assert again["rendered"] == 0 and again["skipped_existing"] == 4
    victim = sorted((tmp_path / "serial" / "objects").iterdir())[1]
    (victim / layout.CAMERAS_FILE).unlink()  # an interrupted object: views but no cameras.json
    resumed = _prepare(*args, "backend=serial", f"out={tmp_path / 'serial'}")
    assert resumed["rendered"] == 1 and resumed["skipped_existing"] == 3
    parallel = _prepare(*args, "backend=process", "workers=2", f"out={tmp_path / 'process'}")
    assert parallel["rendered"] == 4
    for folder in sorted((tmp_path / "serial" / "objects").iterdir()):
        twin = tmp_path / "process" / "objects" / folder.name
        for file in sorted(folder.iterdir()):  # the same seed renders the same bytes anywhere
            assert file.read_bytes() == (twin / file.name).read_bytes(), file.name


def test_ray_backend_renders_on_a_local_cluster(tmp_path):

    try:
        summary = _prepare("source=shapes", "num_objects=2", "views=4", "resolution=16",
                           "backend=ray", "workers=2", f"out={tmp_path / 'ray'}")
    finally:
        shutdown_ray()
    assert summary["rendered"] == 2
    assert len(list((tmp_path / "ray" / "objects").glob("*/cameras.json"))) == 2


def test_meshes_with_a_broken_file_are_counted_not_fatal(tmp_path):
    src = tmp_path / "meshes"
    src.mkdir()
    for name in ("Duck.glb", "teapot.stl"):
        shutil.copy(MESHES / name, src / name)
    (src / "teapot.txt").write_text("a white teapot")
    shutil.copy(MESHES / "bunny.ply", src / "bunny.ply")  # a y-up scan in a z-up format
    (src / "bunny.json").write_text(json.dumps({"caption": "a stanford bunny", "up_axis": "y"}))
    (src / "broken.glb").write_bytes(b"glTF but not really")
    summary = _prepare("source=meshes", f"input={src}", "views=4", "resolution=32",
                       "backend=serial", f"out={tmp_path / 'out'}")
    assert summary["rendered"] == 3 and summary["failed"] == 1
    assert summary["failures"][0]["object_id"].startswith("broken-")
    entries = [json.loads(x) for x in (tmp_path / "out" / layout.MANIFEST).read_text().splitlines()]
    captions = sorted(e["caption"] for e in entries)
    assert captions == ["a duck", "a stanford bunny", "a white teapot"]
    bunny = next(e for e in entries if e["caption"] == "a stanford bunny")
    assert bunny["attributes"]["normalization"]["up_axis"] == "y"


def test_builtin_text_image_shards(tmp_path):
    out = tmp_path / "images"
    manifest = _prepare("source=images", "input=builtin", "num_objects=3", "resolution=32",
                        "rows_per_shard=5", f"out={out}")
    assert manifest["rows"] == 3 + len(BUILTIN_PHOTOS) and manifest["skipped"] == 0
    assert len(manifest["shards"]) == -(-manifest["rows"] // 5)
    table = pq.read_table(out / manifest["shards"][0]["name"])
    assert table.column_names == ["key", "image", "caption", "width", "height"]
    first = table.to_pylist()[0]
    assert first["key"] == "render-000000" and first["caption"]
    image = PIL.Image.open(io.BytesIO(first["image"]))
    assert image.size == (32, 32) == (first["width"], first["height"])
    keys = [row["key"] for shard in manifest["shards"] for row in pq.read_table(out / shard["name"]).to_pylist()]
    assert "photo-chelsea" in keys and len(set(keys)) == len(keys)


def test_image_folder_with_captions_and_a_corrupt_image(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        PIL.Image.new("RGB", (20, 10), colour).save(src / f"img{i}.png")
    (src / "img0.txt").write_text("a red rectangle")
    (src / "captions.json").write_text(json.dumps({"img1": "a blue rectangle", "bad": "noise"}))
    (src / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    manifest = _prepare("source=images", f"input={src}", f"captions={src / 'captions.json'}",
                        f"out={tmp_path / 'out'}")
    assert manifest["rows"] == 2 and manifest["skipped"] == 1
    rows = pq.read_table(tmp_path / "out" / manifest["shards"][0]["name"]).to_pylist()
    assert sorted(r["caption"] for r in rows) == ["a blue rectangle", "a red rectangle"]


def test_validate_mode_counts_bad_objects(tmp_path):
    out = tmp_path / "mv"
    _prepare("source=shapes", "num_objects=3", "views=4", "resolution=16", "backend=serial", f"out={out}")
    objects = sorted((out / "objects").iterdir())
    (objects[0] / layout.view_name(2)).write_bytes(b"not a png")
    report = _prepare("mode=validate", "source=shapes", f"out={out}")
    assert report["objects_ok"] == 2 and report["objects_bad"] == 1 and report["ok"] is False
    assert report["bad"][0]["object_id"] == objects[0].name
    assert json.loads((out / "validation.json").read_text())["objects_bad"] == 1


def test_cli_as_documented_and_bad_arguments(tmp_path):
    result = run_job("prepare_data.py", "source=shapes", "num_objects=2", "views=4", "resolution=16",
                     f"out={tmp_path / 'cli'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 objects (2 rendered" in result.stdout + result.stderr
    with pytest.raises(ValueError, match="source must be one of"):
        _prepare("source=clouds", f"out={tmp_path / 'x'}")
    with pytest.raises(ValueError, match="input is required"):
        _prepare("source=meshes", f"out={tmp_path / 'y'}")
    with pytest.raises(ValueError, match="views must be >= 1"):
        _prepare("source=shapes", "views=0", f"out={tmp_path / 'z'}")


def test_front_share_sets_the_share_of_marked_objects():
    out_all, out_none = "memory://prep/front1", "memory://prep/front0"
    for out, share in ((out_all, "1.0"), (out_none, "0.0")):
        _prepare("source=shapes", "num_objects=6", "views=4", "resolution=16", "backend=serial",
                 f"front_share={share}", f"out={out}")
    marked = [[json.loads(line)["attributes"]["parts"][0].get("front") is not None
               for line in storage.read_bytes(storage.join(out, layout.MANIFEST)).decode().splitlines()]
              for out in (out_all, out_none)]
    assert all(marked[0]) and len(marked[0]) == 6
    assert not any(marked[1]) and len(marked[1]) == 6
    rows = _prepare("source=images", "input=builtin", "num_objects=4", "resolution=16",
                    "front_share=1.0", "out=memory://prep/front_images")
    table = pq.read_table(io.BytesIO(storage.read_bytes(
        storage.join("memory://prep/front_images", rows["shards"][0]["name"]))))
    renders = [c for k, c in zip(table.column("key").to_pylist(), table.column("caption").to_pylist())
               if k.startswith("render-")]
    assert len(renders) == 4 and all(re.search(r"with an? (\w+ )?front", c) for c in renders)
    with pytest.raises(ValueError, match="front_share must lie in"):
        _prepare("source=shapes", "num_objects=1", "views=4", "resolution=16", "backend=serial",
                 "front_share=1.5", "out=memory://prep/front_bad")


def test_composite_and_open_shares_set_the_grammar():
    """composite_share=0 and open_share=0: single parts whose captions name every attribute;
    composite_share=1: every object a pair; both reach the 2D set too, and bad shares are named."""
    closed, pairs = "memory://prep/closed", "memory://prep/pairs"
    _prepare("source=shapes", "num_objects=12", "views=4", "resolution=16", "backend=serial",
             "front_share=1.0", "composite_share=0.0", "open_share=0.0", f"out={closed}")
    _prepare("source=shapes", "num_objects=6", "views=4", "resolution=16", "backend=serial",
             "composite_share=1.0", f"out={pairs}")

    def records(out):
        text = storage.read_bytes(storage.join(out, layout.MANIFEST)).decode()
        return [json.loads(line) for line in text.splitlines()]

    closed_records = records(closed)
    assert len(closed_records) == 12
    for record in closed_records:
        attributes = record["attributes"]
        (part,) = attributes["parts"]
        assert attributes["relation"] is None and attributes["open"] == []
        assert f"{part['colour']} " in record["caption"]
        assert re.search(rf"with an? {part['front']} front$", record["caption"])
    assert all(r["attributes"]["relation"] is not None and len(r["attributes"]["parts"]) == 2
               for r in records(pairs))
    rows = _prepare("source=images", "input=builtin", "num_objects=6", "resolution=16",
                    "composite_share=0.0", "open_share=0.0", "out=memory://prep/closed_images")
    table = pq.read_table(io.BytesIO(storage.read_bytes(
        storage.join("memory://prep/closed_images", rows["shards"][0]["name"]))))
    renders = [c for k, c in zip(table.column("key").to_pylist(), table.column("caption").to_pylist())
               if k.startswith("render-")]
    assert len(renders) == 6
    assert not any(re.search(r"next to|left of|right of|on top of|behind|front mark", c) for c in renders)
    _prepare("source=shapes", "num_objects=10", "views=4", "resolution=16", "backend=serial",
             "front_share=0.5", "closed_fronts=true", "out=memory://prep/closed_fronts")
    fronts = records("memory://prep/closed_fronts")
    assert any(r["attributes"]["parts"][0]["front"] for r in fronts)
    for record in fronts:
        if record["attributes"]["parts"][0]["front"]:
            assert record["attributes"]["open"] == [] and len(record["attributes"]["parts"]) == 1
    for name in ("composite_share=2.0", "open_share=-0.1", "closed_fronts=maybe"):
        with pytest.raises(ValueError, match=f"{name.split('=')[0]} must (lie in|be true)"):
            _prepare("source=shapes", "num_objects=1", "views=4", "resolution=16",
                     "backend=serial", name, "out=memory://prep/share_bad")
