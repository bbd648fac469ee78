"""The Ray side of the ``ray_tasks`` launcher, imported only when a sweep launches.

Each job runs as one Ray task in its own Hydra job context, exactly as Hydra's basic launcher
runs it in-process: ``hydra.core.utils.run_job`` with the job's sweep config (its overrides,
``hydra.job.num``, ``hydra.sweep.dir``/``subdir``), so the job's callbacks, logging and output
folder behave the same. A job whose task raises still returns a FAILED JobReturn (``run_job``
catches the error); a task that never returns one (its worker died, was killed for memory, ...)
becomes a FAILED JobReturn here, and the other jobs' results are kept either way.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import (
    JobReturn,
    JobRuntime,
    JobStatus,
    configure_log,
    filter_overrides,
    run_job,
    setup_globals,
)
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)


def launch(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    """Run ``job_overrides`` as Ray tasks; returns their JobReturns in job order."""
    setup_globals()
    config, context, task_function = launcher.config, launcher.hydra_context, launcher.task_function
    assert config is not None and context is not None and task_function is not None, "launcher not set up"
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    # Absolute, resolved once here: workers may start in another folder or a later second.
    sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    connect(launcher.address, launcher.init)
    _warn_if_never_fits(launcher)

    task = ray.remote(_run_job)
    options = dict(num_cpus=launcher.num_cpus, num_gpus=launcher.num_gpus,
                   resources=launcher.resources or None, max_retries=launcher.max_retries)
    # Shared by every job: put into the object store once.
    shared = (ray.put(context), ray.put(task_function), ray.put(Singleton.get_state()))
    log.info("Launching %d jobs as Ray tasks (%g CPU, %g GPU each%s); sweep folder %s",
             len(job_overrides), launcher.num_cpus, launcher.num_gpus,
             f", at most {launcher.max_concurrent} at once" if launcher.max_concurrent else "", sweep_dir)

    began = time.perf_counter()
    configs: list[DictConfig] = []
    results: list[JobReturn | None] = [None] * len(job_overrides)
    pending: dict[Any, int] = {}  # ObjectRef -> position in job_overrides

    def collect_one() -> None:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            i = pending.pop(ref)
            results[i] = _job_return(ref, context, configs[i], job_overrides[i])
            _log_end(initial_job_idx + i, results[i], time.perf_counter() - began)

    for i, overrides in enumerate(job_overrides):
        idx = initial_job_idx + i
        sweep_config = context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
            sweep_config.hydra.sweep.dir = str(sweep_dir)
        configs.append(sweep_config)
        while launcher.max_concurrent and len(pending) >= launcher.max_concurrent:
            collect_one()
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        pending[task.options(name=f"hydra job #{idx}", **options).remote(*shared, sweep_config)] = i
    while pending:
        collect_one()
    failed = [initial_job_idx + i for i, r in enumerate(results) if r.status != JobStatus.COMPLETED]
    log.info("%d of %d jobs completed%s", len(results) - len(failed), len(results),
             f"; failed: {', '.join(f'#{i}' for i in failed)}" if failed else "")
    return results


def connect(address: str | None, init: dict[str, Any]) -> None:
    """``ray.init(address, **init)`` unless this process is connected already."""
    if ray.is_initialized():
        log.info("Ray is initialised in this process already: using that cluster")
    else:
        ray.init(address=address, **init)
    resources = ray.cluster_resources()
    log.info("Ray cluster %s: %g CPU, %g GPU", ray.get_runtime_context().gcs_address,
             resources.get("CPU", 0), resources.get("GPU", 0))


def _warn_if_never_fits(launcher) -> None:
    # An autoscaling cluster may still grow, so this only warns (Ray itself waits).
    resources = ray.cluster_resources()
    needs = {"CPU": launcher.num_cpus, "GPU": launcher.num_gpus, **launcher.resources}
    short = {k: v for k, v in needs.items() if v > resources.get(k, 0)}
    if short:
        log.warning("each job asks for %s but the cluster has %s: jobs wait until it grows",
                    short, {k: resources.get(k, 0) for k in short})


def _run_job(context: HydraContext, task_function: TaskFunction, singleton_state: dict[Any, Any],
             sweep_config: DictConfig) -> JobReturn:
    """One job of the sweep, inside a Ray worker: Hydra's own ``run_job`` in the driver's folder."""
    setup_globals()
    Singleton.set_state(singleton_state)
    here = os.getcwd()
    # Relative paths in the job (out=outputs/..., data folders) mean what they mean on the
    # command line: run in the driver's working directory when this node has it.
    cwd = OmegaConf.select(sweep_config, "hydra.runtime.cwd")
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    try:
        return run_job(hydra_context=context, task_function=task_function, config=sweep_config,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    finally:
        os.chdir(here)


def _job_return(ref, context: HydraContext, sweep_config: DictConfig, overrides: Sequence[str]) -> JobReturn:
    try:
        return ray.get(ref)
    except Exception as error:  # noqa: BLE001 - any way of not getting a JobReturn is this job's failure
        return _lost_job(context, sweep_config, overrides, error)


def _lost_job(context: HydraContext, sweep_config: DictConfig, overrides: Sequence[str],
              error: BaseException) -> JobReturn:
    """A FAILED JobReturn for a task that returned none (worker died, killed, unpicklable...).

    The job's own process could not tell the callbacks that it ended, so ``on_job_end`` is
    called here, with the job's config and output folder as ``run_job`` would have set them.
    """
    previous = HydraConfig.instance().cfg
    try:
        HydraConfig.instance().set_config(sweep_config)
        output_dir = os.path.join(str(sweep_config.hydra.sweep.dir), str(sweep_config.hydra.sweep.subdir))
        with read_write(sweep_config.hydra.runtime), open_dict(sweep_config.hydra.runtime):
            sweep_config.hydra.runtime.output_dir = os.path.abspath(output_dir)
        HydraConfig.instance().set_config(sweep_config)
        task_cfg = copy.deepcopy(sweep_config)
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
        ret = JobReturn(overrides=list(overrides), cfg=task_cfg,
                        hydra_cfg=copy.deepcopy(HydraConfig.instance().cfg), working_dir=os.getcwd(),
                        task_name=JobRuntime.instance().get("name"), status=JobStatus.FAILED)
        ret.return_value = error
        context.callbacks.on_job_end(config=sweep_config, job_return=ret)
        return ret
    finally:
        HydraConfig.instance().cfg = previous


def _log_end(idx: int, ret: JobReturn, elapsed: float) -> None:
    if ret.status == JobStatus.COMPLETED:
        log.info("#%d completed (%.1f s into the sweep)", idx, elapsed)
    else:
        error = ret._return_value  # not .return_value: that raises it
        log.error("#%d FAILED (%.1f s into the sweep): %s: %s", idx, elapsed, type(error).__name__, error)
