"""Read an offline W&B run (``offline-run-*/run-<id>.wandb``) without W&B's service.

``wandb`` writes every run, online or offline, as a transaction log: a 7-byte file header
(``:W&B``, the magic ``0xBEE1`` little-endian, a version byte) followed by LevelDB-style log
blocks of 32 KiB. Each chunk in a block has a 7-byte header (CRC32-C: 4 bytes, length: 2 bytes
little-endian, type: 1 byte; FULL=1, FIRST=2, MIDDLE=3, LAST=4); a record too large for the
rest of a block continues in FIRST/MIDDLE/LAST chunks; a block tail shorter than a chunk header
is zero padding. Each reassembled payload is a ``wandb_internal_pb2.Record`` protobuf.

wandb 0.31 no longer ships a Python reader (its datastore moved into the Go ``wandb-core``), so
this small one lets ``dashboards/report.py`` show runs that only have W&B files. CRCs are not
checked: a run killed mid-write ends in a truncated chunk, which is simply dropped.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

FILE_HEADER = struct.Struct("<4sHB")  # b":W&B", 0xBEE1, version
MAGIC = (b":W&B", 0xBEE1)
BLOCK = 32 * 1024
CHUNK_HEADER = struct.Struct("<IHB")  # crc32c, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class OfflineRunError(ValueError):
    """A file that is not a W&B transaction log."""


def iter_payloads(data: bytes) -> list[bytes]:
    """The record payloads of a ``.wandb`` file's bytes, in write order.

    Raises OfflineRunError when the file header is not W&B's. A truncated or malformed tail
    (a run killed mid-write) ends the list instead of raising.
    """
    if len(data) < FILE_HEADER.size:
        raise OfflineRunError("too short for a W&B file header")
    ident, magic, _version = FILE_HEADER.unpack_from(data)
    if (ident, magic) != MAGIC:
        raise OfflineRunError("not a W&B transaction log (bad file header)")
    payloads: list[bytes] = []
    pending: list[bytes] = []
    pos = FILE_HEADER.size
    while pos < len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER.size:  # zero padding at the end of a block
            pos += left_in_block
            continue
        if pos + CHUNK_HEADER.size > len(data):
            break
        _crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        start = pos + CHUNK_HEADER.size
        if kind == 0 and length == 0:  # pre-allocated zeros after the last record
            break
        if start + length > len(data) or kind not in (FULL, FIRST, MIDDLE, LAST):
            break
        chunk = data[start:start + length]
        pos = start + length
        if kind == FULL:
            payloads.append(chunk)
            pending = []
        elif kind == FIRST:
            pending = [chunk]
        elif kind == MIDDLE and pending:
            pending.append(chunk)
        elif kind == LAST and pending:
            payloads.append(b"".join(pending + [chunk]))
            pending = []
    return payloads


def _item_key(item: Any) -> str:
    """``a/b`` for a flat key, ``a.b`` for a nested one (how W&B names nested config keys)."""
    return ".".join(item.nested_key) if item.nested_key else item.key


def _history_value(item: Any) -> Any:
    """The value of a HistoryItem: typed fields (wandb-core) or ``value_json`` (legacy)."""
    which = item.WhichOneof("value") if hasattr(item, "WhichOneof") else None
    if which in ("boolean", "integer", "number", "text"):
        return getattr(item, which)
    if which == "none":
        return None
    if which == "json":
        return json.loads(item.json)
    return json.loads(item.value_json) if item.value_json else None


def _config_value(value_json: str) -> Any:
    """W&B wraps config values as ``{"value": v, "desc": ...}``; keep ``v``."""
    value = json.loads(value_json) if value_json else None
    if isinstance(value, dict) and set(value) <= {"value", "desc"} and "value" in value:
        return value["value"]
    return value


def drop_media(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` without media entries: wandb-core flattens an image or table into nested
    keys (``samples._type``, ``samples.width``, ``samples.filenames``...) beside the scalars."""
    media = {k[: -len("._type")] for k in values if k.endswith("._type")}
    return {k: v for k, v in values.items()
            if k not in media and not any(k.startswith(m + ".") for m in media)}


def read_offline_run(path: str | Path) -> dict[str, Any]:
    """What an offline run recorded: identity, config, history and summary.

    path: an ``offline-run-*`` folder or its ``run-<id>.wandb`` file.
    Returns ``{"path", "run": {id, name, project, group, job_type}, "config": {key: value},
    "history": [{"_step": int, key: scalar, ...}, ...] in step order (rows sharing a step
    merged; media entries left out, see :func:`drop_media`), "summary": {key: value}}``.
    Raises FileNotFoundError when there is no ``.wandb`` file, OfflineRunError when it is not
    one.
    """
    from wandb.proto import wandb_internal_pb2 as pb  # deferred: protobuf import is ~0.3 s

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.wandb"))
    if not files:
        raise FileNotFoundError(f"no .wandb file in {path}")
    run: dict[str, Any] = {}
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    by_step: dict[int, dict[str, Any]] = {}
    for payload in iter_payloads(files[0].read_bytes()):
        record = pb.Record()
        try:
            record.ParseFromString(payload)
        except Exception:  # a chunk cut by a crash: the rest of the log is unusable
            break
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run = {"id": r.run_id, "name": r.display_name, "project": r.project,
                   "group": r.run_group, "job_type": r.job_type}
            for item in r.config.update:
                config[_item_key(item)] = _config_value(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                config[_item_key(item)] = _config_value(item.value_json)
        elif kind == "history":
            row = {}
            for item in record.history.item:
                value = _history_value(item)
                if not isinstance(value, (dict, list)):  # media and tables are dicts
                    row[_item_key(item)] = value
            row = drop_media(row)
            step = row.get("_step", record.history.step.num)
            by_step.setdefault(int(step), {}).update(row, _step=int(step))
        elif kind == "summary":
            for item in record.summary.update:
                value = json.loads(item.value_json) if item.value_json else None
                summary[_item_key(item)] = value
    config.pop("_wandb", None)  # W&B's own bookkeeping, not the job's configuration
    history = [by_step[s] for s in sorted(by_step)]
    return {"path": str(path), "run": run, "config": config, "history": history,
            "summary": drop_media(summary)}
