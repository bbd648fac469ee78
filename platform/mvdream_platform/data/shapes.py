"""Procedural 3D objects with captions: the embedded default's training set.

A tiny grammar, sampled per object (version 2)::

    object   := part | part RELATION part
    part     := [ADJECTIVE] [COLOUR] SHAPE [FRONT]
    FRONT    := "with a" COLOUR "front" | "with a front mark"
    RELATION := "on top of" | "next to" | "to the left of" | "to the right of" | "behind"
              | "in front of"

gives captions such as "a red cube", "a tall blue cylinder", "a red cube with a yellow front",
"a red cube on top of a blue sphere", "a cube next to a sphere" or "a green cone behind a
yellow torus", each with a coloured ``trimesh.Trimesh`` and JSON-able ``attributes`` that say
exactly what was built, so an evaluation can check what a model produced.

**The world is not consistent for free** (what MVDream exists for):

* *Open captions.* Each object is one definite thing, but its caption may leave attributes
  out (``attributes["open"]``, e.g. ``["colour:0", "side"]``): "a cube" is a caption whose
  colour varies between objects, "a cube next to a sphere" one whose layout does. A model that
  draws each view on its own is free to disagree between views.
* *Fronts.* A part may carry a front marker (``part["front"]``, a second colour) on the faces
  that look towards MVDream azimuth 0 (world -y; the official ``get_camera``'s first view);
  "a red cube with a yellow front" or, its marker colour left open, "... with a front mark".
  Composites carry it on their first part. A 2D model has no reason to put it on one side only.
* *Unnamed poses.* "next to" pairs stand on a random side (``attributes["side"]``: where the
  first part stands relative to the second: left, right, behind or front, as seen from
  azimuth 0); the caption names the side ("to the left of", ...) or, in a share, only says
  "next to".

Conventions (the project's world, see :mod:`mvdream_platform.cameras`):

* **z is up**; "A on top of B" puts part A (named first) above part B in +z, resting on it;
  "A next to B" puts A beside B on ``side``: "left" = -x, "right" = +x, "behind" = +y,
  "front" = -y of B (MVDream's azimuth-0 camera stands at -y and looks along +y, so left and
  right are its image's left and right), both standing on one floor, a small gap apart.
* Parts are placed by **exact contact**: the upper part is lowered (or the right part slid
  left) until the two triangle meshes touch, so a sphere settles into a torus' hole and a cube
  balances on a cone's apex; parts never interpenetrate (up to float error).
* **Normalised to the unit sphere**, the same convention as
  ``mvdream_platform.data.render.normalize_mesh``: translate the axis-aligned bounding-box
  centre to the origin, then scale uniformly so the farthest vertex is at distance 1.
* Colours are per-face RGBA uint8 (``mesh.visual.face_colors``; ``vertex_colors`` follow,
  since parts share no vertices); each part keeps its own colour, and
  ``attributes["parts"][k]["faces"]`` = ``[start, stop)`` says which faces are part k.
* Every part is a closed, outward-oriented triangle mesh, so the whole object is watertight
  with a positive volume. The parts are not merged (a renderer does not need it).
* Adjectives are true of the geometry (checked by :func:`adjective_holds` on each part's
  bounding box): "tall" = height >= 1.5 x the larger horizontal side; "flat" = height <= 0.5 x
  the smaller horizontal side; "wide" = x side >= 1.5 x both the y side and the height.

Determinism: object ``index`` of the set with seed ``seed`` is drawn from its own random
stream ``SeedSequence([seed, index])``, so it does not depend on which other objects are made
or in which order (a resumed or sharded job rebuilds exactly the same object).

Example::

    >>> obj = make_object(7, seed=0)
    >>> obj.object_id, obj.caption                      # doctest: +SKIP
    ('shape-000007', 'a purple cone on top of a white cube')
    >>> mesh, attributes = build_mesh(obj.attributes)   # the attributes rebuild the mesh
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import trimesh

__all__ = [
    "ADJECTIVES",
    "COLOURS",
    "GRAMMAR_VERSION",
    "HELD_OUT_START",
    "RELATIONS",
    "SHAPES",
    "SIDES",
    "SIDE_PHRASES",
    "FRONT_DIRECTION",
    "SHAPE_ADJECTIVES",
    "ProceduralObject",
    "adjective_holds",
    "build_mesh",
    "caption_for",
    "generate_objects",
    "make_object",
    "object_id_for",
    "sample_spec",
]

GRAMMAR_VERSION = 2

# Distinct silhouettes from the elevations MVDream renders at (0..30 degrees): round, boxy,
# pointed, holed, elongated, ridged, sloped and star-shaped outlines.
SHAPES: tuple[str, ...] = (
    "cube", "sphere", "cylinder", "cone", "torus",
    "capsule", "pyramid", "prism", "wedge", "star",
)

# Fixed sRGB values with well separated hues. No grey: MVDream composites renders on a random
# grey background, where a grey object would vanish.
COLOURS: Mapping[str, tuple[int, int, int]] = MappingProxyType({
    "red": (215, 38, 38),
    "orange": (245, 130, 20),
    "yellow": (245, 215, 35),
    "green": (40, 165, 60),
    "cyan": (30, 200, 215),
    "blue": (35, 75, 220),
    "purple": (135, 55, 190),
    "pink": (245, 120, 185),
    "white": (240, 240, 240),
    "black": (30, 30, 30),
})

RELATIONS: tuple[str, ...] = ("on top of", "next to")

ADJECTIVES: tuple[str, ...] = ("tall", "flat", "wide")

# Where the first part of a "next to" pair stands relative to the second, and how a caption
# that names it says so (seen from MVDream azimuth 0).
SIDES: tuple[str, ...] = ("left", "right", "behind", "front")
SIDE_PHRASES: Mapping[str, str] = MappingProxyType({
    "left": "to the left of", "right": "to the right of", "behind": "behind", "front": "in front of",
})
_SIDE_OFFSETS = {"left": (0, -1), "right": (0, 1), "behind": (1, 1), "front": (1, -1)}  # (axis, sign)

# The world direction the front marker faces: towards MVDream's azimuth-0 camera.
FRONT_DIRECTION: tuple[float, float, float] = (0.0, -1.0, 0.0)
# A face belongs to the marker when its normal is within ~41 degrees of FRONT_DIRECTION: a
# whole flat face (cube, pyramid, star, wedge end), a cap on round parts.
_FRONT_MIN_COSINE = 0.75

# Only the adjectives that read naturally and have a faithful geometric form per shape: a
# "tall torus" or a "wide star" would need a distortion nobody would call by that name.
SHAPE_ADJECTIVES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "cube": ("tall", "flat", "wide"),
    "sphere": ("tall", "flat", "wide"),
    "cylinder": ("tall", "flat"),
    "cone": ("tall", "flat"),
    "torus": (),
    "capsule": ("tall", "wide"),
    "pyramid": ("tall", "flat"),
    "prism": ("tall", "wide"),
    "wedge": ("flat", "wide"),
    "star": (),
})

# The rules of adjective_holds, and the aspect ranges sampled well inside them, so a caption's
# adjective stays true with a margin (the sampled ratio is stored as the part's "aspect").
_TALL_MIN, _FLAT_MAX, _WIDE_MIN = 1.5, 0.5, 1.5
_ASPECT_RANGES = {"tall": (1.8, 2.5), "flat": (0.25, 0.4), "wide": (1.8, 2.5)}
# A plain capsule is already 1.8 times as tall as wide; a "tall" one must look taller.
_ASPECT_OVERRIDES = {("capsule", "tall"): (2.6, 3.4)}

# Relative part sizes before normalisation: a smaller part rests on a larger one.
_SIZE_RANGES = {"single": (1.0, 1.0), "top": (0.5, 0.8), "bottom": (0.8, 1.0),
                "side": (0.6, 1.0)}
# Clearance between parts that stand "next to" each other (pre-normalisation units, parts are
# ~1 across) so their silhouettes stay apart in renders.
_NEXT_TO_GAP = 0.05

# Object indices from here on are never used by the training (0..) or 2D (1_000_000..) sets:
# held-out captions for evaluation and training-time samples.
HELD_OUT_START = 2_000_000

DEFAULT_P_COMPOSITE = 0.5
DEFAULT_P_ADJECTIVE = 0.3
DEFAULT_P_FRONT = 0.3   # a (first) part carries a front marker
DEFAULT_P_OPEN = 0.3    # each attribute (colour, adjective, marker colour, side) left out of the caption


@dataclass
class ProceduralObject:
    """One procedural object.

    Attributes:
        object_id: ``"shape-000123"`` (zero-padded to 6 digits: sortable up to 999999).
        caption: e.g. ``"a tall red cube on top of a blue sphere"``.
        attributes: JSON-able facts: ``parts`` (list of dicts: shape, colour, rgb, adjective,
            aspect, size, front (marker colour or None), front_rgb, front_faces (count),
            center (3,), extent (3,), faces [start, stop)), ``relation`` (``"on top of"``,
            ``"next to"`` or None), ``side`` (next to: one of SIDES), ``open`` (attributes
            the caption leaves out: ``"colour:K"``, ``"adjective:K"``, ``"front:K"``,
            ``"side"``), ``normalization`` (scale, offset), ``grammar_version``, ``seed``,
            ``index``.
        mesh: one watertight ``trimesh.Trimesh`` with per-face RGBA colours, z up, normalised
            to the unit sphere.
        seed: the set's seed.
        index: the object's index in the set.
    """

    object_id: str
    caption: str
    attributes: dict[str, Any]
    mesh: trimesh.Trimesh
    seed: int
    index: int = 0


# ------------------------------------------------------------------------------ public API
def object_id_for(index: int) -> str:
    """Stable, sortable id of object ``index``: ``object_id_for(123) == "shape-000123"``."""
    return f"shape-{_non_negative('index', index):06d}"


def make_object(
    index: int,
    seed: int = 0,
    *,
    p_composite: float = DEFAULT_P_COMPOSITE,
    p_adjective: float = DEFAULT_P_ADJECTIVE,
    p_front: float = DEFAULT_P_FRONT,
    p_open: float = DEFAULT_P_OPEN,
    closed_fronts: bool = False,
    shapes: Iterable[str] | None = None,
    colours: Iterable[str] | None = None,
    relations: Iterable[str] | None = None,
    adjectives: Iterable[str] | None = None,
) -> ProceduralObject:
    """Object ``index`` of the procedural set with seed ``seed`` (depends on nothing else).

    Args:
        index, seed: non-negative integers.
        p_composite: probability of a two-part object joined by a relation.
        p_adjective: probability that a part gets an adjective (when its shape allows one).
        p_front: probability that the (first) part carries a front marker.
        p_open: probability that the caption leaves out each of the object's attributes
            (a part's colour, its adjective, its marker's colour, a "next to" pair's side).
            0 gives captions that name everything.
        closed_fronts: marked objects are single parts whose captions name every attribute
            ("a pink sphere with a blue front"); unmarked objects follow ``p_composite`` and
            ``p_open`` as usual. The marker is then drawn first, so such a world shares no
            derivations with one made without this option. Fine-tunes use it to spend every
            marked draw on a prompt whose front is fully named.
        shapes, colours, relations, adjectives: restrict the vocabularies (None = all of
            SHAPES, COLOURS, RELATIONS, ADJECTIVES), e.g. to hold captions out.

    Raises:
        ValueError: naming the bad argument and its allowed values.
    """
    spec = sample_spec(index, seed, p_composite=p_composite, p_adjective=p_adjective,
                       p_front=p_front, p_open=p_open, closed_fronts=closed_fronts, shapes=shapes,
                       colours=colours, relations=relations, adjectives=adjectives)
    mesh, attributes = build_mesh(spec)
    return ProceduralObject(object_id=object_id_for(index), caption=caption_for(attributes),
                            attributes=attributes, mesh=mesh, seed=int(seed), index=int(index))


def generate_objects(num_objects: int, seed: int = 0, *, start: int = 0,
                     **options: Any) -> Iterator[ProceduralObject]:
    """Objects ``start .. num_objects - 1`` of the set, in index order.

    ``options`` are :func:`make_object`'s keywords. Arguments are checked here, before the
    first object is built; a resumed job passes the same ``num_objects`` and a later ``start``.
    """
    num_objects = _non_negative("num_objects", num_objects)
    start = _non_negative("start", start)
    # Validate seed and options now rather than on the first next() of a lazy generator.
    _non_negative("seed", seed)
    sample_spec(0, seed, **options)
    return (make_object(i, seed, **options) for i in range(start, num_objects))


def sample_spec(
    index: int,
    seed: int = 0,
    *,
    p_composite: float = DEFAULT_P_COMPOSITE,
    p_adjective: float = DEFAULT_P_ADJECTIVE,
    p_front: float = DEFAULT_P_FRONT,
    p_open: float = DEFAULT_P_OPEN,
    closed_fronts: bool = False,
    shapes: Iterable[str] | None = None,
    colours: Iterable[str] | None = None,
    relations: Iterable[str] | None = None,
    adjectives: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Draw object ``index``'s grammar derivation without building geometry (cheap).

    Returns a JSON-able spec ``{"parts": [{"shape", "colour", "rgb", "adjective", "aspect",
    "size", "front", "front_rgb"}, ...], "relation": str | None, "side": str | None, "open":
    [...], "seed", "index"}`` that :func:`build_mesh` turns into a mesh; same arguments as
    :func:`make_object`.
    """
    index, seed = _non_negative("index", index), _non_negative("seed", seed)
    p_composite = _probability("p_composite", p_composite)
    p_adjective = _probability("p_adjective", p_adjective)
    p_front = _probability("p_front", p_front)
    p_open = _probability("p_open", p_open)
    shapes = _vocabulary("shapes", shapes, SHAPES)
    colours = _vocabulary("colours", colours, tuple(COLOURS))
    relations = _vocabulary("relations", relations, RELATIONS, allow_empty=p_composite == 0)
    adjectives = _vocabulary("adjectives", adjectives, ADJECTIVES, allow_empty=True)

    if not isinstance(closed_fronts, bool):
        raise ValueError(f"closed_fronts must be true or false, got {closed_fronts!r}")

    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    # closed_fronts decides the marker before anything else (the default order, below, keeps
    # the derivations of every world prepared before the option existed).
    marked = closed_fronts and rng.random() < p_front
    relation = None
    if not marked and relations and rng.random() < p_composite:
        relation = relations[rng.integers(len(relations))]
    if relation is None:
        parts = [_sample_part(rng, shapes, colours, adjectives, p_adjective, "single")]
    else:
        roles = ("top", "bottom") if relation == "on top of" else ("side", "side")
        first = _sample_part(rng, shapes, colours, adjectives, p_adjective, roles[0])
        # Parts are told apart by colour in renders and evaluations, so they never share one.
        others = [c for c in colours if c != first["colour"]] or colours
        parts = [first, _sample_part(rng, shapes, others, adjectives, p_adjective, roles[1])]
    # The marker's colour differs from every part's, so it can be told apart in renders.
    front = None
    if marked or (not closed_fronts and rng.random() < p_front):
        free = [c for c in COLOURS if c not in {p["colour"] for p in parts}]
        front = free[rng.integers(len(free))]
    parts[0].update(front=front, front_rgb=list(COLOURS[front]) if front else None)
    for part in parts[1:]:
        part.update(front=None, front_rgb=None)
    side = SIDES[rng.integers(len(SIDES))] if relation == "next to" else None
    open_ = []
    for k, part in enumerate([] if marked else parts):
        for name in ("colour", "adjective", "front"):
            if (name == "colour" or part[name] is not None) and rng.random() < p_open:
                open_.append(f"{name}:{k}")
    if side is not None and rng.random() < p_open:
        open_.append("side")
    return {"parts": parts, "relation": relation, "side": side, "open": open_, "seed": seed,
            "index": index}


def build_mesh(spec: Mapping[str, Any]) -> tuple[trimesh.Trimesh, dict[str, Any]]:
    """Build the coloured, placed, normalised mesh of a spec (or of an object's attributes).

    Returns ``(mesh, attributes)``: the spec plus, per part, its ``center`` (3,), ``extent``
    (3,) and ``faces`` ``[start, stop)`` in the normalised mesh, and the ``normalization``
    applied (``scale``, ``offset`` (3,): normalised = scale * (raw + offset)).
    """
    relation = spec.get("relation")
    parts_spec = [dict(p) for p in spec["parts"]]
    if relation is not None and relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; allowed: {', '.join(RELATIONS)}")
    if len(parts_spec) != (1 if relation is None else 2):
        raise ValueError(f"a spec with relation {relation!r} needs "
                         f"{1 if relation is None else 2} part(s), got {len(parts_spec)}")
    side = spec.get("side") or ("left" if relation == "next to" else None)  # v1: always left
    if relation == "next to" and side not in SIDES:
        raise ValueError(f"unknown side {side!r}; allowed: {', '.join(SIDES)}")
    parts = [_build_part(p) for p in parts_spec]
    face_colours = [_part_face_colours(mesh, p) for mesh, p in zip(parts, parts_spec)]
    if relation == "on top of":
        _place_on_top(upper=parts[0], lower=parts[1])
    elif relation == "next to":
        _place_beside(parts[0], parts[1], side)

    mesh, face_ranges = _concatenate(parts, face_colours)
    mesh, normalization = _normalize_unit_sphere(mesh)
    for part, (start, stop), colours_k in zip(parts_spec, face_ranges, face_colours):
        bounds = mesh.vertices[np.unique(mesh.faces[start:stop])]
        lo, hi = bounds.min(axis=0), bounds.max(axis=0)
        part.update(center=((lo + hi) / 2).tolist(), extent=(hi - lo).tolist(),
                    faces=[start, stop], front_faces=_count_front_faces(part, colours_k))
    attributes = {key: value for key, value in spec.items() if key not in ("parts",)}
    attributes.update(parts=parts_spec, relation=relation, side=side,
                      open=list(spec.get("open") or []), normalization=normalization,
                      grammar_version=GRAMMAR_VERSION)
    return mesh, attributes


def caption_for(spec: Mapping[str, Any]) -> str:
    """The caption of a spec: "a tall red cube", "a cube with a yellow front", "an orange
    cone to the left of a blue torus", "a cone next to a torus" (``spec["open"]`` says what it
    leaves out)."""
    open_ = set(spec.get("open") or ())
    phrases = [_part_phrase(p, k, open_) for k, p in enumerate(spec["parts"])]
    relation = spec.get("relation")
    if relation is None:
        return phrases[0]
    side = spec.get("side")
    if relation == "next to" and side is not None and "side" not in open_:
        relation = SIDE_PHRASES[side]
    return f"{phrases[0]} {relation} {phrases[1]}"


def caption_words() -> frozenset[str]:
    """Every word a caption of this grammar can contain."""
    words = set(SHAPES) | set(COLOURS) | set(ADJECTIVES) | {"a", "an", "with", "front", "mark"}
    for phrase in (*RELATIONS, *SIDE_PHRASES.values()):
        words |= set(phrase.split())
    return frozenset(words)


def unknown_words(prompt: str) -> list[str]:
    """The words of ``prompt`` that no caption of this grammar uses (case and punctuation
    ignored), in order of appearance, each once: what a model trained only on these captions
    has never read (``"a corgi"`` -> ``["corgi"]``)."""
    known, seen = caption_words(), []
    for word in re.findall(r"[a-z0-9]+", prompt.lower()):
        if word not in known and word not in seen:
            seen.append(word)
    return seen


def adjective_holds(adjective: str | None, extent: Iterable[float]) -> bool:
    """Whether ``adjective`` is true of a part whose bounding box has sides ``extent`` (x, y, z).

    ``None`` (no adjective) is always true. Thresholds: tall z >= 1.5 max(x, y); flat
    z <= 0.5 min(x, y); wide x >= 1.5 max(y, z).
    """
    x, y, z = (float(v) for v in extent)
    if adjective is None:
        return True
    if adjective == "tall":
        return z >= _TALL_MIN * max(x, y)
    if adjective == "flat":
        return z <= _FLAT_MAX * min(x, y)
    if adjective == "wide":
        return x >= _WIDE_MIN * max(y, z)
    raise ValueError(f"unknown adjective {adjective!r}; allowed: {', '.join(ADJECTIVES)}")


# ------------------------------------------------------------------------------ sampling
def _sample_part(rng: np.random.Generator, shapes: tuple[str, ...], colours: tuple[str, ...],
                 adjectives: tuple[str, ...], p_adjective: float, role: str) -> dict[str, Any]:
    """One part's spec; ``role`` (single/top/bottom/side) sets its relative size range."""
    shape = shapes[rng.integers(len(shapes))]
    colour = colours[rng.integers(len(colours))]
    allowed = [a for a in SHAPE_ADJECTIVES[shape] if a in adjectives]
    adjective, aspect = None, None
    if allowed and rng.random() < p_adjective:
        adjective = allowed[rng.integers(len(allowed))]
        lo, hi = _ASPECT_OVERRIDES.get((shape, adjective), _ASPECT_RANGES[adjective])
        aspect = round(float(rng.uniform(lo, hi)), 4)
    lo, hi = _SIZE_RANGES[role]
    size = round(float(rng.uniform(lo, hi)), 4)
    return {"shape": shape, "colour": colour, "rgb": list(COLOURS[colour]),
            "adjective": adjective, "aspect": aspect, "size": size}


def _part_phrase(part: Mapping[str, Any], k: int = 0, open_: set[str] = frozenset()) -> str:
    adjective = None if f"adjective:{k}" in open_ else part.get("adjective")
    colour = None if f"colour:{k}" in open_ else part["colour"]
    words = [w for w in (adjective, colour, part["shape"]) if w]
    # Every word of the vocabularies is pronounced as spelled, so the first letter decides.
    article = "an" if words[0][0] in "aeiou" else "a"
    phrase = " ".join([article, *words])
    front = part.get("front")
    if front:
        phrase += " with a front mark" if f"front:{k}" in open_ else (
            f" with {'an' if front[0] in 'aeiou' else 'a'} {front} front")
    return phrase


def _non_negative(name: str, value: Any) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _probability(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


def _vocabulary(name: str, chosen: Iterable[str] | None, allowed: tuple[str, ...],
                allow_empty: bool = False) -> tuple[str, ...]:
    """Validate a restriction of a vocabulary; keeps the vocabulary's order (determinism)."""
    if chosen is None:
        return allowed
    chosen = (chosen,) if isinstance(chosen, str) else tuple(chosen)
    unknown = [c for c in chosen if c not in allowed]
    if unknown:
        raise ValueError(f"unknown {name} {unknown}; allowed: {', '.join(allowed)}")
    if not chosen and not allow_empty:
        raise ValueError(f"{name} must name at least one of: {', '.join(allowed)}")
    return tuple(a for a in allowed if a in chosen)


# ------------------------------------------------------------------------------ primitives
def _build_part(part: Mapping[str, Any]) -> trimesh.Trimesh:
    """A part's closed mesh, bounding box centred at the origin, aspect and size applied."""
    shape, adjective = part["shape"], part.get("adjective")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")
    if part["colour"] not in COLOURS:
        raise ValueError(f"unknown colour {part['colour']!r}; allowed: {', '.join(COLOURS)}")
    if adjective is not None and adjective not in SHAPE_ADJECTIVES[shape]:
        raise ValueError(f"adjective {adjective!r} does not apply to a {shape}; allowed: "
                         f"{', '.join(SHAPE_ADJECTIVES[shape]) or 'none'}")
    if shape == "capsule":
        mesh = _capsule(adjective, part.get("aspect"))
    else:
        mesh = _PRIMITIVES[shape]()
        if adjective is not None:
            mesh.apply_scale(_aspect_scale(mesh.extents, adjective, float(part["aspect"])))
    mesh.apply_translation(-mesh.bounds.mean(axis=0))
    mesh.apply_scale(float(part["size"]))
    return mesh


def _aspect_scale(extent: np.ndarray, adjective: str, aspect: float) -> np.ndarray:
    """(3,) per-axis scale that gives a box of sides ``extent`` the ratio ``aspect``.

    The ratio is the one :func:`adjective_holds` tests (tall: z / max(x, y), flat:
    z / min(x, y), wide: x / max(y, z)), so the caption is true by construction.
    """
    x, y, z = extent
    scale = np.ones(3)
    if adjective == "tall":
        scale[2] = aspect * max(x, y) / z
    elif adjective == "flat":
        scale[2] = aspect * min(x, y) / z
    else:  # wide: stretch along x, the image-horizontal axis of the azimuth-0 view
        scale[0] = aspect * max(y, z) / x
    return scale


def _capsule(adjective: str | None, aspect: float | None) -> trimesh.Trimesh:
    """Capsule of diameter 0.55, length/diameter ``aspect`` (plain: 1.82), along z or x.

    Built at its length rather than scaled, so the ends stay hemispheres; "wide" lies down.
    """
    radius = 0.275
    ratio = 1.0 / (2 * radius) if aspect is None else float(aspect)
    mesh = trimesh.creation.capsule(height=2 * radius * (ratio - 1), radius=radius,
                                    count=[16, 32])
    if adjective == "wide":
        mesh.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [0, 1, 0]))
    return mesh


