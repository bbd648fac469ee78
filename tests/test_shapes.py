"""Procedural objects: determinism, vocabulary coverage, normalisation, placement, colours,
captions, mesh quality and argument errors. Geometry is checked independently of the module's
own contact code, by casting rays (trimesh + embree) at each part."""

from __future__ import annotations

import json

import numpy as np
import pytest
import trimesh

from mvdream_platform.data import shapes
from mvdream_platform.data.shapes import (
    ADJECTIVES,
    COLOURS,
    FRONT_DIRECTION,
    RELATIONS,
    SHAPE_ADJECTIVES,
    SHAPES,
    SIDE_PHRASES,
    SIDES,
    adjective_holds,
    build_mesh,
    caption_for,
    generate_objects,
    make_object,
    object_id_for,
    sample_spec,
)

NUM = 300  # enough objects for every shape, colour, relation and adjective to appear


@pytest.fixture(scope="module")
def objects():
    return list(generate_objects(NUM, seed=0))


def _part(mesh: trimesh.Trimesh, part: dict) -> trimesh.Trimesh:
    start, stop = part["faces"]
    return mesh.submesh([np.arange(start, stop)], append=True)


def _first_hits(mesh: trimesh.Trimesh, origins: np.ndarray, direction) -> np.ndarray:
    """(N, 3) first hit of each ray from ``origins`` along ``direction``; NaN where it misses."""
    directions = np.tile(np.asarray(direction, dtype=float), (len(origins), 1))
    locations, rays, _ = mesh.ray.intersects_location(origins, directions, multiple_hits=False)
    hits = np.full((len(origins), 3), np.nan)
    hits[rays] = locations
    return hits


def _gaps_along(first: trimesh.Trimesh, second: trimesh.Trimesh, axis: int) -> np.ndarray:
    """Distances along ``axis`` from ``first``'s far surface to ``second``'s near surface.

    Rays parallel to ``axis`` on a dense grid (plus every vertex of both parts) hit ``first``
    coming from +axis and ``second`` coming from -axis; negative values mean interpenetration.
    """
    others = [a for a in range(3) if a != axis]
    lo = np.minimum(first.bounds[0], second.bounds[0])[others]
    hi = np.maximum(first.bounds[1], second.bounds[1])[others]
    u, v = (np.linspace(lo[k], hi[k], 160) for k in range(2))
    grid = np.stack(np.meshgrid(u, v), axis=-1).reshape(-1, 2)
    samples = np.concatenate([grid, first.vertices[:, others], second.vertices[:, others]])
    origins = np.zeros((len(samples), 3))
    origins[:, others] = samples
    step = np.eye(3)[axis]
    far = first.bounds[1, axis] + second.bounds[1, axis] + 10.0
    end_of_first = _first_hits(first, origins + far * step, -step)[:, axis]
    start_of_second = _first_hits(second, origins - far * step, step)[:, axis]
    gaps = start_of_second - end_of_first
    return gaps[np.isfinite(gaps)]


# ------------------------------------------------------------------------------ vocabulary
def test_vocabularies_are_large_and_distinct():
    assert len(SHAPES) >= 8 and len(set(SHAPES)) == len(SHAPES)
    assert len(COLOURS) >= 8 and len(set(COLOURS.values())) == len(COLOURS)
    assert all(len(rgb) == 3 and all(0 <= c <= 255 for c in rgb) for rgb in COLOURS.values())
    assert {"on top of", "next to"} <= set(RELATIONS)
    assert set(SHAPE_ADJECTIVES) == set(SHAPES)
    assert all(set(a) <= set(ADJECTIVES) for a in SHAPE_ADJECTIVES.values())
    with pytest.raises(TypeError):
        COLOURS["red"] = (0, 0, 0)  # read-only: a restriction never edits the vocabulary


def test_everything_reachable(objects):
    parts = [p for o in objects for p in o.attributes["parts"]]
    assert {p["shape"] for p in parts} == set(SHAPES)
    assert {p["colour"] for p in parts} == set(COLOURS)
    assert {o.attributes["relation"] for o in objects} == {None, *RELATIONS}
    assert {(p["shape"], p["adjective"]) for p in parts if p["adjective"]} == {
        (s, a) for s, adjectives in SHAPE_ADJECTIVES.items() for a in adjectives}
    # Grammar 2: every side, fronts on singles and composites, every kind of open attribute.
    assert {o.attributes["side"] for o in objects if o.attributes["relation"] == "next to"} == set(SIDES)
    assert {o.attributes["relation"] for o in objects if o.attributes["parts"][0]["front"]} == {None, *RELATIONS}
    kinds = {name.split(":")[0] for o in objects for name in o.attributes["open"]}
    assert kinds == {"colour", "adjective", "front", "side"}
    share_open = np.mean([bool(o.attributes["open"]) for o in objects])
    assert 0.2 < share_open < 0.8


