"""Serving metrics: windows of request latency, batch size and job-queue depth, logged through
:mod:`mvdream_platform.tracking` (W&B + ``metrics.jsonl``) by each ingress replica.

Logged keys per window (step = window index since the replica started):
``requests``, ``requests_per_s``, ``latency_p50_s``, ``latency_p95_s``, ``latency_max_s``,
``mean_batch_size``, ``max_batch_size``, ``views_per_s``, ``jobs_submitted``, ``active_jobs``
(queued or running in the queue), ``errors`` (4xx/5xx responses).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of a non-empty list (q in [0, 1])."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class MetricsWindow:
    """Counters of one logging window (the ingress's event loop is the only writer)."""

    started: float = field(default_factory=time.time)
    latencies: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    views: int = 0
    jobs_submitted: int = 0
    errors: int = 0

    def request(self, seconds: float, batch_sizes: list[int], views: int) -> None:
        self.latencies.append(seconds)
        self.batch_sizes.extend(batch_sizes)
        self.views += views

    def summary(self, active_jobs: int | None) -> dict[str, Any]:
        elapsed = max(time.time() - self.started, 1e-9)
        out: dict[str, Any] = {"requests": len(self.latencies),
                               "requests_per_s": round(len(self.latencies) / elapsed, 4),
                               "views_per_s": round(self.views / elapsed, 4),
                               "jobs_submitted": self.jobs_submitted, "errors": self.errors}
        if self.latencies:
            out |= {"latency_p50_s": round(percentile(self.latencies, 0.5), 4),
                    "latency_p95_s": round(percentile(self.latencies, 0.95), 4),
                    "latency_max_s": round(max(self.latencies), 4)}
        if self.batch_sizes:
            out |= {"mean_batch_size": round(statistics.mean(self.batch_sizes), 3),
                    "max_batch_size": max(self.batch_sizes)}
        if active_jobs is not None:
            out["active_jobs"] = active_jobs
        return out
