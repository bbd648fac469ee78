"""Multi-view and text-image datasets on tiny fixtures written here in the layout of layout.py.

The fixture writers below are also used by tests/test_mixture.py and benchmarks/bench_data.py.
Each rendered view encodes its own index in the colour of an opaque centre square and is
transparent in the corners, so a test can tell which view was loaded and what background
it was composited over.
"""

from __future__ import annotations

import io
import json
import tarfile
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fsspec.core import url_to_fs
from PIL import Image

from mvdream_platform import storage
from mvdream_platform.cameras import normalize_camera, orbit_camera_to_world
from mvdream_platform.data import datasets as D
from mvdream_platform.data.layout import (
    CAMERAS_FILE,
    IMAGES_MANIFEST,
    MANIFEST,
    OBJECTS_DIR,
    SHARD_PATTERN,
    ObjectRecord,
    view_name,
)

ELEVATION, DISTANCE = 20.0, 2.5


# ----------------------------------------------------------------------------- fixture writers


def view_colour(view: int) -> tuple[int, int, int]:
    """The opaque centre colour of view ``view`` (R encodes the index)."""
    return (8 * view % 256, 200, 40)


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def view_png(view: int, size: int) -> bytes:
    """(size, size) RGBA: transparent border, opaque centre square coloured by the view."""
    rgba = np.zeros((size, size, 4), np.uint8)
    lo, hi = size // 4, size - size // 4
    rgba[lo:hi, lo:hi, :3] = view_colour(view)
    rgba[lo:hi, lo:hi, 3] = 255
    return png_bytes(rgba)


def object_record(object_id: str, num_rendered: int, resolution: int,
                  caption: str | None = None) -> ObjectRecord:
    azimuths = [360.0 * i / num_rendered for i in range(num_rendered)]
    # Stored cameras use MVDream azimuths; orbit azimuth = MVDream azimuth - 90.
    c2w = orbit_camera_to_world(ELEVATION, torch.tensor(azimuths) - 90.0, DISTANCE)
    return ObjectRecord(object_id=object_id, caption=caption or f"a thing called {object_id}",
                        attributes={"index": object_id}, resolution=resolution,
                        azimuths_deg=azimuths, elevation_deg=ELEVATION, fovy_deg=40.0,
                        distance=DISTANCE, camera_to_world=c2w.tolist())


def write_object(root: str, record: ObjectRecord, view_bytes=view_png) -> None:
    """Views first, cameras.json last (its presence marks the object complete)."""
    folder = storage.join(root, OBJECTS_DIR, record.object_id)
    for v in range(record.num_views):
        storage.write_bytes(storage.join(folder, view_name(v)), view_bytes(v, record.resolution))
    storage.write_json(storage.join(folder, CAMERAS_FILE), record.to_json())


def write_multiview_fixture(root: str, num_objects: int = 4, num_rendered: int = 8,
                            resolution: int = 8, view_bytes=view_png) -> list[ObjectRecord]:
    """``num_objects`` objects ``obj-000``.. with manifest.jsonl; returns their records."""
    records = [object_record(f"obj-{i:03d}", num_rendered, resolution) for i in range(num_objects)]
    for record in records:
        write_object(root, record, view_bytes)
    lines = "".join(json.dumps(r.manifest_entry()) + "\n" for r in records)
    storage.write_text(storage.join(root, MANIFEST), lines)
    return records


