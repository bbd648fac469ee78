"""Measure DDP's gradient all-reduce: a communication hook that times every bucket.

DDP overlaps the all-reduce of each gradient bucket with the rest of the backward pass, so the
backward time of a multi-worker step already contains whatever part of the communication was
not hidden. This hook adds the other half of the picture for the step-time breakdown: the wall
time from launching each bucket's all-reduce to its completion, summed over buckets. The
reduction itself is the default one (sum, then divide by the world size), so gradients are
bit-identical to DDP without the hook (a test checks it).
"""

# No ``from __future__ import annotations`` here: DDP inspects the hook's annotations at run
# time and insists on the real dist.GradBucket / Future[Tensor] objects, not strings.
import threading
import time

import torch
import torch.distributed as dist


class AllReduceTimer:
    """Accumulated bucket all-reduce seconds since the last :meth:`take` (thread-safe)."""

    def __init__(self, process_group=None):
        self.process_group = process_group
        self._seconds = 0.0
        self._buckets = 0
        self._lock = threading.Lock()

    def _add(self, seconds: float) -> None:
        with self._lock:
            self._seconds += seconds
            self._buckets += 1

    def take(self) -> tuple[float, int]:
        """(seconds, buckets) accumulated since the previous call; resets both."""
        with self._lock:
            out = (self._seconds, self._buckets)
            self._seconds, self._buckets = 0.0, 0
        return out


def timed_allreduce_hook(timer: AllReduceTimer, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: average ``bucket``'s flat gradient buffer across ranks, timing it."""
    group = timer.process_group if timer.process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    buffer.div_(dist.get_world_size(group))
    start = time.perf_counter()
    future = dist.all_reduce(buffer, group=group, async_op=True).get_future()

    def finished(fut: torch.futures.Future) -> torch.Tensor:
        timer._add(time.perf_counter() - start)
        return fut.value()[0]

    return future.then(finished)


def attach_allreduce_timer(ddp_model: torch.nn.parallel.DistributedDataParallel) -> AllReduceTimer:
    """Register the timing hook on a DDP model (once, before its first backward)."""
    timer = AllReduceTimer(ddp_model.process_group)
    ddp_model.register_comm_hook(timer, timed_allreduce_hook)
    return timer
