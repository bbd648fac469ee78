"""Evaluation metrics (colour, silhouettes) and jobs/evaluate.py end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mvdream_platform.data.shapes import COLOURS
from mvdream_platform.evaluation import (
    EvalSettings,
    aligned_iou,
    classify_colour,
    foreground_mask,
    held_out_objects,
    render_ground_truth,
    shaded_palette,
)

from jobs_helpers import compose, import_job


@pytest.mark.parametrize("name", list(COLOURS))
@pytest.mark.parametrize("shade", [0.4, 0.7, 1.0])
def test_shaded_palette_colours_classify_as_themselves(name, shade):
    pixels = np.tile(np.asarray(COLOURS[name]) / 255 * shade, (5, 1))
    assert classify_colour(pixels, shaded_palette()) == name


def test_aligned_iou_ignores_scale_and_position_but_not_shape():
    square = np.zeros((32, 32), bool)
    square[4:12, 4:12] = True
    big_square = np.zeros((32, 32), bool)
    big_square[10:30, 8:28] = True
    disc = np.hypot(*np.mgrid[-16:16, -16:16]) < 10
    assert aligned_iou(square, big_square) > 0.95
    assert 0.6 < aligned_iou(square, disc) < 0.9
    bar = np.zeros((32, 32), bool)
    bar[14:18, 2:30] = True
    assert aligned_iou(bar, square) < 0.5  # aspect ratio is kept


def test_ground_truth_renders_score_perfectly_against_themselves():
    settings = EvalSettings(num_objects=6, num_views=4)
    objects = held_out_objects(settings)
    assert all(o.attributes["relation"] is None for o in objects)  # single primitives
    assert all(int(o.object_id.split("-")[1]) >= 2_000_000 for o in objects)  # never trained on
    palette = shaded_palette()
    for obj in objects:
        truth = render_ground_truth(obj, settings, 32)
        assert truth.shape == (4, 32, 32, 3)
        for view in truth:
            mask = foreground_mask(view, settings.foreground_threshold)
            assert 0.05 < mask.mean() < 0.9
            assert classify_colour(view[mask], palette) == obj.attributes["parts"][0]["colour"]


def test_evaluate_job_writes_report_and_grid(tmp_path):
    out = tmp_path / "eval"
    record = import_job("evaluate").run(compose("evaluate", [
        "model=tiny_init", "num_objects=3", "steps=2", "resolution=16",
        f"out={out}"]))
    saved = json.loads((out / "report.json").read_text())
    assert saved["objects"] == 3 and saved["views"] == 12 == record["views"]
    assert saved["gt_colour_accuracy"] > 0.9  # the metric itself works on ground truth
    assert 0.0 <= saved["colour_accuracy"] <= 1.0 and 0.0 <= saved["mean_iou"] <= 1.0
    assert len(saved["per_object"]) == 3 and len(saved["per_object"][0]["views"]) == 4
    assert (out / "grid.png").stat().st_size > 0
    assert "consistency" not in saved and not (out / "consistency.json").exists()


def test_evaluate_job_runs_the_consistency_benchmark(tmp_path):
    out = tmp_path / "eval"
    record = import_job("evaluate").run(compose("evaluate", [
        "model=tiny_init", "num_objects=1", "steps=2", "resolution=16", "consistency_sets=2",
        "batch_prompts=10", f"out={out}"]))
    saved = json.loads((out / "consistency.json").read_text())
    assert set(saved["kinds"]) == set(record["consistency"]) == {"colour", "layout", "marker"}
    for kind, report in saved["kinds"].items():
        assert report["sets"] == 2 and len(report["per_set"]["joint"]) == 2
        assert record["consistency"][kind]["margin"] == pytest.approx(
            report["rates"]["joint"] - report["rates"]["independent"])
        assert report["truth_check"] >= 0.5
        grid = np.asarray(Image.open(out / f"consistency_{kind}_independent.png"))
        assert grid.shape == (2 * 16, 4 * 16, 3)


def test_speckle_is_not_an_object_but_a_render_is():
    from mvdream_platform.evaluation import object_present

    settings = EvalSettings(num_objects=2)
    for obj in held_out_objects(settings):
        for view in render_ground_truth(obj, settings, 32):
            assert object_present(foreground_mask(view, settings.foreground_threshold))
    rng = np.random.default_rng(0)
    speckle = np.clip(0.5 + rng.normal(0, 0.12, (32, 32, 3)), 0, 1)  # what undertrained models sample
    mask = foreground_mask(speckle, settings.foreground_threshold)
    assert mask.mean() > 0.05 and not object_present(mask)
    assert not object_present(np.zeros((32, 32), bool))


