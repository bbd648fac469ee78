"""The declarative search space of a text-to-3D sweep (``conf/tune/*.yaml``) -> Ray Tune.

A space is plain data::

    prompts: ["a red cube", "a blue sphere"]     # a grid: every prompt gets its own trials
    negative_prompts:                            # named sets a trial picks by name
      none: ""
      reference: "ugly, bad anatomy, blurry, ..."
    params:                                      # sampled (or gridded) per trial
      seed: {type: choice, values: [0, 1, 2, 3]}
      guidance_scale: {type: loguniform, low: 1.0, high: 10.0}
      negative_prompt: {type: choice, values: [none, reference]}
      sds.guidance.recon_std_rescale: {type: uniform, low: 0.0, high: 1.0}
      sds.guidance.anneal_steps: {type: choice, values: [200, 400]}
      sds.guidance.max_step_percent_end: 0.5     # a bare scalar is a constant

Parameter keys are the text-to-3D job's own override paths (``jobs/text_to_3d.py``):
``seed``, ``guidance`` (mvdream | dreamfusion), ``guidance_scale``, ``negative_prompt`` (a
name from ``negative_prompts``) and any leaf ``sds.<section>.<field>`` of
:class:`~mvdream_platform.sds.config.SDSConfig`. So the best trial's values are overrides the
job accepts as they are.

Distributions (Ray Tune's, same semantics): ``uniform`` / ``loguniform`` (low, high),
``quniform`` (low, high, q), ``randint`` (low, high; high exclusive), ``choice`` (values),
``grid`` (values: every value, crossed with the other grids). Values are checked here for
shape (types, ranges, known keys, the annealing bounds' order); whether a value is *allowed*
is the run's own validation: a bad value fails its trial (recorded as an error), not the sweep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from ..sds.config import GUIDANCE_KINDS, SDSConfig
from ..sds.guidance import GuidanceConfig

__all__ = ["DISTRIBUTIONS", "TOP_LEVEL_KEYS", "Param", "SearchSpace", "SpaceError", "apply_overrides"]

# type -> the fields it needs (besides ``type``)
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "uniform": ("low", "high"),
    "quniform": ("low", "high", "q"),
    "loguniform": ("low", "high"),
    "randint": ("low", "high"),
    "choice": ("values",),
    "grid": ("values",),
}
TOP_LEVEL_KEYS = ("seed", "guidance_kind", "guidance_scale", "negative_prompt")
# sds.* paths that have a dedicated top-level key (sweeping both ways would be ambiguous)
_REDIRECTS = {
    "sds.guidance.guidance_scale": "guidance_scale (the job's top-level override)",
    "sds.guidance.negative_prompt": "negative_prompt (a name from negative_prompts)",
    "sds.steps": "nothing: steps is fixed per sweep (ASHA's max_t); set the job's steps=",
    "sds.guidance_kind": "guidance",
}


class SpaceError(ValueError):
    """A malformed search space; the message names the entry (``tune.params.<key>``)."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Param:
    """One parameter: a constant or a distribution (see the module docstring)."""

    key: str
    type: str  # "constant" or one of DISTRIBUTIONS
    low: float | None = None
    high: float | None = None
    q: float | None = None
    values: tuple[Any, ...] = ()
    value: Any = None

    @classmethod
    def parse(cls, key: str, spec: Any, where: str = "tune.params") -> Param:
        name = f"{where}.{key}"
        if isinstance(spec, (list, tuple)):
            raise SpaceError(f"{name}: a bare list is ambiguous; write {{type: choice, values: [...]}} "
                             f"or {{type: grid, values: [...]}} (a fixed list value belongs in the sweep's "
                             f"base settings: {key}=[...] on the command line)")
        if not isinstance(spec, dict):
            return cls(key, "constant", value=spec)
        if "type" not in spec:
            raise SpaceError(f"{name}: a distribution needs 'type', one of {sorted(DISTRIBUTIONS)} "
                             f"(a constant is a bare value), got {spec!r}")
        kind = spec["type"]
        if kind not in DISTRIBUTIONS:
            raise SpaceError(f"{name}: unknown type {kind!r}; allowed: {sorted(DISTRIBUTIONS)}")
        needed = DISTRIBUTIONS[kind]
        extra = sorted(set(spec) - set(needed) - {"type"})
        missing = [k for k in needed if k not in spec]
        if missing or extra:
            raise SpaceError(f"{name}: type {kind} takes exactly {list(needed)}; "
                             f"missing {missing}, unknown {extra}")
        if kind in ("choice", "grid"):
            values = spec["values"]
            if not isinstance(values, (list, tuple)) or not values:
                raise SpaceError(f"{name}: values must be a non-empty list, got {values!r}")
            if any(isinstance(v, (dict, list, tuple)) for v in values):
                raise SpaceError(f"{name}: values must be scalars, got {values!r}")
            return cls(key, kind, values=tuple(values))
        low, high = spec["low"], spec["high"]
        if not (_is_number(low) and _is_number(high) and low < high):
            raise SpaceError(f"{name}: low and high must be numbers with low < high, got "
                             f"low={low!r}, high={high!r}")
        if kind == "loguniform" and low <= 0:
            raise SpaceError(f"{name}: loguniform needs low > 0, got {low!r}")
        if kind == "randint" and not (_is_int(low) and _is_int(high)):
            raise SpaceError(f"{name}: randint needs integer low and high (high exclusive), got "
                             f"{low!r}, {high!r}")
        q = spec.get("q")
        if kind == "quniform" and not (_is_number(q) and q > 0):
            raise SpaceError(f"{name}: q must be a number > 0, got {q!r}")
        return cls(key, kind, low=low, high=high, q=q)

    # ------------------------------------------------------------------ views
    def candidates(self) -> list[Any] | None:
        """Every value this parameter can take, when finite (constant, choice, grid)."""
        if self.type == "constant":
            return [self.value]
        if self.type in ("choice", "grid"):
            return list(self.values)
        return None

    def bounds(self) -> tuple[float, float] | None:
        """(smallest, largest) value it can take, for numeric parameters; else None."""
        values = self.candidates()
        if values is None:
            high = self.high - 1 if self.type == "randint" else self.high
            return float(self.low), float(high)
        if all(_is_number(v) for v in values):
            return float(min(values)), float(max(values))
        return None

    def to_tune(self, grid_as_choice: bool = False) -> Any:
        """The Ray Tune domain (or the constant itself)."""
        from ray import tune

        if self.type == "constant":
            return self.value
        if self.type == "grid":
            return tune.choice(list(self.values)) if grid_as_choice else tune.grid_search(list(self.values))
        if self.type == "choice":
            return tune.choice(list(self.values))
        if self.type == "uniform":
            return tune.uniform(self.low, self.high)
        if self.type == "quniform":
            return tune.quniform(self.low, self.high, self.q)
        if self.type == "loguniform":
            return tune.loguniform(self.low, self.high)
        return tune.randint(int(self.low), int(self.high))

    def describe(self) -> dict[str, Any] | Any:
        """Back to the YAML form (for records and fingerprints)."""
        if self.type == "constant":
            return self.value
        out: dict[str, Any] = {"type": self.type}
        for name in DISTRIBUTIONS[self.type]:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out


