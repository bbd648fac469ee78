"""The machine a benchmark ran on, recorded in every results/*.json (imported by the scripts
beside it: `python benchmarks/<script>.py` puts this folder on sys.path)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe(packages: tuple[str, ...] = ("torch",), **extra: Any) -> dict[str, Any]:
    """CPU, cores, load average at start (a busy machine skews timings), Python and package
    versions, torch threads and the GPU when there is one; ``extra`` overrides or adds fields."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "cores_allowed": len(os.sched_getaffinity(0)),
        "platform": platform.platform(), "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    info |= {name: metadata.version(name) for name in packages}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info | extra