def image_row(i: int, size: tuple[int, int] = (12, 8), fmt: str = "PNG") -> dict:
    """One parquet row: a (w, h) RGB image whose colour encodes ``i``."""
    w, h = size
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0], rgb[..., 1] = i % 256, 100
    rgb[:, : w // 2, 2] = 255  # left half blue: crops are visible
    return {"key": f"img-{i:04d}", "image": png_bytes(rgb, fmt), "caption": f"photo {i}",
            "width": w, "height": h}


def write_parquet(uri: str, rows: list[dict], row_group_size: int = 4) -> None:
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    schema = pa.schema([("key", pa.string()), ("image", pa.binary()), ("caption", pa.string()),
                        ("width", pa.int32()), ("height", pa.int32())])
    sink = io.BytesIO()
    pq.write_table(pa.table(columns, schema=schema), sink, row_group_size=row_group_size)
    storage.write_bytes(uri, sink.getvalue())


def write_parquet_fixture(root: str, num_rows: int = 10, rows_per_shard: int = 4,
                          size: tuple[int, int] = (12, 8), row_group_size: int = 2,
                          manifest: bool = True, fmt: str = "PNG") -> list[dict]:
    rows = [image_row(i, size, fmt) for i in range(num_rows)]
    shards = []
    for s, start in enumerate(range(0, num_rows, rows_per_shard)):
        name = SHARD_PATTERN.format(index=s)
        write_parquet(storage.join(root, name), rows[start:start + rows_per_shard],
                      row_group_size)
        shards.append({"name": name, "rows": len(rows[start:start + rows_per_shard])})
    if manifest:
        storage.write_json(storage.join(root, IMAGES_MANIFEST),
                           {"shards": shards, "rows": num_rows, "source": "test"})
    return rows


def write_tar(uri: str, members: dict[str, bytes]) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    storage.write_bytes(uri, buffer.getvalue())


def memory_uri() -> str:
    return f"memory://mvdream-test-{uuid.uuid4().hex[:8]}"


# ----------------------------------------------------------------------------- multi-view


def centre_colour(view_images: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> the centre pixel as 0..255 RGB."""
    h, w = view_images.shape[-2:]
    return np.round((view_images[:, h // 2, w // 2].numpy() + 1) * 127.5)


def test_multiview_item_shapes_ranges_and_dtypes(tmp_path):
    write_multiview_fixture(str(tmp_path), num_objects=3, num_rendered=8, resolution=8)
    ds = D.MultiViewDataset(str(tmp_path))
    assert len(ds) == 3 and ds.resolution == 8
    item = ds[1]
    assert item["images"].shape == (4, 3, 8, 8) and item["images"].dtype == torch.float32
    assert item["images"].min() >= -1 and item["images"].max() <= 1
    assert item["cameras"].shape == (4, 16) and item["cameras"].dtype == torch.float32
    assert item["azimuths_deg"].shape == (4,) and item["view_indices"].shape == (4,)
    assert item["object_id"] == "obj-001" and item["caption"] == "a thing called obj-001"
    assert item["attributes"] == {"index": "obj-001"}


def test_views_are_90_degrees_apart_and_cameras_match_pixels(tmp_path):
    records = write_multiview_fixture(str(tmp_path), num_objects=1, num_rendered=32,
                                      resolution=8)
    ds = D.MultiViewDataset(str(tmp_path))
    starts = set()
    for epoch in range(12):
        item = ds.load(0, epoch)
        k = int(item["view_indices"][0])
        starts.add(k)
        assert item["view_indices"].tolist() == [(k + 8 * j) % 32 for j in range(4)]
        az = item["azimuths_deg"].double()
        assert torch.allclose(torch.remainder(az.roll(-1) - az, 360.0),
                              torch.full((4,), 90.0, dtype=torch.float64))
        # Cameras: the stored c2w of exactly those views, translation normalised to 1.
        stored = torch.tensor(records[0].camera_to_world)[item["view_indices"]]
        assert torch.allclose(item["cameras"], normalize_camera(stored), atol=1e-6)
        expected = orbit_camera_to_world(ELEVATION, az - 90.0, 1.0).reshape(4, 16)
        assert torch.allclose(item["cameras"], expected, atol=1e-5)
        mats = item["cameras"].reshape(4, 4, 4)
        positions = mats[:, :3, 3]
        assert torch.allclose(positions.norm(dim=-1), torch.ones(4), atol=1e-5)
        # Each next camera is the previous one turned 90 degrees about the z (up) axis.
        rz = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
        assert torch.allclose(positions @ rz.T, positions.roll(-1, dims=0), atol=1e-5)
        # The pixels come from the same views as the cameras.
        for f in range(4):
            assert centre_colour(item["images"][f])[0] == view_colour((k + 8 * f) % 32)[0]
    assert len(starts) > 3  # the start is random


def test_random_grey_background_is_one_level_per_item(tmp_path):
    write_multiview_fixture(str(tmp_path), num_objects=4, num_rendered=4, resolution=8)
    ds = D.MultiViewDataset(str(tmp_path))
    greys = []
    for index in range(4):
        item = ds.load(index, 0)
        corners = item["images"][:, :, 0, 0]  # (4 views, 3 channels), transparent there
        assert torch.allclose(corners, corners[0, 0].expand(4, 3), atol=1e-6)
        grey = (corners[0, 0].item() + 1) / 2
        assert torch.allclose(item["background"], torch.full((3,), grey), atol=1e-6)
        greys.append(grey)
    assert len({round(g, 4) for g in greys}) == 4 and all(0 <= g <= 1 for g in greys)

    white = D.MultiViewDataset(str(tmp_path), background="white")[0]["images"][:, :, 0, 0]
    assert torch.allclose(white, torch.ones_like(white))
    red = D.MultiViewDataset(str(tmp_path), background=(1.0, 0.0, 0.0))[0]["images"][0, :, 0, 0]
    assert torch.allclose(red, torch.tensor([1.0, -1.0, -1.0]))


def test_randomness_is_deterministic_per_seed_epoch_and_index(tmp_path):
    write_multiview_fixture(str(tmp_path), num_objects=4, num_rendered=8, resolution=8)

    def draws(seed, epoch):
        ds = D.MultiViewDataset(str(tmp_path), seed=seed)
        ds.set_epoch(epoch)
        return [(ds[i]["view_indices"].tolist(), ds[i]["background"][0].item()) for i in range(4)]

    assert draws(0, 0) == draws(0, 0)
    assert draws(0, 0) != draws(0, 1)
    assert draws(0, 0) != draws(1, 0)
    ds = D.MultiViewDataset(str(tmp_path))
    assert torch.equal(ds.load(2, 5)["images"], ds.load(2, 5)["images"])


def test_resolution_resizes_with_antialiasing(tmp_path):
    write_multiview_fixture(str(tmp_path), num_objects=1, num_rendered=4, resolution=16)
    item = D.MultiViewDataset(str(tmp_path), resolution=8, background="black")[0]
    assert item["images"].shape == (4, 3, 8, 8)
    assert item["images"].min() >= -1 and item["images"].max() <= 1
    # The opaque centre square keeps its colour; the black border stays black.
    assert centre_colour(item["images"][0])[1] == 200
    assert item["images"][0, 1, 0, 0] == -1


def test_manifest_fallback_and_bad_manifest_lines(tmp_path):
    root = str(tmp_path)
    write_multiview_fixture(root, num_objects=3, num_rendered=4, resolution=8)
    lines = (tmp_path / MANIFEST).read_text().splitlines()
    (tmp_path / MANIFEST).write_text("\n".join([lines[0], "{not json", lines[1], lines[2]]))
    ds = D.MultiViewDataset(root)
    assert len(ds) == 3 and ds.listing_skips == {"bad_manifest_line": 1}
    (tmp_path / MANIFEST).unlink()  # an interrupted prepare job: no manifest yet
    ds = D.MultiViewDataset(root)
    assert [e["object_id"] for e in ds.entries] == ["obj-000", "obj-001", "obj-002"]
    assert ds.resolution == 8 and ds[0]["images"].shape == (4, 3, 8, 8)


def test_clear_errors_for_bad_arguments(tmp_path):
    write_multiview_fixture(str(tmp_path), num_objects=1, num_rendered=4)
    with pytest.raises(ValueError, match="num_views"):
        D.MultiViewDataset(str(tmp_path), num_views=0)
    with pytest.raises(ValueError, match="background"):
        D.MultiViewDataset(str(tmp_path), background="pink")
    with pytest.raises(ValueError, match="seed"):
        D.MultiViewDataset(str(tmp_path), seed=-1)
    with pytest.raises(ValueError, match="no finished objects"):
        D.MultiViewDataset(str(tmp_path / "empty"))
    write_parquet_fixture(str(tmp_path / "img"))
    with pytest.raises(ValueError, match="crop"):
        D.TextImageDataset(str(tmp_path / "img"), 8, crop="diagonal")
    with pytest.raises(ValueError, match="resolution"):
        D.TextImageDataset(str(tmp_path / "img"), 0)


# ----------------------------------------------------------------------------- corrupt records


def _truncated_png(view: int, size: int) -> bytes:
    data = view_png(view, size)
    return data[: len(data) // 2]


MULTIVIEW_CORRUPTIONS = {
    "bad_png": lambda folder: (folder / view_name(1)).write_bytes(b"this is not a png"),
    "truncated_png": lambda folder: (folder / view_name(2)).write_bytes(_truncated_png(2, 8)),
    "missing_view": lambda folder: (folder / view_name(3)).unlink(),
    "bad_json": lambda folder: (folder / CAMERAS_FILE).write_text("{\"object_id\": "),
    "wrong_size": lambda folder: (folder / view_name(0)).write_bytes(view_png(0, 6)),
    "missing_caption": lambda folder: _edit_cameras(folder, caption=""),
    "missing_cameras": lambda folder: (folder / CAMERAS_FILE).unlink(),
    "num_views": lambda folder: _edit_cameras(folder, azimuths_deg=[0.0, 120.0, 240.0],
                                              camera_to_world=_edit_cameras.c2w[:3]),
}
EXPECTED_REASON = {"truncated_png": "bad_png"}


def _edit_cameras(folder, **fields):
    data = json.loads((folder / CAMERAS_FILE).read_text())
    data.update(fields)
    (folder / CAMERAS_FILE).write_text(json.dumps(data))


_edit_cameras.c2w = object_record("x", 4, 8).camera_to_world


def write_corrupt_multiview(tmp_path, cases, healthy: int = 2) -> dict[str, str]:
    """One object per case, each corrupted by its case, then ``healthy`` good ones (4 views
    each, so every view is read); returns object_id -> expected reason."""
    records = write_multiview_fixture(str(tmp_path), num_objects=len(cases) + healthy,
                                      num_rendered=4, resolution=8)
    expected = {}
    for record, case in zip(records, cases):
        MULTIVIEW_CORRUPTIONS[case](tmp_path / OBJECTS_DIR / record.object_id)
        expected[record.object_id] = EXPECTED_REASON.get(case, case)
    return expected


@pytest.mark.parametrize("case", sorted(MULTIVIEW_CORRUPTIONS))
def test_each_corrupt_multiview_record_raises_bad_record(tmp_path, case):
    expected = write_corrupt_multiview(tmp_path, [case])
    ds = D.MultiViewDataset(str(tmp_path))
    with pytest.raises(D.BadRecord) as info:
        ds.load(0, 0)  # 4 rendered views, 4 chosen: every view is read
    assert info.value.reason == expected["obj-000"]
    assert ds.load(1, 0)["images"].shape == (4, 3, 8, 8)  # the others still load


def test_validate_multiview_reports_every_problem(tmp_path):
    expected = write_corrupt_multiview(tmp_path, sorted(MULTIVIEW_CORRUPTIONS))
    # An object still rendering (no cameras.json, not in the manifest) and one finished
    # after the manifest was written.
    write_object(str(tmp_path), object_record("zz-rendering", 4, 8))
    (tmp_path / OBJECTS_DIR / "zz-rendering" / CAMERAS_FILE).unlink()
    write_object(str(tmp_path), object_record("zz-late", 4, 8))
    report = D.validate_multiview(str(tmp_path))
    assert report["ok"] is False
    assert report["objects_listed"] == len(expected) + 2
    assert report["objects_ok"] == 2 and report["objects_bad"] == len(expected)
    assert {b["object_id"]: b["reason"] for b in report["bad"]} == expected
    no_cameras = [i for i, reason in expected.items() if reason == "missing_cameras"]
    assert report["incomplete"] == [*no_cameras, "zz-rendering"]
    assert report["unlisted"] == ["zz-late"]
    assert report["objects_incomplete"] == 2 and report["objects_unlisted"] == 1
    json.dumps(report)  # JSON-able for validation.json

    healthy = tmp_path / "healthy"
    write_multiview_fixture(str(healthy), num_objects=2, num_rendered=8)
    report = D.validate_multiview(str(healthy))
    assert report["ok"] and report["objects_ok"] == 2 and report["bad"] == []


# ----------------------------------------------------------------------------- text-image


def test_text_image_items_resize_and_crop(tmp_path):
    rows = write_parquet_fixture(str(tmp_path), num_rows=10, rows_per_shard=4, size=(12, 8))
    ds = D.TextImageDataset(str(tmp_path), resolution=8)
    assert len(ds) == 10 and len(ds.shards) == 3
    item = ds[5]
    assert item["images"].shape == (1, 3, 8, 8) and item["images"].dtype == torch.float32
    assert item["images"].min() >= -1 and item["images"].max() <= 1
    assert item["caption"] == rows[5]["caption"] and item["key"] == rows[5]["key"]
    # Shorter side 8 already: the centre 8x8 of the 12x8 image (4 columns dropped, 2 a side):
    # columns 0..3 blue (original 2..5), 4..7 not blue (original 6..9).
    blue = item["images"][0, 2, 0]
    assert (blue[:4] == 1).all() and (blue[4:] == -1).all()
    # Random crops: deterministic per (seed, epoch, index), varying across epochs.
    rand = D.TextImageDataset(str(tmp_path), resolution=8, crop="random")
    offsets = {int((rand.load(5, e)["images"][0, 2, 0] == 1).sum()) for e in range(20)}
    assert len(offsets) > 1
    assert torch.equal(rand.load(5, 3)["images"], rand.load(5, 3)["images"])
    # A cache too small for one row group re-reads the group each time: same items.
    uncached = D.TextImageDataset(str(tmp_path), resolution=8, cache_mb=0)
    assert all(torch.equal(uncached[i]["images"], ds[i]["images"]) for i in range(10))
    # Downscaling (antialiased) to a smaller resolution.
    small = D.TextImageDataset(str(tmp_path), resolution=4)[0]["images"]
    assert small.shape == (1, 3, 4, 4)


def test_text_images_from_tar_shards_and_globbing(tmp_path):
    write_parquet_fixture(str(tmp_path), num_rows=3, manifest=False)
    write_tar(str(tmp_path / "extra.tar"), {
        "a/000.png": image_row(100)["image"], "a/000.txt": b"a tar photo",
        "a/001.jpg": image_row(101, fmt="JPEG")["image"], "a/001.txt": "caf\u00e9".encode(),
        "a/001.json": b"{}",
    })
    ds = D.TextImageDataset(str(tmp_path), resolution=8)  # no manifest: glob both kinds
    assert len(ds) == 5
    items = [ds[i] for i in range(5)]
    # Shards in name order: extra.tar, then shard-00000.parquet.
    assert [it["key"] for it in items] == ["a/000", "a/001", "img-0000", "img-0001", "img-0002"]
    assert items[1]["caption"] == "caf\u00e9" and items[1]["images"].shape == (1, 3, 8, 8)


def _corrupt_row_group(path) -> None:
    """Overwrite the middle of the first row group's data (the footer stays readable)."""
    meta = pq.ParquetFile(path).metadata
    column = meta.row_group(0).column(1)  # the image column chunk
    data = bytearray(path.read_bytes())
    start = column.data_page_offset
    data[start:start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    path.write_bytes(bytes(data))


def write_corrupt_images(tmp_path) -> dict[str, int]:
    """A good shard, a shard with bad rows, an unreadable row group, a broken shard file and a
    tar sample without caption. Returns the expected counts per reason."""
    write_parquet(str(tmp_path / "shard-00000.parquet"), [image_row(i) for i in range(4)])
    bad_rows = [image_row(i) for i in range(10, 16)]
    bad_rows[0]["image"] = b"garbage"                                  # bad_image
    bad_rows[1]["image"] = bad_rows[1]["image"][:40]                   # truncated: bad_image
    bad_rows[2]["caption"] = None                                      # missing_caption
    bad_rows[3]["width"] = 99                                          # wrong_size
    bad_rows[4]["image"] = None                                        # missing_image
    write_parquet(str(tmp_path / "shard-00001.parquet"), bad_rows, row_group_size=6)
    write_parquet(str(tmp_path / "shard-00002.parquet"), [image_row(i) for i in range(20, 24)],
                  row_group_size=2)
    _corrupt_row_group(tmp_path / "shard-00002.parquet")               # 2 rows: bad_parquet
    (tmp_path / "shard-00003.parquet").write_bytes(b"PAR1 not really")  # listing: bad_shard
    write_tar(str(tmp_path / "shard-00004.tar"), {"t/0.png": image_row(30)["image"],
                                                  "t/1.png": image_row(31)["image"],
                                                  "t/1.txt": b"ok"})  # t/0: missing_caption
    return {"bad_image": 2, "missing_caption": 2, "wrong_size": 1, "missing_image": 1,
            "bad_parquet": 2}


def test_corrupt_text_image_rows_raise_bad_record_and_validate_reports_them(tmp_path):
    expected = write_corrupt_images(tmp_path)
    ds = D.TextImageDataset(str(tmp_path), resolution=8)
    assert ds.listing_skips == {"bad_shard": 1}
    assert len(ds) == 4 + 6 + 4 + 2
    reasons = {}
    for i in range(len(ds)):
        try:
            ds[i]
        except D.BadRecord as error:
            reasons[error.reason] = reasons.get(error.reason, 0) + 1
    assert reasons == expected
    report = D.validate_text_images(str(tmp_path))
    assert report["ok"] is False and report["reasons"] == expected
    assert report["rows_listed"] == 16 and report["rows_ok"] == 16 - sum(expected.values())
    assert report["rows_bad"] == sum(expected.values()) == len(report["bad"])
    assert [b["reason"] for b in report["bad_shards"]] == ["bad_shard"]
    json.dumps(report)


# ----------------------------------------------------------------------------- memory://


def test_memory_round_trip_of_both_layouts():
    root = memory_uri()
    records = write_multiview_fixture(f"{root}/mv", num_objects=2, num_rendered=8, resolution=8)
    rows = write_parquet_fixture(f"{root}/img", num_rows=5)
    write_tar(f"{root}/img/extra.tar", {"k.png": image_row(7)["image"], "k.txt": b"x"})
    mv = D.MultiViewDataset(f"{root}/mv")
    item = mv.load(1, 3)
    stored = torch.tensor(records[1].camera_to_world)[item["view_indices"]]
    assert torch.allclose(item["cameras"], normalize_camera(stored))
    assert D.validate_multiview(f"{root}/mv")["ok"]
    img = D.TextImageDataset(f"{root}/img", resolution=8)  # manifest lists the parquet only
    assert len(img) == 5 and img[4]["caption"] == rows[4]["caption"]
    assert D.validate_text_images(f"{root}/img")["ok"]
    fs, path = url_to_fs(root)
    fs.rm(path, recursive=True)


def test_rate_limited_warning_logs_a_burst_then_throttles(caplog):
    warner = D.RateLimitedWarning(D.log, burst=3, interval_s=3600)
    with caplog.at_level("WARNING", logger=D.log.name):
        logged = [warner.warn("k", f"message {i}") for i in range(10)]
    assert logged == [True] * 3 + [False] * 7
    assert len(caplog.records) == 3
