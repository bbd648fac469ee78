"""How many CPU threads torch may use, decided once per process and said out loud.

Torch's default (one intra-op thread per visible core) oversubscribes a machine that other
work shares, and 2-thread OpenMP work slows many-fold when it does: give each job, Tune trial
and Serve replica exactly the cores it was given.

* Inside a Ray task or actor (a Tune trial, a ``hydra/launcher=ray_tasks`` job, a Serve
  replica) that is the CPU count Ray assigned to it;
* elsewhere, the cores this process may run on (its CPU affinity mask, which ``taskset``,
  cgroups' cpusets and container limits set), not the machine's core count.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

log = logging.getLogger(__name__)

__all__ = ["cpus_available", "set_torch_threads"]


def _ray_assigned_cpus() -> float | None:
    """The CPUs Ray assigned to this task/actor, or None outside one (Ray not imported, the
    driver, or no CPU in the assignment)."""
    ray = sys.modules.get("ray")  # never import Ray just to ask
    if ray is None or not ray.is_initialized():
        return None
    try:
        context = ray.get_runtime_context()
        if context.worker.mode != ray.WORKER_MODE:
            return None  # the driver: nothing was assigned to it
        cpus = context.get_assigned_resources().get("CPU")
    except Exception:  # an older/newer runtime context API: fall back to the affinity mask
        return None
    return float(cpus) if cpus else None


def cpus_available() -> tuple[int, str]:
    """(number of cores this process should use, where that number comes from)."""
    assigned = _ray_assigned_cpus()
    if assigned is not None:
        return max(1, int(assigned)), "the CPUs Ray assigned to this task"
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0))), "the cores this process may run on"
    return max(1, os.cpu_count() or 1), "the machine's cores"


def set_torch_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads to ``requested`` (None: :func:`cpus_available`), log the
    choice and return it.

    Raises:
        ValueError: ``requested`` is not None or a positive integer.
    """
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int)
                                  or requested < 1):
        raise ValueError(f"threads must be null (the cores available) or an integer >= 1, got {requested!r}")
    if requested is None:
        threads, source = cpus_available()
    else:
        threads, source = requested, "threads= as given"
    torch.set_num_threads(threads)
    log.info("torch uses %d CPU thread%s (%s)", threads, "" if threads == 1 else "s", source)
    return threads
