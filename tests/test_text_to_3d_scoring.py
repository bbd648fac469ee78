"""Text-to-3D scoring outside the SDS core: 3D geometry, the Janus verdict, the procedural scorer.

Geometry and Janus are checked on hand-made meshes (procedural objects and trimesh primitives,
drawn by our renderer) where the answer is known; the scorer on "perfect" and "Janus" fields
(the truth itself, or a two-faced copy, as what the run renders) and on a real untrained NeRF.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from mvdream_platform.data import render, shapes
from mvdream_platform.evaluation import geometry, janus
from mvdream_platform.evaluation.text_to_3d import ProceduralScorer, headline, object_for_prompt
from mvdream_platform.sds.optimize import OrbitRenders
from mvdream_platform.sds.pipeline import FinishedRun, TextTo3DResult

ROOT = Path(__file__).resolve().parents[1]


def procedural(shape: str, colour: str = "red", front: str | None = None, adjective: str | None = None,
               aspect: float | None = None) -> trimesh.Trimesh:
    part = {"shape": shape, "colour": colour, "adjective": adjective, "aspect": aspect, "size": 1.0, "front": front}
    return shapes.build_mesh({"parts": [part], "relation": None})[0]


def paint(mesh: trimesh.Trimesh, direction, colour: str) -> trimesh.Trimesh:
    """A copy with the faces looking along ``direction`` (within ~41 degrees, on that half)
    painted ``colour``: the same rule as the procedural front marker, any side."""
    painted = mesh.copy()
    colours = np.array(painted.visual.face_colors)
    d = np.asarray(direction, dtype=np.float64)
    facing = (painted.face_normals @ d >= 0.75) & (painted.triangles_center @ d > 0)
    colours[facing, :3] = shapes.COLOURS[colour]
    painted.visual.face_colors = colours
    return painted


def orbit_renders(mesh: trimesh.Trimesh, resolution: int, views: int = 16):
    azimuths, c2w = janus.janus_orbit(views)
    rgba = render.render_views(mesh, c2w, 40.0, resolution, antialias=2)
    return rgba[..., :3] / 255, rgba[..., 3] / 255, azimuths


# ------------------------------------------------------------------------------ geometry
def test_a_mesh_against_itself_and_a_moved_scaled_copy():
    cube = procedural("cube")
    same = geometry.compare_geometry(cube, cube)
    assert same["volume_iou"] == 1.0 and same["chamfer"] == 0.0
    assert same["genus"] == same["genus_truth"] == 0 and same["topology_ok"]
    assert same["alignment"] == {"scale": 1.0, "translation": [0.0, 0.0, 0.0]}

    moved = cube.copy()
    moved.apply_scale(0.37)
    moved.apply_translation([0.3, -0.2, 0.1])
    scores = geometry.compare_geometry(moved, cube)
    assert scores["volume_iou"] >= 0.99 and scores["chamfer"] < 1e-6
    assert scores["alignment"]["scale"] == pytest.approx(1 / 0.37, rel=1e-6)
    aligned, alignment = geometry.align_to(moved, cube)
    np.testing.assert_allclose(aligned.vertices, cube.vertices, atol=1e-9)


def test_a_sphere_against_a_cube_scores_in_the_known_band():
    """Equal volumes, same centre: the sphere's caps stick out of the cube's faces (~0.73);
    an inscribed sphere (what a bounding-box alignment would do) scores pi / 6 ~ 0.52."""
    cube = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    scores = geometry.compare_geometry(sphere, cube)
    assert 0.68 <= scores["volume_iou"] <= 0.78
    assert 0.04 <= scores["chamfer"] <= 0.12  # clearly not the same surface
    assert scores["topology_ok"]  # both genus 0
    assert geometry.volume_iou(sphere, cube) == pytest.approx(np.pi / 6, abs=0.02)  # as they lie


def test_genus_tells_a_torus_from_a_disc_and_a_marching_cubes_torus_has_its_hole():
    from mvdream_platform.sds.export import extract_mesh

    torus, disc = procedural("torus"), procedural("cylinder", adjective="flat", aspect=0.3)
    assert geometry.genus(torus) == 1 and geometry.genus(disc) == 0
    scores = geometry.compare_geometry(disc, torus)
    assert (scores["genus"], scores["genus_truth"], scores["topology_ok"]) == (0, 1, False)
    assert scores["volume_iou"] < 0.75

    def torus_density(points: torch.Tensor) -> torch.Tensor:  # > 1 inside a ring of radii 0.5, 0.2
        ring = torch.linalg.norm(points[:, :2], dim=1) - 0.5
        return 2.0 - torch.sqrt(ring ** 2 + points[:, 2] ** 2) / 0.2

    extracted = extract_mesh(torus_density, None, radius=1.0, resolution=48, threshold=1.0)
    scores = geometry.compare_geometry(extracted, torus)
    assert scores["genus"] == 1 and scores["topology_ok"]
    assert scores["volume_iou"] > 0.8  # same shape up to tube thickness ratio and voxels


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_every_procedural_shape_has_its_genus(shape):
    assert geometry.genus(procedural(shape, front="yellow")) == (1 if shape == "torus" else 0)


def test_missing_empty_and_flat_meshes_get_a_clear_result():
    truth = procedural("torus")
    flat = trimesh.Trimesh(vertices=[[0, 0, 0], [1, 0, 0], [0, 1, 0]], faces=[[0, 1, 2]])
    for mesh, reason in ((None, "no mesh"), (trimesh.Trimesh(), "empty"), (flat, "no volume")):
        scores = geometry.compare_geometry(mesh, truth)
        assert scores["volume_iou"] == 0.0 and scores["chamfer"] is None and scores["genus"] is None
        assert scores["genus_truth"] == 1 and scores["topology_ok"] is False
        assert reason in scores["error"]
        json.dumps(scores)
    open_box = trimesh.creation.box()
    open_box.update_faces(np.arange(len(open_box.faces)) != 0)  # one triangle missing
    assert geometry.genus(open_box) is None  # not a closed surface: no genus claimed


# --------------------------------------------------------------------------------- Janus
def test_arcs_wrap_around_and_split_at_deep_valleys():
    assert janus.circular_arcs(np.array([1, 1, 0, 0, 1, 0, 1], bool)) == [[4], [6, 0, 1]]
    assert janus.circular_arcs(np.zeros(4, bool)) == []
    assert janus.circular_arcs(np.ones(3, bool)) == [[0, 1, 2]]
    shares = np.array([0.9, 0.5, 0.1, 0.6, 0.8, 0.3])
    assert janus.split_at_valleys([0, 1, 2, 3, 4, 5], shares) == [[0, 1], [3, 4, 5]]
    assert janus.split_at_valleys([0, 1, 2, 3, 4, 5], np.full(6, 0.7), closed=True) == [[0, 1, 2, 3, 4, 5]]
    assert janus.angular_distance(350.0, 10.0) == pytest.approx(20.0)
    assert janus.arc_centre(np.array([337.5, 0.0, 22.5]), np.array([1.0, 2.0, 1.0])) == pytest.approx(0.0, abs=1e-9)


def test_verdicts_from_share_profiles():
    azimuths = np.arange(8) * 45.0
    front = janus.janus_verdict([0.8, 0.4, 0, 0, 0, 0, 0, 0.4], azimuths)
    assert (front["verdict"], front["front_correct"], front["centre"]) == ("single", True, 0.0)
    assert front["arcs"][0]["azimuths"] == [315.0, 0.0, 45.0]
    side = janus.janus_verdict([0, 0.3, 0.8, 0.3, 0, 0, 0, 0], azimuths)
    assert (side["verdict"], side["front_correct"], side["centre"]) == ("single", False, 90.0)
    two = janus.janus_verdict([0.8, 0.2, 0.1, 0.2, 0.7, 0.2, 0.1, 0.2], azimuths)  # all seen, two peaks
    assert two["verdict"] == "multiple" and len(two["arcs"]) == 2
    smudge = janus.janus_verdict([0.8, 0.4, 0, 0, 0.08, 0, 0, 0.4], azimuths)  # below arc_min_peak
    assert smudge["verdict"] == "single"
    assert janus.janus_verdict(np.zeros(8), azimuths)["verdict"] == "none"
    assert janus.janus_verdict(np.full(8, 0.9), azimuths)["verdict"] == "everywhere"
    with pytest.raises(ValueError, match="shape"):
        janus.janus_verdict([0.1, 0.2], [0.0, 180.0])


@pytest.mark.parametrize("resolution", [32, 64])
def test_janus_on_rendered_cubes(resolution):
    front = procedural("cube", front="yellow")
    cases = {
        "front": (front, "single"),
        "front and back": (paint(front, (0, 1, 0), "yellow"), "multiple"),
        "plain": (procedural("cube"), "none"),
        "right side": (paint(procedural("cube"), (1, 0, 0), "yellow"), "single"),
    }
    results = {}
    for name, (mesh, verdict) in cases.items():
        rgb, alpha, azimuths = orbit_renders(mesh, resolution)
        results[name] = janus.score_janus(rgb, alpha, azimuths, "yellow", body="red")
        assert results[name]["verdict"] == verdict, (name, results[name]["shares"])
    # MVDream azimuth 0 looks at the -y face: the front marker is centred there, and a marker
    # on +x (seen from MVDream azimuth 90) is not at the front.
    assert results["front"]["front_correct"] and abs(results["front"]["centre"]) < 10
    assert results["front"]["shares"][0] > 0.9 and max(results["front"]["shares"][5:12]) == 0.0
    assert results["front"]["body_shares"][8] > 0.9  # the back is red
    assert not results["right side"]["front_correct"] and abs(results["right side"]["centre"] - 90) < 10
    centres = sorted(janus.angular_distance(a["centre"], 0.0) for a in results["front and back"]["arcs"])
    assert centres[0] < 10 and centres[1] > 170
    json.dumps(results)


@pytest.mark.parametrize("resolution", [32, 64])
def test_janus_on_a_sphere_with_caps(resolution):
    """A round object shows the edges of a front and a back cap at once from the side: the
    valley between them still separates the two arcs."""
    cap = procedural("sphere", colour="blue", front="white")
    rgb, alpha, azimuths = orbit_renders(cap, resolution)
    single = janus.score_janus(rgb, alpha, azimuths, "white")
    assert single["verdict"] == "single" and single["front_correct"] and abs(single["centre"]) < 10
    rgb, alpha, azimuths = orbit_renders(paint(cap, (0, 1, 0), "white"), resolution)
    assert janus.score_janus(rgb, alpha, azimuths, "white")["verdict"] == "multiple"


# ---------------------------------------------------------------------------- the scorer
@pytest.mark.parametrize("prompt, expected", [
    ("a red cube with a yellow front", ("cube", "red", None, "yellow")),
    ("  A Tall Red Cube with a Yellow Front, 3d asset", ("cube", "red", "tall", "yellow")),
    ("an orange torus with an orange front", None),  # the marker must differ from the body
    ("a red cube with a front mark", None),  # marker colour open: no definite truth
    ("a red cube with a yellow back", None),
    ("a red cube", ("cube", "red", None, None)),
    ("a flat green cylinder", ("cylinder", "green", "flat", None)),
    ("a tall sphere", None),
    ("a photo of a dog", None),
])
def test_object_for_prompt_reads_marked_prompts(prompt, expected):
    obj = object_for_prompt(prompt)
    if expected is None:
        assert obj is None
        return
    part = obj.attributes["parts"][0]
    assert (part["shape"], part["colour"], part["adjective"], part["front"]) == expected
    assert obj.caption == prompt.strip().lower().split(",")[0].strip()
    if part["front"]:
        assert part["front_faces"] > 0


def mesh_run(prompt: str, mesh: trimesh.Trimesh, out: Path | None, views: int = 4,
             resolution: int = 32) -> FinishedRun:
    """A finished run whose field is ``mesh`` (drawn by our mesh renderer, lit)."""
    def draw(c2w, size: int) -> OrbitRenders:
        rgba = render.render_views(mesh, c2w, 40.0, size, antialias=2)
        return OrbitRenders(rgb=rgba[..., :3], albedo=rgba[..., :3] / 255, opacity=rgba[..., 3] / 255)

    return FinishedRun(prompt=prompt, out=None if out is None else str(out), seed=0, mesh=mesh, render=draw,
                       fovy_deg=40.0, elevation_deg=15.0, distance=3.0, resolution=resolution, views=views)


def test_a_perfect_reconstruction_scores_perfectly_and_writes_its_pictures(tmp_path):
    prompt = "a red cube with a yellow front"
    truth = object_for_prompt(prompt).mesh
    quality = ProceduralScorer()(mesh_run(prompt, truth, tmp_path))
    assert quality["object"] == prompt and len(quality["views"]) == 4
    assert quality["mean_iou"] > 0.97 and quality["mean_iou_raw"] > 0.97 and quality["colour_accuracy"] == 1.0
    # held-out views at MVDream 112.5 .. 67.5: the one facing the front (22.5) is mostly yellow
    assert [v["expected"] for v in quality["views"]].count("yellow") == 1
    assert quality["volume_iou"] == 1.0 and quality["chamfer"] == 0.0
    assert (quality["genus"], quality["genus_truth"], quality["topology_ok"]) == (0, 0, True)
    assert quality["janus"]["verdict"] == quality["janus"]["truth_verdict"] == "single"
    assert quality["janus"]["front_correct"] and len(quality["janus"]["shares"]) == 16
    assert headline(quality) == {"iou": quality["mean_iou"], "iou_raw": quality["mean_iou_raw"],
                                 "colour_accuracy": 1.0, "volume_iou": 1.0, "chamfer": 0.0,
                                 "topology_ok": True, "janus": "single", "janus_free": True}
    assert json.loads(json.dumps(quality)) == quality  # JSON-able as it is
    import imageio.v3 as iio

    assert iio.imread(tmp_path / "quality.png").shape == (64, 4 * 32, 3)
    assert iio.imread(tmp_path / "janus.png").shape == (64, 16 * 32, 3)


def test_a_two_faced_smaller_offset_reconstruction(tmp_path):
    prompt = "a red cube with a yellow front"
    janus_cube = paint(object_for_prompt(prompt).mesh, (0, 1, 0), "yellow")
    janus_cube.apply_scale(0.6)
    janus_cube.apply_translation([0.1, 0.0, -0.2])
    quality = ProceduralScorer()(mesh_run(prompt, janus_cube, None))
    assert quality["janus"]["verdict"] == "multiple" and quality["janus"]["truth_verdict"] == "single"
    assert headline(quality)["janus_free"] is False
    assert quality["volume_iou"] > 0.99  # translation and scale are aligned away
    assert not (tmp_path / "quality.png").exists()


def test_unmarked_and_unknown_prompts():
    scorer = ProceduralScorer()
    torus = object_for_prompt("a purple torus").mesh
    quality = scorer(mesh_run("a purple torus", torus, None))
    assert "janus" not in quality and quality["genus_truth"] == 1 and quality["colour_accuracy"] == 1.0
    assert "janus" not in headline(quality)
    assert scorer(mesh_run("a photo of a dog", torus, None)) is None
    assert headline(None) == {}


def test_the_scorer_on_a_real_untrained_field(tmp_path):
    """The production path without SDS steps: FinishedRun.of_scene renders the NeRF (the
    density blob) and the marching-cubes mesh is scored against a torus: no hole."""
    from mvdream_platform.sds.config import SDSConfig
    from mvdream_platform.sds.export import extract_mesh
    from mvdream_platform.sds.optimize import build_scene

    cfg = SDSConfig.from_dict({"field": {"n_levels": 4, "log2_hashmap_size": 10, "hidden_dim": 16},
                               "render": {"num_samples_per_ray": 16},
                               "export": {"quality_views": 4, "turntable_resolution": 16}})
    scene = build_scene(cfg, seed=0)
    mesh = extract_mesh(scene.field.density, None, radius=cfg.field.radius, resolution=32)
    run = FinishedRun.of_scene(scene, cfg, "a purple torus with a white front", str(tmp_path), mesh=mesh)
    quality = ProceduralScorer(janus_resolution=16)(run)
    assert len(quality["views"]) == 4 and 0.0 <= quality["mean_iou"] <= 1.0
    assert 0.0 < quality["volume_iou"] < 0.9 and quality["chamfer"] > 0.0
    assert (quality["genus"], quality["genus_truth"], quality["topology_ok"]) == (0, 1, False)
    assert quality["janus"]["verdict"] in janus.VERDICTS and quality["janus"]["truth_verdict"] == "single"
    assert (tmp_path / "quality.png").is_file() and (tmp_path / "janus.png").is_file()


# --------------------------------------------------------------- the result and the SDS core
def test_result_json_keeps_the_metrics_keys_and_round_trips():
    result = TextTo3DResult(prompt="a red cube", seed=1, guidance="mvdream", steps=4, resumed_from=2,
                            optimise_seconds=1.5, final={"step": 4, "loss": 0.25},
                            assets={"mesh.glb": "/o/mesh.glb", "mesh_error": "x"}, total_seconds=2.0)
    record = result.to_json()
    assert list(record) == ["prompt", "seed", "guidance", "steps", "resumed_from", "optimise_seconds",
                            "final", "assets", "total_seconds"]  # no quality without one
    assert record["assets"] == {"mesh.glb": "mesh.glb", "mesh_error": "x"}  # no server path
    assert TextTo3DResult.from_json(record, "/o") == result
    assert result.final_loss == 0.25 and result.files() == ["mesh.glb"]
    result.quality = {"mean_iou": 0.5}
    assert list(result.to_json())[-2:] == ["quality", "total_seconds"]
    assert TextTo3DResult.from_json(json.loads(json.dumps(result.to_json())), "/o") == result


def test_the_sds_package_imports_nothing_from_evaluation():
    for path in (ROOT / "platform" / "mvdream_platform" / "sds").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert not any("evaluation" in name for name in names), (path.name, names)
    code = ("import sys, mvdream_platform.sds.pipeline, mvdream_platform.serve.runner; "
            "print(sorted(m for m in sys.modules if 'evaluation' in m))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]"