def _cube() -> trimesh.Trimesh:
    return trimesh.creation.box(extents=(1.0, 1.0, 1.0))


def _sphere() -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=3, radius=0.5)


def _cylinder() -> trimesh.Trimesh:
    return trimesh.creation.cylinder(radius=0.5, height=1.0, sections=48)


def _cone() -> trimesh.Trimesh:
    return trimesh.creation.cone(radius=0.5, height=1.0, sections=48)


def _torus() -> trimesh.Trimesh:
    # Lying flat (axis z), outer diameter 1: recognisable as a ring from low elevations.
    return trimesh.creation.torus(major_radius=0.35, minor_radius=0.15, major_sections=48,
                                  minor_sections=16)


def _pyramid() -> trimesh.Trimesh:
    """Square base 1 x 1 at z = 0, apex at height 1."""
    vertices = np.array([[-0.5, -0.5, 0], [0.5, -0.5, 0], [0.5, 0.5, 0], [-0.5, 0.5, 0],
                         [0, 0, 1.0]])
    faces = np.array([[0, 2, 1], [0, 3, 2], [0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4]])
    return _closed_mesh(vertices, faces)


def _prism() -> trimesh.Trimesh:
    """Triangular "roof" prism: ridge along x (length 1.3), triangle 1 wide x 0.9 high in yz."""
    triangle = np.array([[-0.5, 0.0], [0.5, 0.0], [0.0, 0.9]])
    return _extrude(triangle, depth=1.3, plane=(1, 2))


