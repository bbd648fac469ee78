"""The Ray cluster a job runs on: joined when ``ray job submit`` named one, else started here."""

from __future__ import annotations

import os

__all__ = ["ensure_ray"]


def ensure_ray(num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Join the cluster named by RAY_ADDRESS (``ray job submit`` sets it) or start a local one
    with ``num_cpus`` CPUs (None: all); nothing when this process is connected already."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