def test_object_ids_stable_and_sortable(objects):
    assert object_id_for(123) == "shape-000123"
    ids = [o.object_id for o in objects]
    assert ids == sorted(ids) == [f"shape-{i:06d}" for i in range(NUM)]
    assert [o.index for o in objects] == list(range(NUM))


# ------------------------------------------------------------------------------ determinism
def _same(a, b) -> None:
    assert a.object_id == b.object_id and a.caption == b.caption
    assert a.attributes == b.attributes
    np.testing.assert_array_equal(a.mesh.vertices, b.mesh.vertices)
    np.testing.assert_array_equal(a.mesh.faces, b.mesh.faces)
    np.testing.assert_array_equal(a.mesh.visual.face_colors, b.mesh.visual.face_colors)


def test_same_seed_same_object():
    for index in (0, 5, 17):
        _same(make_object(index, seed=3), make_object(index, seed=3))


def test_object_depends_only_on_seed_and_index():
    few, many = list(generate_objects(5, seed=3)), list(generate_objects(12, seed=3))
    resumed = list(generate_objects(12, seed=3, start=4))
    assert [o.index for o in resumed] == list(range(4, 12))
    for a, b in zip(few, many):
        _same(a, b)
    _same(many[4], resumed[0])
    _same(many[4], make_object(4, seed=3))
    other = [make_object(i, seed=4).caption for i in range(12)]
    assert other != [o.caption for o in many]


def test_attributes_are_json_and_rebuild_the_mesh(objects):
    for obj in objects[:20]:
        attributes = json.loads(json.dumps(obj.attributes))
        assert attributes == obj.attributes
        assert attributes["seed"] == obj.seed == 0 and attributes["index"] == obj.index
        mesh, again = build_mesh(attributes)
        np.testing.assert_allclose(mesh.vertices, obj.mesh.vertices, atol=1e-12)
        assert caption_for(again) == obj.caption


# ------------------------------------------------------------------------------ geometry
def test_normalised_to_unit_sphere(objects):
    for obj in objects[:80]:
        bounds = obj.mesh.bounds
        np.testing.assert_allclose(bounds.mean(axis=0), 0.0, atol=1e-6)
        assert abs(np.linalg.norm(obj.mesh.vertices, axis=1).max() - 1.0) < 1e-6
        info = obj.attributes["normalization"]
        assert len(info["offset"]) == 3 and info["scale"] > 0


def test_meshes_closed_outward_and_per_part(objects):
    for obj in objects[:60]:
        mesh = obj.mesh
        assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0
        for part in obj.attributes["parts"]:
            piece = _part(mesh, part)
            assert piece.is_watertight and piece.volume > 0, (obj.caption, part["shape"])
            np.testing.assert_allclose(piece.extents, part["extent"], atol=1e-9)
            np.testing.assert_allclose(piece.bounds.mean(axis=0), part["center"], atol=1e-9)


def test_face_colours_match_attributes(objects):
    for obj in objects[:60]:
        colours = obj.mesh.visual.face_colors
        assert colours.dtype == np.uint8 and colours.shape == (len(obj.mesh.faces), 4)
        covered = 0
        for part in obj.attributes["parts"]:
            start, stop = part["faces"]
            assert start == covered  # face ranges tile the mesh
            covered = stop
            assert part["rgb"] == list(COLOURS[part["colour"]])
            body = (colours[start:stop] == [*part["rgb"], 255]).all(axis=1)
            if part["front"] is None:
                assert body.all() and part["front_faces"] == 0
            else:
                marker = (colours[start:stop] == [*COLOURS[part["front"]], 255]).all(axis=1)
                assert (body | marker).all() and marker.sum() == part["front_faces"] > 0
                assert part["front"] not in {p["colour"] for p in obj.attributes["parts"]}
        assert covered == len(obj.mesh.faces)
        assert obj.mesh.visual.vertex_colors.shape == (len(obj.mesh.vertices), 4)
        if obj.attributes["relation"]:
            first, second = obj.attributes["parts"]
            assert first["colour"] != second["colour"]


