"""Plain settings of the Serve application (jobs/serve.py fills them from Hydra; the Ray Serve
config file in conf/serve/ carries the same dict as the application's ``args``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import build

RESPONSE_FORMATS = ("base64", "url")


@dataclass
class Limits:
    """What one request may ask for; anything outside gets a 4xx naming the field and range."""

    max_prompts_per_request: int = 16
    max_prompt_chars: int = 300
    max_body_bytes: int = 65536
    # multi-view sampling
    max_sampling_steps: int = 100
    view_choices: tuple[int, ...] = (1, 2, 4)
    resolution_choices: tuple[int, ...] = (32,)
    elevation_range: tuple[float, float] = (-30.0, 60.0)
    guidance_scale_range: tuple[float, float] = (1.0, 30.0)
    # The work one multi-view request may ask for, prompts x num_views x steps (denoiser
    # evaluations per view): each limit alone allows 16 x 4 x 100, which held the only
    # generator for minutes.
    max_multiview_work: int = 1600
    # Prompts of one request sampled at a time: the rest wait, so another client's request
    # joins the generator's queue behind at most this many of a large request's prompts.
    max_prompts_in_flight: int = 2
    # A multi-view request not answered within this time gets a 503 and its waiting prompts are
    # withdrawn (a prompt already being sampled finishes its batch).
    multiview_deadline_s: float = 120.0
    # Seconds a client should wait before retrying a 503 (Retry-After).
    retry_after_s: int = 5
    # text-to-3D
    max_sds_steps: int = 2000
    max_seed: int = 2**31 - 1

    def validate(self) -> None:
        if min(self.max_prompts_per_request, self.max_prompt_chars, self.max_body_bytes,
               self.max_sampling_steps, self.max_sds_steps, self.max_multiview_work,
               self.max_prompts_in_flight, self.retry_after_s) < 1:
            raise ValueError("serve.limits: every max_* and retry_after_s must be >= 1")
        if self.multiview_deadline_s <= 0:
            raise ValueError("serve.limits.multiview_deadline_s must be > 0")
        if not self.view_choices or not self.resolution_choices:
            raise ValueError("serve.limits: view_choices and resolution_choices must not be empty")


@dataclass
class DeploymentSettings:
    """Replicas and resources of one deployment.

    ``autoscaling`` is a Ray Serve ``autoscaling_config`` dict (min_replicas, max_replicas,
    target_ongoing_requests, ...); when set it replaces ``num_replicas``.
    """

    num_replicas: int = 1
    autoscaling: dict[str, Any] | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 16

    def options(self) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options``."""
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
        }
        if self.autoscaling:
            opts["autoscaling_config"] = dict(self.autoscaling)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts

    def validate(self, where: str) -> None:
        if self.num_replicas < 1 or self.num_cpus < 0 or self.num_gpus < 0 or self.max_ongoing_requests < 1:
            raise ValueError(f"{where}: num_replicas and max_ongoing_requests must be >= 1, "
                             f"num_cpus and num_gpus >= 0")


@dataclass
class GeneratorSettings(DeploymentSettings):
    """The multi-view sampler: requests from all clients are merged by ``@serve.batch``."""

    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.05
    max_ongoing_requests: int = 32  # must exceed max_batch_size or batches never fill

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise ValueError(f"{where}: max_batch_size must be >= 1 and batch_wait_timeout_s >= 0")


@dataclass
class WorkerSettings(DeploymentSettings):
    """Text-to-3D workers: one job at a time per replica; the queue spreads jobs over them."""

    max_ongoing_requests: int = 1
    # A job whose worker died is retried (from its last field checkpoint) up to this many
    # attempts in all.
    max_attempts: int = 3
    # A worker refreshes its job's lease this often; a lease older than ``lease_timeout_s``
    # (or whose owner actor is dead) may be taken over.
    heartbeat_s: float = 5.0
    lease_timeout_s: float = 120.0
    # Replicas being stopped do not wait long for their job: it resumes from its checkpoint on
    # the next replica anyway (Serve's default would hold a scale-down for 20 s).
    graceful_shutdown_timeout_s: float = 2.0

    def options(self) -> dict[str, Any]:
        return super().options() | {"graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s}

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.max_attempts < 1 or self.heartbeat_s <= 0 or self.lease_timeout_s <= self.heartbeat_s:
            raise ValueError(f"{where}: max_attempts must be >= 1 and lease_timeout_s > heartbeat_s > 0")


@dataclass
class ServeSettings:
    """Everything the application needs: the model, SDS defaults, storage, limits, deployments.

    ``model`` holds :class:`mvdream_platform.pipelines.loading.ModelConfig` fields and ``sds``
    :class:`mvdream_platform.sds.config.SDSConfig` fields (nested dicts, as in conf/sds/).
    """

    model: dict[str, Any]
    sds: dict[str, Any] = field(default_factory=dict)
    storage: str = "outputs/serve"  # job state, assets and URL-returned images (path or fsspec URI)
    auth_token_env: str = "MVDREAM_SERVE_TOKEN"  # bearer token required when this variable is set
    # Serving beyond loopback without a token is refused (jobs/serve.py, `serve run`, `serve
    # deploy`) unless this is true.
    allow_anonymous_remote: bool = False
    device: str = "auto"
    # Serving metrics (request latency, batch size, job queue) every ``metrics_every_s`` from
    # each ingress replica: W&B (offline | online | disabled) plus a local metrics.jsonl under
    # ``tracking_dir`` (null: <storage>/tracking when storage is local, else outputs/serve/tracking).
    logger: str = "offline"
    wandb_project: str = "mvdream-platform"
    tracking_dir: str | None = None
    metrics_every_s: float = 10.0
    # Finished jobs (their folder: request, state, assets, checkpoints) and the images of
    # response_format=url multi-view requests are deleted this many days after they finished;
    # null keeps everything. The job queue cleans up when it starts and every hour.
    retention_days: float | None = 30.0
    default_sds_steps: int = 150
    default_sampling_steps: int | None = None  # None: the model's recommendation
    limits: Limits = field(default_factory=Limits)
    # HTTP ingress: many requests wait on the generator at once, so it must admit far more than
    # Serve's default of 5, or batches can never fill.
    ingress: DeploymentSettings = field(default_factory=lambda: DeploymentSettings(
        num_cpus=0.0, max_ongoing_requests=256))
    generator: GeneratorSettings = field(default_factory=GeneratorSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not self.storage:
            raise ValueError("serve.storage must be a path or URI")
        if self.metrics_every_s <= 0:
            raise ValueError(f"serve.metrics_every_s must be > 0, got {self.metrics_every_s}")
        if self.retention_days is not None and not self.retention_days > 0:
            raise ValueError(f"serve.retention_days must be > 0 or null (keep all), got {self.retention_days}")
        if not 1 <= self.default_sds_steps <= self.limits.max_sds_steps:
            raise ValueError(f"serve.default_sds_steps must be in 1..limits.max_sds_steps "
                             f"({self.limits.max_sds_steps}), got {self.default_sds_steps}")
        self.limits.validate()
        self.ingress.validate("serve.ingress")
        self.generator.validate("serve.generator")
        self.worker.validate("serve.worker")

    def tracking_folder(self) -> str:
        """Local folder of the serving metrics (W&B needs a local folder)."""
        from .. import storage

        if self.tracking_dir:
            return self.tracking_dir
        if storage.is_local(self.storage):
            return storage.join(storage.local_path(self.storage), "tracking")
        return "outputs/serve/tracking"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ServeSettings:
        return build(cls, values, "serve")