def _wedge() -> trimesh.Trimesh:
    """Ramp rising towards +x: right triangle 1 long x 0.8 high in xz, 1 deep along y."""
    triangle = np.array([[-0.5, 0.0], [0.5, 0.0], [0.5, 0.8]])
    return _extrude(triangle, depth=1.0, plane=(0, 2))


def _star() -> trimesh.Trimesh:
    """Upright five-pointed star (one tip up) in xz, 0.3 thick along y.

    It faces the azimuth-0 and -180 cameras; lying flat it would be a slab at low elevations.
    """
    angles = np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 0.5, 0.2)
    outline = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    return _extrude(outline, depth=0.3, plane=(0, 2))


_PRIMITIVES = {"cube": _cube, "sphere": _sphere, "cylinder": _cylinder, "cone": _cone,
               "torus": _torus, "pyramid": _pyramid, "prism": _prism, "wedge": _wedge,
               "star": _star}


def _extrude(outline: np.ndarray, depth: float, plane: tuple[int, int]) -> trimesh.Trimesh:
    """Closed prism over a polygon that is star-shaped about its vertex mean.

    Args:
        outline: (K, 2) polygon in the coordinates ``plane`` (two world axes), either winding.
        depth: extent along the third axis, centred on 0.
    """
    k = len(outline)
    centre = outline.mean(axis=0, keepdims=True)
    ring = np.concatenate([outline, centre])  # (K + 1, 2): a fan from the centre caps it
    normal_axis = 3 - sum(plane)
    vertices = np.zeros((2 * (k + 1), 3))
    for side, offset in enumerate((-depth / 2, depth / 2)):
        rows = slice(side * (k + 1), (side + 1) * (k + 1))
        vertices[rows, plane[0]], vertices[rows, plane[1]] = ring[:, 0], ring[:, 1]
        vertices[rows, normal_axis] = offset
    i = np.arange(k)
    j = (i + 1) % k
    back = k + 1
    faces = np.concatenate([
        np.stack([np.full(k, k), j, i], axis=1),                  # front cap (fan)
        np.stack([np.full(k, back + k), back + i, back + j], axis=1),  # back cap
        np.stack([i, j, back + j], axis=1),                       # sides, two per edge
        np.stack([i, back + j, back + i], axis=1),
    ])
    return _closed_mesh(vertices, faces)