def _caption_halves(obj) -> list[str]:
    relation, side = obj.attributes["relation"], obj.attributes["side"]
    if relation is None:
        return [obj.caption]
    phrase = "next to" if relation == "next to" and "side" in obj.attributes["open"] else (
        SIDE_PHRASES[side] if relation == "next to" else relation)
    halves = obj.caption.split(f" {phrase} ")
    assert len(halves) == 2, obj.caption
    return halves


def test_captions_name_what_was_built_and_nothing_that_is_open(objects):
    for obj in objects:
        parts, open_ = obj.attributes["parts"], set(obj.attributes["open"])
        caption = obj.caption
        assert caption.startswith(("a ", "an "))
        for k, (part, words) in enumerate(zip(parts, _caption_halves(obj))):
            words = words.split()
            assert part["shape"] in words
            assert (part["colour"] in words) == (f"colour:{k}" not in open_), (caption, open_)
            if part["adjective"]:
                assert (part["adjective"] in words) == (f"adjective:{k}" not in open_), caption
            if part["front"]:
                named = f" {part['front']} front" in " ".join(words)
                assert named == (f"front:{k}" not in open_), caption
                assert named or "with a front mark" in " ".join(words)
            else:
                assert "front" not in words and "mark" not in words
        if obj.attributes["relation"] is None:
            assert not any(f" {r} " in caption for r in [*RELATIONS, *SIDE_PHRASES.values()])
    assert make_object(0, shapes=["cube"], colours=["orange"], p_composite=0,
                       p_adjective=0, p_front=0, p_open=0).caption == "an orange cube"
    # Open captions: the same caption, different objects.
    plain = [make_object(i, shapes=["cube"], p_composite=0, p_adjective=0, p_front=0, p_open=1)
             for i in range(12)]
    assert {o.caption for o in plain} == {"a cube"}
    assert len({o.attributes["parts"][0]["colour"] for o in plain}) > 3
    pairs = [make_object(i, shapes=["cube", "sphere"], relations=["next to"], p_composite=1,
                         p_adjective=0, p_front=0, p_open=1) for i in range(40)]
    assert {o.caption for o in pairs} <= {f"a {a} next to a {b}" for a in ("cube", "sphere")
                                          for b in ("cube", "sphere")}
    assert {o.attributes["side"] for o in pairs} == set(SIDES)


def test_adjectives_true_of_geometry(objects):
    seen = 0
    for obj in objects:
        for part in obj.attributes["parts"]:
            assert adjective_holds(part["adjective"], part["extent"]), (obj.caption, part)
            seen += part["adjective"] is not None
    assert seen > 20
    assert adjective_holds("tall", [1, 1, 2]) and not adjective_holds("tall", [1, 1, 1])
    assert adjective_holds("flat", [1, 1, 0.3]) and not adjective_holds("flat", [1, 0.3, 1])
    assert adjective_holds("wide", [2, 1, 1]) and not adjective_holds("wide", [1, 2, 1])


def _composites(relation: str, count: int = 12):
    return [make_object(i, seed=1, p_composite=1.0, relations=[relation]) for i in range(count)]


def test_on_top_of_rests_upper_part_on_lower_part():
    for obj in _composites("on top of"):
        top, bottom = (_part(obj.mesh, p) for p in obj.attributes["parts"])
        assert top.bounds.mean(axis=0)[2] > bottom.bounds.mean(axis=0)[2], obj.caption
        assert top.bounds[1, 2] > bottom.bounds[1, 2] and top.bounds[0, 2] > bottom.bounds[0, 2]
        gaps = _gaps_along(bottom, top, axis=2)
        assert len(gaps) > 0, obj.caption  # one is above the other
        assert gaps.min() > -1e-4, obj.caption  # no interpenetration
        assert gaps.min() < 0.02, obj.caption  # touching: it rests, it does not float


@pytest.mark.parametrize("side, axis, sign", [("left", 0, -1), ("right", 0, 1),
                                              ("behind", 1, 1), ("front", 1, -1)])
def test_next_to_puts_parts_side_by_side_on_one_floor(side, axis, sign):
    for i in range(8):
        spec = sample_spec(i, seed=1, p_composite=1.0, relations=["next to"])
        spec["side"] = side
        mesh, attributes = build_mesh(spec)
        first, second = (_part(mesh, p) for p in attributes["parts"])
        # ``first`` stands at sign * axis of ``second``.
        lower, upper = (second, first) if sign > 0 else (first, second)
        assert lower.bounds[1, axis] <= upper.bounds[1, axis] and lower.bounds[0, axis] < upper.bounds[0, axis]
        assert abs(first.bounds[0, 2] - second.bounds[0, 2]) < 1e-9, side  # one floor
        gaps = _gaps_along(lower, upper, axis=axis)
        assert len(gaps) > 0, side
        assert 0.0 < gaps.min() < 0.1, side  # apart, but close
    # Version-1 specs (no side) keep their layout: the first part on the left.
    spec = sample_spec(0, seed=1, p_composite=1.0, relations=["next to"])
    del spec["side"]
    _, attributes = build_mesh(spec)
    assert attributes["side"] == "left"


