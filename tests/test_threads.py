"""Torch's CPU threads: the cores a process was given, or the CPUs Ray assigned to its task."""

from __future__ import annotations

import os

import pytest
import torch

from mvdream_platform.threads import cpus_available, set_torch_threads

from conftest import shutdown_ray


def test_outside_ray_the_affinity_mask_decides_and_a_number_wins():
    before = torch.get_num_threads()
    try:
        n, source = cpus_available()
        assert n == len(os.sched_getaffinity(0)) and "may run on" in source
        assert set_torch_threads(None) == n == torch.get_num_threads()
        assert set_torch_threads(1) == 1 == torch.get_num_threads()
        for bad in (0, -2, 1.5, True, "2"):
            with pytest.raises(ValueError, match="threads must be"):
                set_torch_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_a_ray_task_uses_the_cpus_it_was_assigned():
    import ray

    from mvdream_platform.cluster import ensure_ray

    started_here = not ray.is_initialized()
    ensure_ray()
    try:
        if ray.cluster_resources().get("CPU", 0) < 1:
            pytest.skip("the local Ray cluster has no CPU to assign")

        @ray.remote(num_cpus=1)
        def threads_in_task() -> tuple[int, str, int]:
            from mvdream_platform.threads import cpus_available, set_torch_threads

            n, source = cpus_available()
            return n, source, set_torch_threads(None)

        n, source, threads = ray.get(threads_in_task.remote(), timeout=120)
        assert (n, threads) == (1, 1) and "Ray assigned" in source
        assert cpus_available()[1] != "the CPUs Ray assigned to this task"  # the driver is not a task
    finally:
        if started_here:  # later tests start Ray with their own settings
            shutdown_ray()
