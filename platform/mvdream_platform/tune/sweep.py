"""A text-to-3D sweep on Ray Tune: the Tuner, its scheduler and searcher, resume, results.

:func:`run_sweep` takes a :class:`SweepConfig` (plain data; ``jobs/tune_sds.py`` builds it from
Hydra) and

1. joins the cluster named by ``RAY_ADDRESS`` (``ray job submit``) or starts a local one;
2. builds the Tuner: one trial per sampled configuration (:func:`.trial.run_trial`, resources
   per trial from config, ``max_concurrent_trials``), ASHA on the objective with the SDS step as
   its time attribute (or FIFO), random/grid search (``BasicVariantGenerator``) or Optuna;
3. resumes instead when ``<storage_path>/<name>`` already holds that sweep
   (``Tuner.restore``: unfinished trials continue from their checkpoints, finished ones are
   kept as they are, errored ones are resumed/restarted/skipped as configured);
4. writes the results (:mod:`.results`): results.{csv,parquet,md}, best.yaml (a text-to-3D job
   config), best_overrides.txt and summary.json into the sweep folder.

A failing trial (an exception, a non-finite loss) is recorded with status ERROR; the sweep goes
on. Interrupting the driver (Ctrl+C / SIGINT, or SIGUSR1) saves the experiment state; rerun with
the same ``name`` to go on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import storage
from ..config import build
from ..sds.config import TextTo3DSettings
from .objective import ObjectiveConfig
from .results import collect_rows, summarise, write_best, write_table
from .space import SearchSpace, SpaceError
from .trial import TrialSpec, run_trial

log = logging.getLogger(__name__)

SEARCHERS = ("random", "grid", "optuna")  # random and grid are both BasicVariantGenerator
SCHEDULERS = ("asha", "fifo")
RESUME_ERRORED = ("resume", "restart", "skip")
SWEEP_RECORD = "sweep.json"


@dataclass
class SchedulerConfig:
    """ASHA (early stopping; time attribute = the SDS step, max_t = the run's steps) or FIFO
    (every trial runs to the end).

    ``grace_period``: steps before the first stop decision; ``reduction_factor``: keep the best
    1/rf at each rung (rungs at grace * rf^k); ``brackets``: ASHA's brackets.
    """

    kind: str = "asha"
    grace_period: int = 100
    reduction_factor: float = 2.0
    brackets: int = 1


@dataclass
class SearchConfig:
    """``random``/``grid``: Ray Tune's BasicVariantGenerator (grids crossed, the rest sampled
    ``num_samples`` times per grid point); ``optuna``: OptunaSearch (TPE; needs ``optuna``; the
    grids become categorical choices and it runs num_samples x grid points trials in all)."""

    kind: str = "random"
    num_samples: int = 1
    max_concurrent_trials: int | None = 1
    seed: int | None = 0


@dataclass
class ResourcesConfig:
    """Per trial: CPUs and GPUs (1 GPU per trial on GPU clusters; N CPUs on the laptop default)."""

    cpu: float = 1.0
    gpu: float = 0.0


@dataclass
class SweepConfig:
    """Everything a sweep needs (see ``conf/tune_sds.yaml`` and ``conf/tune/*.yaml``).

    ``run`` is the text-to-3D job's settings (prompt, seed, steps, guidance, guidance_scale,
    sds, device), the base every trial overrides; ``model`` the prior's ModelConfig fields.
    """

    name: str
    storage_path: str
    run: dict[str, Any]
    model: dict[str, Any]
    space: SearchSpace = field(default_factory=SearchSpace)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    logger_mode: str = "offline"
    logger_project: str = "mvdream-platform"
    group: str | None = None
    max_failures: int = 0
    resume_errored: str = "resume"
    reuse_actors: bool = True
    keep_checkpoints: int = 1
    verbose: int = 1

    def __post_init__(self) -> None:
        self.validate()

    @property
    def sweep_dir(self) -> str:
        return storage.join(self.storage_path, self.name)

    @property
    def metric(self) -> str:
        return self.objective.metric

    @property
    def mode(self) -> str:
        return self.objective.mode

    @property
    def max_t(self) -> int:
        """ASHA's max_t: the run's length (a trial stopped before it has no assets)."""
        return int(self.run["steps"])

    @classmethod
    def from_tune_dict(cls, tune: dict[str, Any], **values: Any) -> SweepConfig:
        """Build from the ``tune`` config group's dict (space + search settings) and the rest."""
        tune = dict(tune or {})
        space_keys = ("prompts", "params", "negative_prompts")
        sections = {"objective": ObjectiveConfig.from_dict, "scheduler": _section(SchedulerConfig),
                    "search": _section(SearchConfig), "resources": _section(ResourcesConfig)}
        plain = {"max_failures", "resume_errored", "reuse_actors", "keep_checkpoints", "verbose"}
        unknown = sorted(set(tune) - set(space_keys) - set(sections) - plain)
        if unknown:
            raise ValueError(f"unknown tune keys {unknown}; allowed: "
                             f"{sorted([*space_keys, *sections, *plain])}")
        built = {name: make(tune.get(name) or {}) for name, make in sections.items()}
        built["space"] = SearchSpace.from_dict({k: tune[k] for k in space_keys if k in tune})
        built |= {k: tune[k] for k in plain if k in tune}
        return cls(**values, **built)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (before any trial starts)."""
        if not isinstance(self.name, str) or not self.name.strip() or "/" in self.name:
            raise ValueError(f"name must be a non-empty folder name (no '/'), got {self.name!r}")
        if storage.is_local(self.storage_path) and not os.path.isabs(storage.local_path(self.storage_path)):
            raise ValueError(f"storage_path must be absolute (Ray workers have other cwds), got {self.storage_path!r}")
        s, q, r = self.scheduler, self.search, self.resources
        if s.kind not in SCHEDULERS:
            raise ValueError(f"tune.scheduler.kind must be one of {SCHEDULERS}, got {s.kind!r}")
        if q.kind not in SEARCHERS:
            raise ValueError(f"tune.search.kind must be one of {SEARCHERS}, got {q.kind!r}")
        concurrency = (("search.max_concurrent_trials", q.max_concurrent_trials),) \
            if q.max_concurrent_trials is not None else ()  # None: as many as resources allow
        for name, value in (("search.num_samples", q.num_samples), *concurrency,
                            ("keep_checkpoints", self.keep_checkpoints)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"tune.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.max_failures, int) or self.max_failures < 0:
            raise ValueError(f"tune.max_failures must be an integer >= 0, got {self.max_failures!r}")
        if self.resume_errored not in RESUME_ERRORED:
            raise ValueError(f"tune.resume_errored must be one of {RESUME_ERRORED}, got {self.resume_errored!r}")
        if r.cpu < 0 or r.gpu < 0 or (r.cpu == 0 and r.gpu == 0):
            raise ValueError(f"tune.resources needs cpu >= 0 and gpu >= 0, not both 0; got cpu={r.cpu}, gpu={r.gpu}")
        if self.logger_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode must be offline, online or disabled, got {self.logger_mode!r}")
        # The base run must be valid on its own (a bad base would fail every trial).
        if not (self.space.prompts or self.run.get("prompt")):
            raise SpaceError("tune.prompts is empty and prompt= is not set")
        sds = TextTo3DSettings.of_run(self.run).config()
        self.space.check_annealing(self.run.get("sds", {}).get("guidance"))
        # Report points must line up: scores are taken from committed checkpoints, which the
        # run hands over on logged steps; ASHA must decide on fresh scores.
        every = self.objective.every or sds.checkpoint_every
        if sds.checkpoint_every % sds.log_every:
            raise ValueError(f"sds.checkpoint_every ({sds.checkpoint_every}) must be a multiple of "
                             f"sds.log_every ({sds.log_every}): trials report on logged steps")
        if every % sds.checkpoint_every:
            raise ValueError(f"tune.objective.every ({every}) must be a multiple of sds.checkpoint_every "
                             f"({sds.checkpoint_every}): the score reads the committed checkpoint")
        if s.kind == "asha":
            if not isinstance(s.grace_period, int) or s.grace_period < 1:
                raise ValueError(f"tune.scheduler.grace_period must be an integer >= 1, got {s.grace_period!r}")
            if s.grace_period % every:
                raise ValueError(f"tune.scheduler.grace_period ({s.grace_period}) must be a multiple of the "
                                 f"objective interval ({every}: tune.objective.every or sds.checkpoint_every) "
                                 "so that ASHA compares fresh scores")
            if not s.reduction_factor > 1:
                raise ValueError(f"tune.scheduler.reduction_factor must be > 1, got {s.reduction_factor!r}")
            if s.grace_period > sds.steps:
                raise ValueError(f"tune.scheduler.grace_period ({s.grace_period}) must be <= steps ({sds.steps})")
        if q.kind == "optuna":
            _require_optuna()

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a sweep and its resumption."""
        return {"run": self.run, "model": self.model, "space": self.space.describe(),
                "objective": asdict(self.objective), "scheduler": asdict(self.scheduler),
                "search": asdict(self.search)}

    def trial_spec(self) -> TrialSpec:
        return TrialSpec(sweep_dir=self.sweep_dir, name=self.name, run=self.run, model=self.model,
                         space=self.space, objective=self.objective, logger_mode=self.logger_mode,
                         logger_project=self.logger_project, group=self.group or self.name)


def _section(kind):
    return lambda values: build(kind, values, f"tune.{kind.__name__.removesuffix('Config').lower()}")


def _require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError as error:
        raise ValueError("tune.search.kind=optuna needs the optuna package, which is not installed "
                         "(pip install optuna); or use tune.search.kind=random") from error


# ---------------------------------------------------------------------------------- Tuner


def trial_dirname(trial) -> str:
    """Tune's per-trial folder name: the trial id (our assets live in trials/<trial_id>)."""
    return trial.trial_id


def build_scheduler(config: SweepConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = config.scheduler
    if s.kind == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="step", max_t=config.max_t, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor, brackets=s.brackets)


def build_searcher(config: SweepConfig):
    q = config.search
    if q.kind == "optuna":
        _require_optuna()
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=q.seed)
    from ray.tune.search import BasicVariantGenerator

    # The generator limits concurrency itself (TuneConfig's limit only wraps Searchers).
    return BasicVariantGenerator(random_state=q.seed, max_concurrent=q.max_concurrent_trials or 0)


def param_space(config: SweepConfig) -> dict[str, Any]:
    optuna = config.search.kind == "optuna"
    if optuna and config.space.has_grid():
        log.warning("Optuna cannot grid: prompts and grid parameters become categorical choices")
    return config.space.param_space(default_prompt=config.run.get("prompt"), grid_as_choice=optuna)


def num_samples(config: SweepConfig) -> int:
    """Tune's num_samples: per grid point for BasicVariantGenerator (it crosses the grids);
    Optuna samples everything, so it gets the same budget in total."""
    if config.search.kind == "optuna":
        return config.search.num_samples * config.space.grid_points()
    return config.search.num_samples


def build_tuner(config: SweepConfig):
    """A new Tuner, or the restored one when the sweep folder already holds this sweep."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=config.trial_spec()),
                                    {"cpu": config.resources.cpu, "gpu": config.resources.gpu})
    if tune.Tuner.can_restore(config.sweep_dir):
        log.info("resuming sweep %s from %s", config.name, config.sweep_dir)
        return tune.Tuner.restore(config.sweep_dir, trainable, resume_unfinished=True,
                                  resume_errored=config.resume_errored == "resume",
                                  restart_errored=config.resume_errored == "restart"), True
    tune_config = tune.TuneConfig(
        metric=config.metric, mode=config.mode, scheduler=build_scheduler(config),
        search_alg=build_searcher(config), num_samples=num_samples(config),
        max_concurrent_trials=config.search.max_concurrent_trials if config.search.kind == "optuna" else None,
        reuse_actors=config.reuse_actors,
        trial_dirname_creator=trial_dirname)
    run_config = tune.RunConfig(
        name=config.name, storage_path=config.storage_path, verbose=config.verbose,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=config.keep_checkpoints),
        failure_config=tune.FailureConfig(max_failures=config.max_failures))
    return tune.Tuner(trainable, param_space=param_space(config), tune_config=tune_config,
                      run_config=run_config), False


def _check_same_sweep(config: SweepConfig) -> None:
    """Refuse to resume a sweep folder with a different sweep in it (Tune cannot change spaces)."""
    path = storage.join(config.sweep_dir, SWEEP_RECORD)
    fingerprint = json.loads(json.dumps(config.fingerprint(), default=str))
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    if storage.exists(path):
        previous = storage.read_json(path)
        if previous.get("digest") != digest:
            changed = sorted(k for k in fingerprint if previous.get("config", {}).get(k) != fingerprint[k])
            raise ValueError(f"sweep {config.name!r} in {config.sweep_dir} was started with other settings "
                             f"(changed: {changed}); resuming needs the same ones. Pick a new name= or "
                             "remove that folder")
        return
    storage.write_json(path, {"name": config.name, "digest": digest, "config": fingerprint,
                              "created": time.time()})


def run_sweep(config: SweepConfig) -> dict[str, Any]:
    """Run (or resume) the sweep; returns the summary (also written to summary.json)."""
    from ..cluster import ensure_ray

    ensure_ray(num_cpus=None)
    _check_same_sweep(config)
    began = time.perf_counter()
    tuner, resumed = build_tuner(config)
    tuner.fit()
    seconds = time.perf_counter() - began
    rows = collect_rows(config.sweep_dir, metric=config.metric, steps=int(config.run["steps"]))
    paths = write_table(rows, config.sweep_dir, metric=config.metric)
    summary = summarise(rows, config.sweep_dir, metric=config.metric, mode=config.mode)
    summary |= {"name": config.name, "resumed": resumed, "seconds": round(seconds, 2), "files": paths}
    if summary["best"] is not None:
        summary["files"] |= write_best(summary["best"], config.sweep_dir, config.model, config.name,
                                       metric=config.metric)
    storage.write_json(storage.join(config.sweep_dir, "summary.json"), summary)
    return summary
