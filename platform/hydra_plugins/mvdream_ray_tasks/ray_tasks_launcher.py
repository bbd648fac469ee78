"""The ``ray_tasks`` launcher: its config (in Hydra's ConfigStore) and the Launcher class.

Options (``hydra.launcher.<name>=...`` on the command line):

* ``address``: the Ray cluster. ``null`` follows ``ray.init``: ``$RAY_ADDRESS``, else the latest
  cluster started on this machine, else a new local one; ``local`` always starts a new local
  cluster in this process; ``auto``, ``HOST:PORT`` and ``ray://HOST:PORT`` as in ``ray.init``.
  When this process already called ``ray.init``, that connection is used as it is.
* ``num_cpus`` / ``num_gpus`` / ``resources``: what each job reserves; Ray runs as many jobs at
  once as the cluster fits (a GPU job sees only its own GPU through CUDA_VISIBLE_DEVICES).
* ``max_concurrent``: at most this many jobs in flight (``null``: no limit beyond resources).
* ``max_retries``: reruns of a job whose worker died (0: report it as failed; text-to-3D jobs
  resume from their checkpoints, so rerunning the sweep continues them).
* ``init``: further ``ray.init`` keyword arguments, e.g. ``+hydra.launcher.init.num_cpus=2`` for
  a new local cluster, ``runtime_env``, ``include_dashboard``.

Importing this module must stay cheap (Hydra imports it at every start): Ray is imported only
when a sweep launches.
"""

# No `from __future__ import annotations` here: Hydra's plugin scan executes this module before
# it is in sys.modules, where dataclasses cannot resolve string annotations.
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


@dataclass
class RayTasksLauncherConf:
    _target_: str = "hydra_plugins.mvdream_ray_tasks.ray_tasks_launcher.RayTasksLauncher"
    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    max_concurrent: int | None = None
    max_retries: int = 0
    init: dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/launcher", name="ray_tasks", node=RayTasksLauncherConf,
                             provider="mvdream_platform")


class RayTasksLauncher(Launcher):
    """Launches each job of a sweep as a Ray task; returns the JobReturns in job order."""

    def __init__(self, address: str | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 resources: dict[str, float] | None = None, max_concurrent: int | None = None,
                 max_retries: int = 0, init: dict[str, Any] | None = None) -> None:
        if num_cpus < 0 or num_gpus < 0:
            raise ValueError(f"hydra.launcher.num_cpus and num_gpus must be >= 0, got {num_cpus}, {num_gpus}")
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError(f"hydra.launcher.max_concurrent must be >= 1 or null, got {max_concurrent}")
        if max_retries < 0:
            raise ValueError(f"hydra.launcher.max_retries must be >= 0, got {max_retries}")
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.resources = _plain(resources)
        self.max_concurrent = max_concurrent
        self.max_retries = max_retries
        self.init = _plain(init)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from . import _core

        return _core.launch(self, job_overrides, initial_job_idx)


def _plain(mapping: Any) -> dict[str, Any]:
    """A config mapping (DictConfig, dict or None) as plain Python containers, for Ray."""
    if mapping is None:
        return {}
    if isinstance(mapping, DictConfig):
        return OmegaConf.to_container(mapping, resolve=True)
    return dict(mapping)