def _closed_mesh(vertices: np.ndarray, faces: np.ndarray) -> trimesh.Trimesh:
    """A mesh whose windings are made consistent and outward, whatever they were."""
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, process=True)
    trimesh.repair.fix_normals(mesh)
    return mesh


# ------------------------------------------------------------------------------ placement
def _place_on_top(upper: trimesh.Trimesh, lower: trimesh.Trimesh) -> None:
    """Move ``upper`` (in place) so it rests on ``lower``: centred above it, touching in z."""
    offset = lower.bounds.mean(axis=0) - upper.bounds.mean(axis=0)
    offset[2] = lower.bounds[1, 2] - upper.bounds[0, 2]  # bounding boxes touch: no overlap
    upper.apply_translation(offset)
    gap = _contact_gap(lower, upper, axis=2)
    if np.isfinite(gap):
        upper.apply_translation([0.0, 0.0, -gap])


def _place_beside(first: trimesh.Trimesh, second: trimesh.Trimesh, side: str) -> None:
    """Move ``second`` (in place) so that ``first`` stands on ``side`` of it (see SIDES), on
    the same floor, a gap apart."""
    axis, sign = _SIDE_OFFSETS[side]  # first is at sign * axis of second
    # Work with the part on the -axis side as the "lower" one of _contact_gap.
    lower, upper = (second, first) if sign > 0 else (first, second)
    offset = first.bounds.mean(axis=0) - second.bounds.mean(axis=0)
    offset[2] = first.bounds[0, 2] - second.bounds[0, 2]
    offset[axis] = (first.bounds[0, axis] - second.bounds[1, axis] if sign > 0
                    else first.bounds[1, axis] - second.bounds[0, axis])
    second.apply_translation(offset)
    gap = _contact_gap(lower, upper, axis=axis)
    slide = gap - _NEXT_TO_GAP if np.isfinite(gap) else -_NEXT_TO_GAP
    step = np.zeros(3)
    step[axis] = slide if sign > 0 else -slide  # second moves towards first
    second.apply_translation(step)