@pytest.mark.parametrize("shape", SHAPES)
def test_front_marker_faces_mvdream_azimuth_zero(shape):
    from mvdream_platform.evaluation import (
        EvalSettings,
        classify_colour,
        render_ground_truth,
        shaded_palette,
    )

    spec = {"relation": None, "parts": [{"shape": shape, "colour": "red", "adjective": None,
                                         "aspect": None, "size": 1.0, "front": "yellow"}]}
    mesh, attributes = build_mesh(spec)
    marker = (mesh.visual.face_colors[:, :3] == COLOURS["yellow"]).all(axis=1)
    assert marker.sum() == attributes["parts"][0]["front_faces"] > 0
    assert (mesh.face_normals[marker] @ np.asarray(FRONT_DIRECTION) > 0.7).all()
    assert (mesh.triangles_center[marker][:, 1] < 0).all()  # on the -y side
    # Rendered at MVDream's cameras (azimuth 0, 90, 180, 270): the marker's colour fills a
    # share of the first view and none of the back view.
    obj = shapes.ProceduralObject("x", caption_for(attributes), attributes, mesh, seed=0)
    views = render_ground_truth(obj, EvalSettings(num_views=4), 48)
    samples, names = shaded_palette()
    shares = []
    for view in views:
        pixels = view.reshape(-1, 3)
        nearest = np.asarray(names)[((pixels[:, None] - samples[None]) ** 2).sum(-1).argmin(1)]
        shares.append(float((nearest == "yellow").mean()))
    assert shares[0] > 0.01 and shares[2] == 0.0, shares
    assert caption_for(attributes) == f"a red {shape} with a yellow front"
    attributes["parts"][0]["front"] = "orange"
    assert caption_for(attributes) == f"a red {shape} with an orange front"
    assert classify_colour(views[2].reshape(-1, 3)[views[2].reshape(-1, 3).std(1) > 0.05],
                           (samples, names)) == "red"


@pytest.mark.parametrize("top, bottom", [("sphere", "torus"), ("star", "prism"),
                                         ("cube", "cone"), ("torus", "pyramid")])
def test_contact_is_exact_for_holes_tips_and_ridges(top, bottom):
    # A sphere must sink into a torus' hole (bounding boxes overlap in z); star tips crossing a
    # prism's ridge touch edge to edge, where vertex checks alone would let them sink in.
    spec = {"relation": "on top of", "parts": [
        {"shape": top, "colour": "red", "adjective": None, "aspect": None, "size": 0.7},
        {"shape": bottom, "colour": "blue", "adjective": None, "aspect": None, "size": 1.0}]}
    mesh, attributes = build_mesh(spec)
    upper, lower = (_part(mesh, p) for p in attributes["parts"])
    gaps = _gaps_along(lower, upper, axis=2)
    assert -1e-4 < gaps.min() < 0.02
    if bottom == "torus":
        assert upper.bounds[0, 2] < lower.bounds[1, 2] - 0.05


# ------------------------------------------------------------------------------ options
def test_restricted_vocabularies_and_probabilities():
    objs = list(generate_objects(40, seed=2, shapes=["cube", "torus"], colours=("red", "blue"),
                                 relations=["next to"], p_composite=1.0))
    for obj in objs:
        assert obj.attributes["relation"] == "next to"
        assert {p["shape"] for p in obj.attributes["parts"]} <= {"cube", "torus"}
        assert {p["colour"] for p in obj.attributes["parts"]} == {"red", "blue"}
    singles = [sample_spec(i, 2, p_composite=0.0, relations=[]) for i in range(30)]
    assert all(s["relation"] is None and len(s["parts"]) == 1 for s in singles)
    plain = [sample_spec(i, 2, p_adjective=0.0) for i in range(30)]
    assert all(p["adjective"] is None for s in plain for p in s["parts"])
    tall = [sample_spec(i, 2, p_adjective=1.0, adjectives=["tall"], shapes=["cube"])
            for i in range(10)]
    assert all(p["adjective"] == "tall" for s in tall for p in s["parts"])
    # One colour allowed: a composite's parts may then share it.
    assert make_object(0, colours=["red"], p_composite=1.0).caption.count("red") == 2