def _sds_leaf(key: str, where: str) -> None:
    """Raise unless ``key`` (``sds.a.b``) names a leaf field of SDSConfig."""
    if key in _REDIRECTS:
        raise SpaceError(f"{where}.{key}: not sweepable here; use {_REDIRECTS[key]}")
    parts = key.split(".")[1:]
    kind: Any = SDSConfig
    path = "sds"
    for i, part in enumerate(parts):
        known = {f.name: f for f in fields(kind)}
        if part not in known:
            raise SpaceError(f"{where}.{key}: unknown key {part!r} in {path}; allowed: {sorted(known)}")
        spec = known[part]
        sub = spec.default_factory() if callable(spec.default_factory) else None  # type: ignore[misc]
        path = f"{path}.{part}"
        if sub is not None and is_dataclass(sub):
            if i == len(parts) - 1:
                raise SpaceError(f"{where}.{key}: {path} is a section; name one of its fields: "
                                 f"{sorted(f.name for f in fields(sub))}")
            kind = type(sub)
        elif i < len(parts) - 1:
            raise SpaceError(f"{where}.{key}: {path} is a value, not a section")
    if not parts:
        raise SpaceError(f"{where}.{key}: name a field, e.g. sds.guidance.recon_std_rescale")


@dataclass
class SearchSpace:
    """Prompts (a grid), named negative-prompt sets and the sampled parameters."""

    prompts: list[str] = field(default_factory=list)
    params: dict[str, Param] = field(default_factory=dict)
    negative_prompts: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, where: str = "tune") -> SearchSpace:
        """Parse and validate the YAML form; raises :class:`SpaceError` naming the bad entry."""
        values = dict(values or {})
        unknown = sorted(set(values) - {"prompts", "params", "negative_prompts"})
        if unknown:
            raise SpaceError(f"{where}: unknown keys {unknown}; allowed: ['negative_prompts', 'params', 'prompts']")
        prompts = values.get("prompts") or []
        if not isinstance(prompts, (list, tuple)):
            raise SpaceError(f"{where}.prompts must be a list of prompts, got {prompts!r}")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise SpaceError(f"{where}.prompts[{i}] must be a non-empty string, got {prompt!r}")
        if len(set(prompts)) != len(prompts):
            raise SpaceError(f"{where}.prompts has duplicates: {list(prompts)}")
        negatives = values.get("negative_prompts") or {}
        if not isinstance(negatives, dict):
            raise SpaceError(f"{where}.negative_prompts must map names to texts, got {negatives!r}")
        for name, text in negatives.items():
            if not isinstance(text, str):
                raise SpaceError(f"{where}.negative_prompts.{name} must be a string (\"\" for none), "
                                 f"got {text!r}")
        raw = values.get("params") or {}
        if not isinstance(raw, dict):
            raise SpaceError(f"{where}.params must map keys to distributions, got {raw!r}")
        params = {}
        for key, spec in raw.items():
            key = str(key)
            where_p = f"{where}.params"
            if key == "prompt":
                raise SpaceError(f"{where_p}.prompt: list prompts under {where}.prompts (a grid)")
            if key.startswith("sds."):
                _sds_leaf(key, where_p)
            elif key not in TOP_LEVEL_KEYS:
                raise SpaceError(f"{where_p}.{key}: unknown key; allowed: {list(TOP_LEVEL_KEYS)} "
                                 "and sds.<section>.<field> (e.g. sds.guidance.recon_std_rescale)")
            param = Param.parse(key, spec, where_p)
            _check_values(param, negatives, where_p)
            params[key] = param
        return cls(prompts=list(prompts), params=params, negative_prompts=dict(negatives))

    # ------------------------------------------------------------------ checks
    def check_annealing(self, base_guidance: dict[str, Any] | None = None, where: str = "tune.params") -> None:
        """Every trial must have min_step_percent_X <= max_step_percent_X (X = start, end).

        Swept bounds are compared by their ranges; unswept ones take ``base_guidance`` (the
        sweep's ``sds.guidance``) or GuidanceConfig's defaults.
        """
        base = {**{f.name: f.default for f in fields(GuidanceConfig)}, **(base_guidance or {})}
        for when in ("start", "end"):
            low_key, high_key = (f"sds.guidance.{b}_step_percent_{when}" for b in ("min", "max"))
            low = self._range(low_key, base[f"min_step_percent_{when}"])
            high = self._range(high_key, base[f"max_step_percent_{when}"])
            if low is None or high is None:
                continue
            if low[1] > high[0]:
                raise SpaceError(
                    f"{where}: {low_key} can reach {low[1]} but {high_key} can be as low as "
                    f"{high[0]}; every trial needs min <= max (narrow the ranges)")

    def _range(self, key: str, default: Any) -> tuple[float, float] | None:
        if key in self.params:
            return self.params[key].bounds()
        return (float(default), float(default)) if _is_number(default) else None

    # ------------------------------------------------------------------ to Tune
    def param_space(self, default_prompt: str | None = None, grid_as_choice: bool = False) -> dict[str, Any]:
        """Ray Tune's ``param_space``: ``prompt`` is a grid over the prompts (a choice for
        searchers that cannot grid), every other parameter its own domain; flat dotted keys."""
        from ray import tune

        prompts = self.prompts or ([default_prompt] if default_prompt else [])
        if not prompts:
            raise SpaceError("tune.prompts is empty and there is no default prompt")
        space: dict[str, Any] = {"prompt": (tune.choice(prompts) if grid_as_choice else tune.grid_search(prompts))
                                 if len(prompts) > 1 else prompts[0]}
        for key, param in self.params.items():
            space[key] = param.to_tune(grid_as_choice=grid_as_choice)
        return space

    def has_grid(self) -> bool:
        return len(self.prompts) > 1 or any(p.type == "grid" for p in self.params.values())

    def grid_points(self) -> int:
        """How many points the grids span (prompts x every grid parameter's values)."""
        points = max(len(self.prompts), 1)
        for param in self.params.values():
            if param.type == "grid":
                points *= len(param.values)
        return points

    def overrides(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """A trial's sampled config -> the text-to-3D overrides it stands for (dotted keys).

        ``negative_prompt`` (a set's name) becomes ``sds.guidance.negative_prompt`` (its text).
        """
        out = {}
        for key, value in sampled.items():
            if key == "negative_prompt":
                if value not in self.negative_prompts:
                    raise SpaceError(f"negative_prompt {value!r} is not a set in tune.negative_prompts "
                                     f"({sorted(self.negative_prompts)})")
                out["sds.guidance.negative_prompt"] = self.negative_prompts[value]
            else:
                out[key] = value.item() if hasattr(value, "item") else value  # numpy scalars
        return out

    def describe(self) -> dict[str, Any]:
        return {"prompts": list(self.prompts), "negative_prompts": dict(self.negative_prompts),
                "params": {k: p.describe() for k, p in self.params.items()}}


def _check_values(param: Param, negatives: dict[str, str], where: str) -> None:
    name = f"{where}.{param.key}"
    values = param.candidates()
    if param.key == "negative_prompt":
        if values is None:
            raise SpaceError(f"{name}: pick set names with choice/grid (or one name), got type {param.type}")
        missing = [v for v in values if v not in negatives]
        if missing:
            raise SpaceError(f"{name}: unknown negative-prompt sets {missing}; defined in "
                             f"tune.negative_prompts: {sorted(negatives)}")
    elif param.key == "seed":
        if values is None and param.type != "randint":
            raise SpaceError(f"{name}: seeds are integers: use choice, grid, randint or a constant")
        if values is not None and not all(_is_int(v) and v >= 0 for v in values):
            raise SpaceError(f"{name}: seeds must be integers >= 0, got {values}")
    elif param.key == "guidance_kind":
        if values is None or any(v not in GUIDANCE_KINDS for v in values):
            raise SpaceError(f"{name}: guidance_kind values must be among {GUIDANCE_KINDS}")


def apply_overrides(run: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of the job-shaped ``run`` dict with dotted ``overrides`` set into it."""
    import copy

    out = copy.deepcopy(run)
    for key, value in overrides.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpaceError(f"override {key}: {part} is not a section")
        node[leaf] = value
    return out