def _contact_gap(lower: trimesh.Trimesh, upper: trimesh.Trimesh, axis: int) -> float:
    """How far ``upper`` can move along ``-axis`` before it touches ``lower``.

    Exact for triangle meshes: the distance along ``axis`` between the facing surfaces of
    two piecewise-linear meshes is smallest either at a vertex of one over a face of the other
    or where an edge of one crosses an edge of the other in projection. Returns ``inf`` when
    their projections do not overlap. The parts must not overlap along ``axis`` yet.
    """
    order = [a for a in range(3) if a != axis] + [axis]  # work with `axis` as the height
    lo_faces = lower.faces[lower.face_normals[:, axis] > 1e-9]  # faces looking at `upper`
    up_faces = upper.faces[upper.face_normals[:, axis] < -1e-9]
    lo_vertices, up_vertices = lower.vertices[:, order], upper.vertices[:, order]
    lo_tris, up_tris = lo_vertices[lo_faces], up_vertices[up_faces]
    lo_points = lo_vertices[np.unique(lo_faces)]
    up_points = up_vertices[np.unique(up_faces)]

    gap = min(
        _nanmin(up_points[:, 2] - _surface_height(lo_tris, up_points[:, :2], top=True)),
        _nanmin(_surface_height(up_tris, lo_points[:, :2], top=False) - lo_points[:, 2]),
    )
    lo_edges, up_edges = _edges(lo_faces, lo_vertices), _edges(up_faces, up_vertices)
    return min(gap, _edge_crossing_gap(up_edges, lo_edges, bound=gap))


