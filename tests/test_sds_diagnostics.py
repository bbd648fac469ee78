"""benchmarks/sds_target.py: the inputs the diagnostic feeds score distillation and the mean
target it reads back. Real renders, a real tiny pipeline and the real guidances."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import make_tiny_pipeline

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import sds_target  # noqa: E402
from mvdream_platform.evaluation.consistency import (  # noqa: E402
    ConsistencySettings,
    consistency_objects,
    render_truth,
    view_cameras,
)
from mvdream_platform.evaluation.models import render_ground_truth_rgba  # noqa: E402
from mvdream_platform.sds.guidance import GuidanceConfig, MultiViewGuidance  # noqa: E402

SETTINGS = ConsistencySettings(sets=3, kinds=("marker",))


@pytest.fixture(scope="module")
def objects():
    return consistency_objects("marker", 3, SETTINGS.shape_seed)


def test_plain_version_paints_the_marker_over_and_drops_it_from_the_caption(objects):
    for obj in objects:
        marker = obj.attributes["parts"][0]["front"]
        plain = sds_target.plain_version(obj)
        assert "front" in obj.caption and "front" not in plain.caption
        assert plain.caption == obj.caption.split(" with ")[0]
        rgb, alpha = render_ground_truth_rgba(obj, SETTINGS, 32)
        plain_rgb, plain_alpha = render_ground_truth_rgba(plain, SETTINGS, 32)
        np.testing.assert_allclose(alpha, plain_alpha, atol=1e-6)  # same silhouette
        inner = np.stack([ndimage.binary_erosion(a > 0.5) for a in alpha])
        shares = sds_target.marker_shares(rgb, inner, marker)
        assert shares[0] > 0.3 and shares[2] == 0.0  # the front shows it, the back does not
        assert sds_target.marker_shares(plain_rgb, inner, marker) == [0.0] * 4


def test_ground_truth_rgba_over_grey_is_the_benchmarks_ground_truth(objects):
    rgb, alpha = render_ground_truth_rgba(objects[0], SETTINGS, 32)
    grey = rgb * alpha[..., None] + 0.5 * (1 - alpha[..., None])
    np.testing.assert_allclose(grey, render_truth(objects[0], SETTINGS, 32), atol=1e-6)


def test_backgrounds_are_per_object_and_of_their_kind():
    assert np.all(sds_target.background_colour("grey", 3) == 0.5)
    level = sds_target.background_colour("random_grey", 3)
    assert np.all(level == level[0]) and not np.allclose(level, sds_target.background_colour("random_grey", 4))
    colour = sds_target.background_colour("random_rgb", 3)
    assert len(set(colour.round(6))) == 3
    np.testing.assert_array_equal(colour, sds_target.background_colour("random_rgb", 3))


def test_mean_target_is_the_guidance_target_averaged_over_the_draws(objects):
    pipe = make_tiny_pipeline(seed=0)
    guidance = MultiViewGuidance(pipe, GuidanceConfig(guidance_scale=3.0, negative_prompt=""))
    views = render_truth(objects[0], SETTINGS, pipe.default_size)
    c2w = view_cameras(SETTINGS.num_views, SETTINGS.elevation)
    mean = sds_target.mean_target(guidance, views, c2w, objects[0].caption, 600, draws=2, seed=5)
    assert mean.shape == views.shape and mean.min() >= 0 and mean.max() <= 1
    rgb = torch.from_numpy(views).float()
    targets = []
    for k in range(2):
        out = guidance(rgb, c2w, objects[0].caption, 0, torch.Generator().manual_seed(5 + k))
        assert out.t == 600  # the bounds were pinned to t
        targets.append(out.target)
    expected = ((pipe.codec.decode((targets[0] + targets[1]) / 2).clamp(-1, 1) + 1) / 2)
    np.testing.assert_allclose(mean, expected.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    single = sds_target.mean_target(guidance, views, c2w, objects[0].caption, 600, draws=1, seed=5)
    assert not np.allclose(single, mean)  # the second draw counts


def test_front_excess_reads_the_views_facing_front_and_back(tmp_path):
    import json

    import janus_front

    shares = [0.0] * 16
    shares[0], shares[1], shares[15] = 0.6, 0.3, 0.3  # a front face seen from -22.5..22.5
    assert janus_front.front_back(shares) == (pytest.approx(0.4), 0.0)
    assert janus_front.front_back([0.2] * 16) == (pytest.approx(0.2), pytest.approx(0.2))  # everywhere
    with pytest.raises(ValueError, match="16 shares"):
        janus_front.front_back([0.0] * 8)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"quality": {"janus": {"verdict": "none", "shares": shares}}}))
    results = tmp_path / "results.json"
    record = {"prompt": "a red cube with a yellow front", "seed": 0, "guidance": "mvdream", "steps": 150,
              "janus": "none", "out": str(run)}
    results.write_text(json.dumps({"runs": [record, dict(record, prompt="a red cube", janus=None)]}))
    (row,) = janus_front.read_runs([results])  # the unmarked prompt is skipped
    assert row["excess"] == pytest.approx(0.4) and row["verdict"] == "none"
    results.write_text(json.dumps({"runs": [dict(record, out=str(tmp_path / "gone"))]}))
    with pytest.raises(FileNotFoundError, match="gone"):
        janus_front.read_runs([results])
    # rows written since stop 35 carry the shares themselves: no run folder needed
    results.write_text(json.dumps({"runs": [dict(record, out=str(tmp_path / "gone"), marker_shares=[0.1] * 16)]}))
    (row,) = janus_front.read_runs([results])
    assert row["front"] == pytest.approx(0.1) and row["excess"] == pytest.approx(0.0)
