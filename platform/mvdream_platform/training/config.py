"""Plain dataclasses describing a training run (the Hydra job fills them; notebooks can too)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import build
from ..data.datasets import parse_background
from ..diffusion import PREDICTION_TYPES, check_terminal_snr
from ..pipelines.loading import ModelConfig
from .optim import LR_SCHEDULES
from .parallel import PARALLEL_STRATEGIES
from .samples import SampleConfig

MIXED_PRECISION = ("no", "bf16")
DATA_LOADERS = ("mixture", "ray_data")
LOGGER_MODES = ("offline", "online", "disabled")
PRESERVATION_DISTANCES = ("l1", "l2")


@dataclass
class DataConfig:
    """The 3D/2D mixture (see :class:`mvdream_platform.data.mixture.MixtureLoader`)."""

    name: str = "shapes"
    uri: str | None = None  # multi-view renders (jobs/prepare_data.py source=shapes|meshes)
    image_uri: str | None = None  # text-image shards (source=images)
    p_multiview: float = 0.7
    num_views: int = 4
    resolution: int = 32
    multiview_batch: int = 8  # objects per multi-view step, per worker
    image_batch: int = 32  # images per 2D step, per worker
    num_workers: int = 2  # DataLoader processes per training worker (loader=mixture)
    # mixture: a map-style DataLoader per worker (folders or shards); ray_data: Ray Data
    # streams sharded records, decoding on any CPU of the cluster (data/ray_ingest.py)
    loader: str = "mixture"
    ingest_cpus_per_task: float = 0.5  # loader=ray_data: CPUs of each read / decode task
    # What the multi-view renders are composited over: "random_grey" (one grey level per item,
    # as MVDream trains), or a fixed "grey" / "white" / "black" / level in [0, 1] / [r, g, b]
    background: Any = "random_grey"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not self.uri and not self.image_uri:
            raise ValueError("data.uri (multi-view renders) or data.image_uri (text-image shards) is required")
        if not 0.0 <= self.p_multiview <= 1.0:
            raise ValueError(f"data.p_multiview must lie in [0, 1], got {self.p_multiview}")
        for name in ("num_views", "resolution", "multiview_batch", "image_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.loader not in DATA_LOADERS:
            raise ValueError(f"data.loader must be one of {DATA_LOADERS}, got {self.loader!r}")
        if not self.ingest_cpus_per_task > 0:
            raise ValueError(f"data.ingest_cpus_per_task must be > 0, got {self.ingest_cpus_per_task}")
        try:
            parse_background(self.background)
        except ValueError as err:
            raise ValueError(f"data.background: {err}") from None


@dataclass
class TrainerConfig:
    """Optimisation and loop settings (per-worker batch sizes live in DataConfig)."""

    max_steps: int = 1000
    lr: float = 1e-4
    warmup_steps: int = 100
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    grad_accumulation: int = 1
    ema_decay: float = 0.0  # 0 disables EMA
    text_dropout: float = 0.1  # empty prompt 10% of the time so classifier-free guidance works
    # None: the model's own parameterisation (a saved pipeline's scheduler; epsilon for a new
    # model unless model.scheduler says otherwise), so fine-tuning a v model stays v.
    prediction_type: str | None = None
    mixed_precision: str = "no"  # "bf16": autocast on GPU
    gradient_checkpointing: bool = False
    # torch.compile the UNet (in place: checkpoints unchanged). On CPU, inductor needs a C++
    # compiler; the first steps of each kind (multi-view, 2D) pay the compilation.
    compile: bool = False
    checkpoint_every: int = 200
    log_every: int = 10
    seed: int = 0
    # Multi-view DreamBooth's parameter-preservation loss (paper §3.3):
    # weight * distance(theta, theta_0) / N_theta, theta_0 the weights the run started from
    # (l1: sum |theta - theta_0|; l2: sum (theta - theta_0)^2). 0 disables it.
    preservation_weight: float = 0.0
    preservation_distance: str = "l1"
    # Timestep bias (diffusers' SDXL example, "range" strategy): t in [begin, end) is drawn
    # `timestep_bias_multiplier` times as often as the rest. None / 1.0: uniform t.
    timestep_bias_range: list[int] | None = None
    timestep_bias_multiplier: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"trainer.max_steps must be >= 1, got {self.max_steps}")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("trainer.checkpoint_every and trainer.log_every must be >= 1")
        if self.grad_accumulation < 1:
            raise ValueError(f"trainer.grad_accumulation must be >= 1, got {self.grad_accumulation}")
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"trainer.prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"trainer.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"trainer.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if not 0.0 <= self.text_dropout < 1.0:
            raise ValueError(f"trainer.text_dropout must lie in [0, 1), got {self.text_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"trainer.ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.preservation_weight < 0:
            raise ValueError(f"trainer.preservation_weight must be >= 0, got {self.preservation_weight}")
        if self.timestep_bias_multiplier <= 0:
            raise ValueError(f"trainer.timestep_bias_multiplier must be > 0, got {self.timestep_bias_multiplier}")
        if self.timestep_bias_range is not None and (
                len(self.timestep_bias_range) != 2
                or not 0 <= self.timestep_bias_range[0] < self.timestep_bias_range[1]):
            raise ValueError("trainer.timestep_bias_range must be [begin, end) with 0 <= begin < end, "
                             f"got {self.timestep_bias_range}")
        if self.preservation_distance not in PRESERVATION_DISTANCES:
            raise ValueError(f"trainer.preservation_distance must be one of {PRESERVATION_DISTANCES}, "
                             f"got {self.preservation_distance!r}")


@dataclass
class ClusterConfig:
    """Ray Train scaling: how many workers and what each gets."""

    name: str = "local_cpu"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    backend: str = "gloo"  # gloo on CPU, nccl on GPUs
    torch_threads: int = 1  # per worker: oversubscribed OpenMP threads crawl on small machines
    placement_strategy: str = "PACK"
    # ddp: a replica per worker; fsdp: parameters, gradients and AdamW state sharded across
    # workers (training/parallel.py)
    parallel_strategy: str = "ddp"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.parallel_strategy not in PARALLEL_STRATEGIES:
            raise ValueError(f"cluster.parallel_strategy must be one of {PARALLEL_STRATEGIES}, "
                             f"got {self.parallel_strategy!r}")
        if self.num_workers < 0:
            raise ValueError(f"cluster.num_workers must be >= 0 (0 = in-process), got {self.num_workers}")
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"cluster.backend must be gloo or nccl, got {self.backend!r}")


@dataclass
class RunSettings:
    """Where the run lives: checkpoints under ``storage_path/name``; rerun the name to resume."""

    name: str = "tiny"
    storage_path: str = "outputs/runs"
    num_to_keep: int = 2
    max_failures: int = 2


@dataclass
class LoggerConfig:
    mode: str = "offline"
    project: str = "mvdream-platform"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.mode not in LOGGER_MODES:
            raise ValueError(f"logger.mode must be one of {LOGGER_MODES}, got {self.mode!r}")


@dataclass
class TrainJobConfig:
    # model and data have no defaults: neither has a valid one (a source, a data folder)
    model: ModelConfig
    data: DataConfig
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    run: RunSettings = field(default_factory=RunSettings)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    samples: SampleConfig = field(default_factory=SampleConfig)
    # Test hook: SIGKILL one worker process at this step on the first attempt only, to prove
    # that a run survives losing a worker. Never set in real runs.
    crash_at_step: int | None = None

    def __post_init__(self) -> None:
        # A saved model's scheduler is checked again once loaded (training/loop.py).
        scheduler = self.model.scheduler or {}
        check_terminal_snr(scheduler, self.trainer.prediction_type
                           or scheduler.get("prediction_type", "epsilon"))
        if self.cluster.parallel_strategy == "fsdp" and self.trainer.preservation_weight > 0:
            # ParameterPreservation keeps theta_0 and the distance per full parameter; under
            # FSDP each rank holds shards. Not built yet: DreamBooth runs fit in DDP anyway.
            raise ValueError("trainer.preservation_weight > 0 (DreamBooth) is not supported with "
                             "cluster.parallel_strategy=fsdp yet; use ddp")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainJobConfig:
        """Build from nested dicts (the job's resolved config) through the one door."""
        return build(cls, values, "train")