def _surface_height(tris: np.ndarray, points: np.ndarray, top: bool,
                    chunk: int = 256) -> np.ndarray:
    """Height of the top (or bottom) of a triangle set above each point.

    Args:
        tris: (M, 3, 3) triangles, height last, none vertical.
        points: (N, 2) positions in the first two coordinates.
    Returns:
        (N,) the largest (``top``) or smallest height of the triangles covering each point,
        NaN where none does.
    """
    a, b, c = tris[:, 0], tris[:, 1], tris[:, 2]
    ab, ac = b[:, :2] - a[:, :2], c[:, :2] - a[:, :2]
    area = _cross(ab, ac)  # (M,) twice the signed projected area
    heights = np.full(len(points), np.nan)
    for s in range(0, len(points), chunk):  # bounds memory at chunk x M
        ap = points[s:s + chunk, None, :] - a[None, :, :2]  # (n, M, 2)
        wb, wc = _cross(ap, ac) / area, _cross(ab, ap) / area
        wa = 1.0 - wb - wc
        inside = (wa >= -1e-9) & (wb >= -1e-9) & (wc >= -1e-9)
        z = wa * a[:, 2] + wb * b[:, 2] + wc * c[:, 2]
        z = np.where(inside, z, -np.inf if top else np.inf)
        best = z.max(axis=1) if top else z.min(axis=1)
        heights[s:s + chunk] = np.where(np.isfinite(best), best, np.nan)
    return heights


