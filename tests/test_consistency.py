"""The multi-view consistency benchmark: the metric on ground truth, hand-made failures, the
chance-level arm (a model whose views ignore each other scores exactly 0 above chance), and
the bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest

from mvdream_platform.data.shapes import SIDES
from mvdream_platform.evaluation.consistency import (
    ARMS,
    ConsistencySettings,
    bootstrap_interval,
    compatible_sides,
    consistency_objects,
    read_view,
    render_truth,
    run_consistency,
    sample_sets,
    score_colour_set,
    score_layout_set,
    score_marker_set,
    truth_check,
    view_cameras,
)

SETTINGS = ConsistencySettings()


@pytest.fixture(scope="module")
def truths():
    out = {}
    for kind in ("colour", "layout", "marker"):
        objects = consistency_objects(kind, 24)
        out[kind] = (objects, [render_truth(o, SETTINGS, 32) for o in objects])
    return out


def test_held_out_sets_leave_the_right_thing_open():
    colour = consistency_objects("colour", 12)
    assert [o.caption for o in colour[:3]] == ["a cube", "a sphere", "a cylinder"]
    assert len({o.attributes["parts"][0]["colour"] for o in colour}) > 3  # drawn, not named
    layout = consistency_objects("layout", 40)
    assert all(" next to " in o.caption and o.attributes["open"] == ["side"] for o in layout)
    assert {o.attributes["side"] for o in layout} == set(SIDES)
    for o in layout:
        first, second = o.attributes["parts"]
        assert first["colour"] in o.caption and second["colour"] in o.caption
    marker = consistency_objects("marker", 12)
    assert all(f" {o.attributes['parts'][0]['front']} front" in o.caption for o in marker)
    assert [o.caption for o in consistency_objects("marker", 12)] == [o.caption for o in marker]


def test_the_metric_on_ground_truth(truths):
    assert truth_check("colour", *truths["colour"], SETTINGS) == 1.0
    assert truth_check("marker", *truths["marker"], SETTINGS) == 1.0
    assert truth_check("layout", *truths["layout"], SETTINGS) >= 0.85  # 0.945 on 200 sets
    cameras = view_cameras(4, SETTINGS.elevation)
    for obj, views in zip(*truths["layout"]):
        score = score_layout_set(views, obj, cameras, SETTINGS)
        assert score["side"] in (obj.attributes["side"], None)  # never a wrong side


def test_hand_made_disagreements_fail(truths):
    objects, views = truths["colour"]
    assert score_colour_set(views[0], SETTINGS)["ok"]
    mixed = views[0].copy()
    other = next(v for o, v in zip(objects, views)
                 if o.attributes["parts"][0]["colour"] != objects[0].attributes["parts"][0]["colour"])
    mixed[2] = other[2]
    assert not score_colour_set(mixed, SETTINGS)["ok"]
    rng = np.random.default_rng(0)
    speckle = np.full(views[0].shape, 0.5)
    dots = rng.uniform(size=speckle.shape[:3]) < 0.15
    speckle[dots] = [0.84, 0.15, 0.15]  # scattered red pixels on grey: no object
    assert not score_colour_set(speckle, SETTINGS)["ok"]

    # Layout: mirror the views that see the pair across the image: no side explains them all.
    cameras = view_cameras(4, SETTINGS.elevation)
    objects, views = truths["layout"]
    checked = 0
    for obj, truth in zip(objects, views):
        if score_layout_set(truth, obj, cameras, SETTINGS)["side"] != obj.attributes["side"]:
            continue
        lateral = [0, 2] if obj.attributes["side"] in ("left", "right") else [1, 3]
        mirrored = truth.copy()
        mirrored[lateral[0]] = truth[lateral[0], :, ::-1]
        assert not score_layout_set(mirrored, obj, cameras, SETTINGS)["ok"], obj.caption
        checked += 1
    assert checked >= 15

    # Marker: the front view copied into the back view puts the marker where it cannot be.
    objects, views = truths["marker"]
    for obj, truth in zip(objects, views):
        assert score_marker_set(truth, truth, obj, SETTINGS)["ok"]
        janus = truth.copy()
        janus[2] = truth[0]
        assert not score_marker_set(janus, truth, obj, SETTINGS)["ok"], obj.caption
        plain = truth.copy()
        plain[0] = truth[2]  # no marker in the view that faces it
        assert not score_marker_set(plain, truth, obj, SETTINGS)["ok"], obj.caption


def test_compatible_sides_of_one_view(truths):
    objects, views = truths["layout"]
    cameras = view_cameras(4, SETTINGS.elevation)
    obj, truth = next((o, v) for o, v in zip(objects, views) if o.attributes["side"] == "left")
    first, second = (p["colour"] for p in obj.attributes["parts"])
    names = read_view(truth[0], SETTINGS)["names"]
    assert compatible_sides(names, first, second, cameras[0]) == {"left"}
    # With the first part's pixels gone, the view is compatible with the sides along its axis.
    names[names == first] = ""
    assert compatible_sides(names, first, second, cameras[0]) == {"behind", "front"}


def test_views_that_ignore_each_other_score_zero_above_chance(tiny_pipeline):
    """With 2d attention a model's views never see each other, so the joint arm must be the
    independent arm exactly (paired noise); with 3d attention the arms differ."""
    settings = ConsistencySettings(sets=3, kinds=("colour",), steps=3, batch_prompts=2,
                                   bootstrap=200)
    captions = [o.caption for o in consistency_objects("colour", 3)]
    unet = tiny_pipeline.unet
    before = unet.config.attention_mode
    try:
        unet.set_attention_mode("2d")
        joint, independent = (sample_sets(tiny_pipeline, captions, settings, arm, seed=5) for arm in ARMS)
        size = tiny_pipeline.default_size
        assert joint.shape == (3, 4, size, size, 3)
        np.testing.assert_allclose(joint, independent, atol=1e-5)
        report, grids = run_consistency(tiny_pipeline, settings, progress=False)
        colour = report.kinds["colour"]
        assert colour.margin == 0.0 and colour.rates["joint"] == colour.rates["independent"]
        assert [s["colours"] for s in colour.per_set["joint"]] == [s["colours"] for s in colour.per_set["independent"]]
        assert grids["colour_joint"].shape == (3 * size, 4 * size, 3)
        unet.set_attention_mode("3d")
        joint3d, independent3d = (sample_sets(tiny_pipeline, captions, settings, arm, seed=5) for arm in ARMS)
        assert np.abs(joint3d - independent3d).max() > 1e-3
        np.testing.assert_allclose(independent3d, independent, atol=1e-5)  # F=1: modes agree
    finally:
        unet.set_attention_mode(before)
    assert "| colour | 3 |" in report.table()


def test_bootstrap_interval():
    values = np.r_[np.ones(60), np.zeros(140)]
    lo, hi = bootstrap_interval(values, 2000)
    assert lo < 0.3 < hi and 0.05 < hi - lo < 0.2
    assert bootstrap_interval(np.ones(50)) == (1.0, 1.0)
    lo, hi = bootstrap_interval(np.ones(200), other=np.zeros(200))
    assert lo == hi == 1.0
    wide = bootstrap_interval(values[::10], 2000)
    assert wide[1] - wide[0] > hi - lo


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="kinds.*shape"):
        ConsistencySettings(kinds=("shape",)).validate()
    with pytest.raises(ValueError, match="num_views"):
        ConsistencySettings(num_views=1).validate()
