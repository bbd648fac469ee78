"""A simulated object store for benchmarks: local files behind a fixed latency per request.

``slow:///abs/path`` reads ``/abs/path`` the way s3fs / gcsfs read an object: every metadata
call (``info``, ``ls``: a HEAD or LIST) and every ranged read of an open file (a GET of one
block; fsspec's read-ahead cache, 5 MiB blocks as s3fs) first waits ``LATENCY_S`` seconds
(environment ``MVDREAM_STORE_LATENCY_MS``, default 20 ms: a same-region S3 GET's first byte).
Bandwidth is the local disk's, so only the per-request cost is simulated, which is what
separates one-file-per-view folders from row-group shards.

Register it in every process that reads (:func:`register`; a Ray ``worker_process_setup_hook``
for Ray workers, inherited by forked DataLoader workers).
"""

from __future__ import annotations

import os
import time

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractBufferedFile

PROTOCOL = "slow"
BLOCK_SIZE = 5 * 2**20


def latency_s() -> float:
    return float(os.environ.get("MVDREAM_STORE_LATENCY_MS", "20")) / 1000.0


class _RemoteFile(AbstractBufferedFile):
    """A read-only file whose every block fetch is one request."""

    def _fetch_range(self, start: int, end: int) -> bytes:
        time.sleep(latency_s())
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(end - start)


class LatencyFileSystem(LocalFileSystem):
    protocol = PROTOCOL
    root_marker = "/"

    @classmethod
    def _strip_protocol(cls, path):
        path = fsspec.utils.stringify_path(path)
        if isinstance(path, str) and path.startswith(PROTOCOL + "://"):
            path = path[len(PROTOCOL) + 3:]
        return super()._strip_protocol(path)

    def unstrip_protocol(self, name: str) -> str:
        return f"{PROTOCOL}://{self._strip_protocol(name)}"

    def info(self, path, **kwargs):
        time.sleep(latency_s())
        return super().info(path, **kwargs)

    def ls(self, path, detail=False, **kwargs):
        time.sleep(latency_s())
        return super().ls(path, detail=detail, **kwargs)

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        if "r" not in mode:  # writes go to the disk directly (benchmarks prepare data locally)
            return super()._open(path, mode=mode, block_size=block_size, autocommit=autocommit, **kwargs)
        return _RemoteFile(self, self._strip_protocol(path), mode=mode, block_size=block_size or BLOCK_SIZE,
                           cache_type="readahead", cache_options=cache_options)


def register() -> None:
    """Make ``slow://`` known to fsspec in this process (idempotent)."""
    fsspec.register_implementation(PROTOCOL, LatencyFileSystem, clobber=True)


def to_slow(path: str | os.PathLike) -> str:
    """``/abs/path`` -> ``slow:///abs/path``."""
    return f"{PROTOCOL}://{os.path.abspath(os.fspath(path))}"