def _edge_crossing_gap(up_edges: np.ndarray, lo_edges: np.ndarray, bound: float,
                       chunk: int = 256) -> float:
    """Smallest height difference where an upper edge crosses a lower edge in projection.

    Args:
        up_edges, lo_edges: (E, 2, 3) segments, height last.
        bound: a gap already known; edges that cannot beat it are skipped (most of them).
    """
    up_min, lo_max = up_edges[:, :, 2].min(axis=1), lo_edges[:, :, 2].max(axis=1)
    if np.isfinite(bound):  # a crossing's gap is at least (lowest upper z - highest lower z)
        up_edges = up_edges[up_min - lo_max.max() < bound]
        lo_edges = lo_edges[up_min.min() - lo_max < bound] if len(up_min) else lo_edges[:0]
    best = np.inf
    p, r = up_edges[:, 0], up_edges[:, 1] - up_edges[:, 0]
    q, s_vec = lo_edges[:, 0], lo_edges[:, 1] - lo_edges[:, 0]
    for s in range(0, len(p), chunk):
        pq = q[None, :, :2] - p[s:s + chunk, None, :2]  # (n, E_lo, 2)
        rs = r[s:s + chunk, None, :2]
        denom = _cross(rs, s_vec[None, :, :2])
        with np.errstate(divide="ignore", invalid="ignore"):
            t = _cross(pq, s_vec[None, :, :2]) / denom
            u = _cross(pq, rs) / denom
        # Parallel edges (denom 0) are covered by the vertex-over-face cases.
        i, j = np.nonzero((np.abs(denom) > 1e-12) & (t >= 0) & (t <= 1) & (u >= 0) & (u <= 1))
        if len(i):
            z_up = p[s + i, 2] + t[i, j] * r[s + i, 2]
            z_lo = q[j, 2] + u[i, j] * s_vec[j, 2]
            best = min(best, float((z_up - z_lo).min()))
    return best


