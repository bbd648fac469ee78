"""Plain dataclasses of a text-to-3D run (the Hydra job fills them; notebooks can too).

Defaults are the embedded default's CPU settings; ``conf/sds/reference.yaml`` holds the
paper's (MVDream-threestudio) numbers for SD-sized models on a GPU.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from dataclasses import field as dc_field  # SDSConfig has a member named `field`
from typing import Any

from ..config import build
from .field import FieldConfig
from .guidance import GuidanceConfig
from .render import RenderConfig
from .shading import ShadingConfig

GUIDANCE_KINDS = ("mvdream", "dreamfusion")


@dataclass
class CameraConfig:
    """SDS training cameras (groups of ``views`` views 90 degrees apart) and the eval orbit."""

    groups: int = 1  # camera groups per step
    views: int = 4
    resolution: int = 32
    # [[step, resolution, groups], ...]: from ``step`` on, render at ``resolution`` with
    # ``groups`` groups (the reference: [[5000, 256, 4]] after 64 px with 8 groups).
    schedule: list[list[int]] = dc_field(default_factory=list)
    elevation_range: tuple[float, float] = (0.0, 30.0)
    fovy_range: tuple[float, float] = (15.0, 60.0)
    distance_range: tuple[float, float] = (0.8, 1.0)  # times 1/tan(fovy/2)
    relative_distance: bool = True
    sphere_uniform_prob: float = 0.5
    eval_elevation: float = 15.0
    eval_distance: float = 3.0
    eval_fovy: float = 40.0

    def at_step(self, step: int) -> tuple[int, int]:
        """(resolution, groups) in force at ``step``."""
        resolution, groups = self.resolution, self.groups
        for start, res, grp in sorted(self.schedule):
            if step >= start:
                resolution, groups = int(res), int(grp)
        return resolution, groups

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.groups < 1 or self.views < 1 or self.resolution < 8:
            raise ValueError(f"sds.cameras: groups and views must be >= 1 and resolution >= 8, got "
                             f"{self.groups}, {self.views}, {self.resolution}")
        for entry in self.schedule:
            if len(entry) != 3 or min(entry) < 0 or entry[1] < 8 or entry[2] < 1:
                raise ValueError(f"sds.cameras.schedule entries are [step, resolution>=8, groups>=1], got {entry}")


@dataclass
class OptimConfig:
    """AdamW with per-group learning rates (reference: grid 1e-2, MLPs 1e-3)."""

    lr_encoding: float = 1e-2
    lr_mlp: float = 1e-3
    lr_background: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    weight_decay: float = 0.0
    # Orientation loss weight: linear from ``orient_start`` at step 0 to ``orient_end`` at
    # ``orient_end_step`` (reference: 10 -> 1000 by 5000). Needs normals, i.e. shading.
    orient_start: float = 10.0
    orient_end: float = 1000.0
    orient_end_step: int = 5000
    grad_clip: float | None = None

    def orientation_weight(self, step: int) -> float:
        if self.orient_end_step <= 0:
            return self.orient_end
        frac = min(max(step / self.orient_end_step, 0.0), 1.0)
        return self.orient_start + frac * (self.orient_end - self.orient_start)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("lr_encoding", "lr_mlp", "lr_background"):
            if getattr(self, name) <= 0:
                raise ValueError(f"sds.optim.{name} must be > 0, got {getattr(self, name)}")


@dataclass
class ExportConfig:
    mesh_resolution: int = 128
    mesh_threshold: Any = "auto"  # "auto" or a density value
    mesh_formats: tuple[str, ...] = ("glb", "obj", "ply")
    turntable_frames: int = 36
    turntable_resolution: int = 64
    turntable_fps: float = 12.0
    quality_views: int = 8  # held-out orbit views for the ground-truth scores


@dataclass
class SDSConfig:
    """Everything a text-to-3D run needs besides the prompt, model and output folder."""

    steps: int = 600
    guidance_kind: str = "mvdream"  # mvdream | dreamfusion (2D baseline)
    field: FieldConfig = dc_field(default_factory=FieldConfig)
    render: RenderConfig = dc_field(default_factory=RenderConfig)
    shading: ShadingConfig = dc_field(default_factory=ShadingConfig)
    guidance: GuidanceConfig = dc_field(default_factory=GuidanceConfig)
    cameras: CameraConfig = dc_field(default_factory=CameraConfig)
    optim: OptimConfig = dc_field(default_factory=OptimConfig)
    export: ExportConfig = dc_field(default_factory=ExportConfig)
    checkpoint_every: int = 100
    log_every: int = 10
    render_every: int = 100  # W&B/media renders of the eval orbit
    # Normals (and so the orientation loss) on albedo steps too, as the reference does; off
    # saves a double backward per warm-up step on CPU.
    normals_every_step: bool = False
    # The run length the step-counted schedules are written for: guidance.anneal_steps,
    # shading.ambient_only_steps, optim.orient_end_step and the steps of cameras.schedule.
    # A run of ``steps`` steps stretches them all by steps / schedule_steps (see
    # :meth:`scheduled`), so a short run still anneals its timesteps fully and keeps the same
    # share of albedo warm-up. None: the schedules are absolute step counts.
    schedule_steps: int | None = None

    def scheduled(self) -> SDSConfig:
        """This config with its step-counted schedules stretched to ``steps`` (a copy; itself
        when ``schedule_steps`` is None or equals ``steps``)."""
        if self.schedule_steps is None or self.schedule_steps == self.steps:
            return self
        ratio = self.steps / self.schedule_steps
        out = copy.deepcopy(self)
        out.guidance.anneal_steps = round(self.guidance.anneal_steps * ratio)
        out.shading.ambient_only_steps = round(self.shading.ambient_only_steps * ratio)
        out.optim.orient_end_step = round(self.optim.orient_end_step * ratio)
        out.cameras.schedule = [[round(start * ratio), res, groups]
                                for start, res, groups in self.cameras.schedule]
        out.schedule_steps = self.steps
        return out

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.schedule_steps is not None and (isinstance(self.schedule_steps, bool) or not isinstance(
                self.schedule_steps, int) or self.schedule_steps < 1):
            raise ValueError(f"sds.schedule_steps must be null or an integer >= 1, got {self.schedule_steps!r}")
        if self.guidance_kind not in GUIDANCE_KINDS:
            raise ValueError(f"guidance_kind must be one of {GUIDANCE_KINDS}, got {self.guidance_kind!r}")
        if self.checkpoint_every < 1 or self.log_every < 1 or self.render_every < 1:
            raise ValueError("checkpoint_every, log_every and render_every must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SDSConfig:
        """Build from nested dicts (Hydra's resolved config) through the one door."""
        return build(cls, values, "sds")


@dataclass
class TextTo3DSettings:
    """What a text-to-3D run is asked for besides its prompt, seed and model: the one shape in
    which the job (``jobs/text_to_3d.py``), Serve's worker and a Tune trial all hand their
    configuration over. :meth:`config` is its :class:`SDSConfig`, built through the one door.

    Attributes:
        sds: the ``sds`` section (nested dicts, as in ``conf/sds/``).
        steps: the run's length (overrides ``sds.steps``).
        guidance_kind: ``mvdream`` (multi-view SDS) or ``dreamfusion`` (the 2D baseline).
        guidance_scale: the CFG scale, or None to keep ``sds.guidance.guidance_scale``.
    """

    sds: dict[str, Any] = dc_field(default_factory=dict)
    steps: int = SDSConfig.steps
    guidance_kind: str = "mvdream"
    guidance_scale: float | None = None

    @classmethod
    def of_run(cls, run: dict[str, Any]) -> TextTo3DSettings:
        """From a job-shaped mapping: ``sds``, ``steps``, ``guidance_kind`` and
        ``guidance_scale`` (jobs/text_to_3d.py's resolved config, a Tune trial's run)."""
        return cls(sds=copy.deepcopy(dict(run.get("sds") or {})), steps=run["steps"],
                   guidance_kind=run.get("guidance_kind", "mvdream"),
                   guidance_scale=run.get("guidance_scale"))

    def config(self) -> SDSConfig:
        values = copy.deepcopy(self.sds)
        values["steps"] = self.steps
        values["guidance_kind"] = self.guidance_kind
        if self.guidance_scale is not None:
            values.setdefault("guidance", {})["guidance_scale"] = self.guidance_scale
        return SDSConfig.from_dict(values)
