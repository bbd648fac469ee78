"""File I/O through fsspec: local paths and any URL fsspec knows (memory://, s3://, gs://, ...).

Every job reads and writes through these few functions so that a local folder and an object
store behave the same. Writes are atomic: a reader never sees a half-written file or folder
(write to a temporary name, then rename; on stores without rename, the "commit" is the last
file written, see :func:`put_dir`).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs


def is_local(uri: str | os.PathLike) -> bool:
    """True for plain paths and ``file://`` URLs."""
    uri = os.fspath(uri)
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str | os.PathLike) -> str:
    """A local filesystem path for a local ``uri`` (``file://`` stripped)."""
    uri = os.fspath(uri)
    if not is_local(uri):
        raise ValueError(f"not a local path: {uri!r}")
    return uri[len("file://") :] if uri.startswith("file://") else uri


def absolute(uri: str | os.PathLike | None) -> str | None:
    """A local relative path made absolute against this process's working directory (Ray
    workers, Tune trials and Serve replicas run elsewhere); URIs, absolute paths and None as
    they are."""
    if not uri or not is_local(uri):
        return None if uri is None else os.fspath(uri)
    return os.path.abspath(local_path(uri))


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a path or URL with ``/``."""
    out = os.fspath(uri).rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def exists(uri: str | os.PathLike) -> bool:
    fs, path = url_to_fs(os.fspath(uri))
    return fs.exists(path)


def is_dir(uri: str | os.PathLike) -> bool:
    fs, path = url_to_fs(os.fspath(uri))
    return fs.isdir(path)


def remove(uri: str | os.PathLike, missing_ok: bool = True) -> None:
    """Delete one file (no error when it is already gone, unless ``missing_ok`` is False)."""
    fs, path = url_to_fs(os.fspath(uri))
    try:
        fs.rm(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def remove_tree(uri: str | os.PathLike) -> None:
    """Delete a folder and everything in it (nothing when it is already gone)."""
    fs, path = url_to_fs(os.fspath(uri))
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def listdir(uri: str | os.PathLike) -> list[str]:
    """Names (not paths) of the entries directly inside the folder ``uri``; [] when it is absent."""
    fs, path = url_to_fs(os.fspath(uri))
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(os.fspath(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)


def makedirs(uri: str | os.PathLike) -> None:
    fs, path = url_to_fs(os.fspath(uri))
    fs.makedirs(path, exist_ok=True)


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically (temp name in the same folder, then move)."""
    uri = os.fspath(uri)
    fs, path = url_to_fs(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def encode_png(array) -> bytes:
    """(H, W, 3|4) uint8 array -> PNG file bytes."""
    import PIL.Image

    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def read_bytes(uri: str | os.PathLike) -> bytes:
    with fsspec.open(os.fspath(uri), "rb") as f:
        return f.read()


def jsonable(value: Any, strict: bool = False) -> Any:
    """``value`` as JSON types: mappings (keys as strings), lists, numbers, strings, None.

    Tuples become lists; arrays and tensors their ``tolist()``; numpy/torch scalars their
    ``item()``. Anything else becomes ``str(value)``, or raises ``TypeError`` when ``strict``
    (records that must load back exactly, such as a checkpoint's ``state.json``).
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "items"):  # dicts and other mappings
        return {str(k): jsonable(v, strict) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, strict) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return value.tolist()
    if strict:
        raise TypeError(f"cannot store {type(value).__name__} as JSON")
    return str(value)


def write_json(uri: str | os.PathLike, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(uri: str | os.PathLike) -> Any:
    return json.loads(read_bytes(uri).decode())


def write_text(uri: str | os.PathLike, text: str) -> None:
    write_bytes(uri, text.encode())


def put_dir(local_dir: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy a finished local folder to ``uri`` so that it appears complete or not at all.

    Local target: copy to a temporary sibling, then one rename. Remote target: upload every
    file; ``model_index.json``/``config.json`` files at the top go last, so a loader that keys on
    them never sees a folder whose weights are still uploading.
    """
    local_dir, uri = Path(local_dir), os.fspath(uri)
    if is_local(uri):
        target = Path(local_path(uri))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        shutil.copytree(local_dir, tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        return
    fs, root = url_to_fs(uri)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    last = {"model_index.json", "config.json"}
    files.sort(key=lambda p: (p.parent == local_dir and p.name in last, str(p)))
    for file in files:
        rel = file.relative_to(local_dir).as_posix()
        dest = f"{root.rstrip('/')}/{rel}"
        fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(file), dest)


def get_dir(uri: str | os.PathLike, cache_root: str | os.PathLike | None = None) -> str:
    """A local folder with the content of ``uri``: the path itself when local, else a download.

    Remote folders are copied into ``cache_root`` (default: a fresh temporary folder).
    """
    uri = os.fspath(uri)
    if is_local(uri):
        path = local_path(uri)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no such folder: {path!r}")
        return path
    fs, root = url_to_fs(uri)
    if not fs.isdir(root):
        raise FileNotFoundError(f"no such folder: {uri!r}")
    dest = Path(tempfile.mkdtemp(prefix="mvdream-", dir=cache_root))
    root = root.rstrip("/")
    for remote in fs.find(root):
        rel = remote[len(root) :].lstrip("/")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(target))
    return str(dest)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/>])/(?:[\w.@+-]+/)+([\w.@+-]*)")


def redact_paths(text: str, *roots: str | os.PathLike) -> str:
    """``text`` fit for someone who should not learn this machine's layout (an HTTP client):
    each of ``roots`` becomes ``<storage>``, any other absolute path its last part."""
    for root in sorted((os.fspath(r).rstrip("/") for r in roots if r), key=len, reverse=True):
        text = text.replace(root, "<storage>")
    return _ABSOLUTE_PATH.sub(lambda m: m.group(1) or "<path>", text)