def _edges(faces: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """(E, 2, 3) unique edges of ``faces`` (F, 3) as vertex coordinates."""
    pairs = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    return vertices[np.unique(pairs, axis=0)]


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """2-D cross product over the last axis (..., 2) x (..., 2) -> (...)."""
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def _nanmin(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.min()) if len(values) else np.inf


# ------------------------------------------------------------------------------ assembly
def _part_face_colours(mesh: trimesh.Trimesh, part: Mapping[str, Any]) -> np.ndarray:
    """(F, 4) uint8 RGBA per face of a built part (centred at the origin): its colour, the
    marker's on the faces of its front half that look towards FRONT_DIRECTION."""
    colours = np.tile(np.array([*COLOURS[part["colour"]], 255], dtype=np.uint8), (len(mesh.faces), 1))
    front = part.get("front")
    if front is not None:
        if front not in COLOURS:
            raise ValueError(f"unknown front colour {front!r}; allowed: {', '.join(COLOURS)}")
        direction = np.asarray(FRONT_DIRECTION)
        # Facing the front and on the front half (a torus' inner wall at +y faces -y too).
        facing = ((mesh.face_normals @ direction >= _FRONT_MIN_COSINE)
                  & (mesh.triangles_center @ direction > 0))
        colours[facing, :3] = COLOURS[front]
    return colours


def _count_front_faces(part: Mapping[str, Any], colours: np.ndarray) -> int:
    if part.get("front") is None:
        return 0
    return int((colours[:, :3] == COLOURS[part["front"]]).all(axis=1).sum())


def _concatenate(parts: list[trimesh.Trimesh], face_colours: list[np.ndarray]
                 ) -> tuple[trimesh.Trimesh, list[tuple[int, int]]]:
    """One mesh with per-face RGBA colours (F_k, 4) per part; returns it and each part's face
    range."""
    vertices, faces, colours, ranges = [], [], [], []
    n_vertices = n_faces = 0
    for part, part_colours in zip(parts, face_colours):
        vertices.append(part.vertices)
        faces.append(part.faces + n_vertices)
        colours.append(part_colours)
        ranges.append((n_faces, n_faces + len(part.faces)))
        n_vertices += len(part.vertices)
        n_faces += len(part.faces)
    # process=False: merging vertices where two parts touch would fuse them into a non-manifold
    # mesh and shift the face ranges.
    mesh = trimesh.Trimesh(vertices=np.concatenate(vertices), faces=np.concatenate(faces),
                           face_colors=np.concatenate(colours), process=False)
    return mesh, ranges


def _normalize_unit_sphere(mesh: trimesh.Trimesh) -> tuple[trimesh.Trimesh, dict[str, Any]]:
    """Centre the bounding box at the origin and scale the farthest vertex to distance 1.

    The convention of ``mvdream_platform.data.render.normalize_mesh`` (and the same ``scale``
    / ``offset`` keys), kept here privately so this module stands alone. Returns the mesh
    (changed in place) and ``{"scale": float, "offset": (3,) list}`` with
    ``normalised = scale * (raw + offset)``.
    """
    offset = -mesh.bounds.mean(axis=0)
    vertices = mesh.vertices + offset
    scale = 1.0 / float(np.linalg.norm(vertices, axis=1).max())
    mesh.vertices = vertices * scale
    return mesh, {"scale": scale, "offset": offset.tolist()}