def test_closed_fronts_close_marked_objects_only():
    """closed_fronts: every marked object is one part whose caption names every attribute
    (the caption ends with the marker's colour); unmarked objects keep composites and open
    captions; without the option the derivations are those of every earlier world."""
    specs = [sample_spec(i, 5, p_front=0.5, p_composite=0.6, p_open=0.5, closed_fronts=True)
             for i in range(120)]
    marked = [s for s in specs if s["parts"][0]["front"] is not None]
    unmarked = [s for s in specs if s["parts"][0]["front"] is None]
    assert 40 <= len(marked) <= 80
    for spec in marked:
        assert spec["relation"] is None and len(spec["parts"]) == 1 and spec["open"] == []
    assert any(s["relation"] is not None for s in unmarked)
    assert any(s["open"] for s in unmarked)
    for i in range(0, 120, 7):
        obj = make_object(i, 5, p_front=0.5, p_composite=0.6, p_open=0.5, closed_fronts=True)
        part = obj.attributes["parts"][0]
        if part["front"] is not None:
            assert obj.caption.startswith("a ") and part["colour"] in obj.caption
            assert obj.caption.endswith(f"{part['front']} front")
    assert [sample_spec(i, 5) for i in range(20)] == [
        sample_spec(i, 5, closed_fronts=False) for i in range(20)]
    with pytest.raises(ValueError, match="closed_fronts"):
        sample_spec(0, closed_fronts="yes")


@pytest.mark.parametrize("call, match", [
    (lambda: generate_objects(-1), "num_objects"),
    (lambda: generate_objects(3, start=-2), "start"),
    (lambda: generate_objects(3, seed=-1), "seed"),
    (lambda: generate_objects(3, shapes=["cube", "blob"]), "shapes.*blob"),
    (lambda: make_object(0, shapes=["blob"]), "shapes.*blob"),
    (lambda: make_object(0, shapes=[]), "shapes"),
    (lambda: make_object(0, colours=["mauve"]), "colours.*mauve"),
    (lambda: make_object(0, relations=["under"]), "relations.*under"),
    (lambda: make_object(0, adjectives=["huge"]), "adjectives.*huge"),
    (lambda: make_object(0, p_composite=1.5), "p_composite"),
    (lambda: make_object(0, p_adjective=-0.1), "p_adjective"),
    (lambda: make_object(0, p_front=2.0), "p_front"),
    (lambda: make_object(0, p_open=-1), "p_open"),
    (lambda: build_mesh({"relation": None, "parts": [
        {"shape": "cube", "colour": "red", "size": 1.0, "front": "mauve"}]}), "front.*mauve"),
    (lambda: build_mesh({"relation": "next to", "side": "above", "parts": [
        {"shape": "cube", "colour": "red", "size": 1.0},
        {"shape": "cube", "colour": "blue", "size": 1.0}]}), "side.*above"),
    (lambda: make_object(-1), "index"),
    (lambda: make_object(1.5), "index"),
    (lambda: object_id_for(-3), "index"),
    (lambda: build_mesh({"relation": None, "parts": [
        {"shape": "blob", "colour": "red", "size": 1.0}]}), "shape.*blob"),
    (lambda: build_mesh({"relation": None, "parts": [
        {"shape": "torus", "colour": "red", "adjective": "tall", "aspect": 2.0,
         "size": 1.0}]}), "tall"),
    (lambda: build_mesh({"relation": "below", "parts": []}), "relation"),
    (lambda: adjective_holds("huge", [1, 1, 1]), "adjective"),
])
def test_bad_arguments_raise_value_error_naming_them(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_module_documents_the_normalisation_convention():
    doc = shapes._normalize_unit_sphere.__doc__
    assert "bounding box" in doc and "distance 1" in doc


def test_contact_gap_finds_an_apex_under_a_face_interior():
    # Off-centre, the pyramid's apex lies inside one triangle of the cube's bottom, on no edge:
    # only the lower-vertex-under-upper-face case can find this contact.
    pyramid = shapes._pyramid()
    pyramid.apply_translation([0.2, 0.1, 0.0])  # apex at (0.2, 0.1, 1.0)
    cube = shapes._cube()
    cube.apply_translation([0.0, 0.0, 1.75])  # bottom face at z = 1.25
    assert shapes._contact_gap(pyramid, cube, axis=2) == pytest.approx(0.25, abs=1e-12)
    cube.apply_translation([5.0, 0.0, 0.0])  # no longer above it
    assert shapes._contact_gap(pyramid, cube, axis=2) == np.inf
