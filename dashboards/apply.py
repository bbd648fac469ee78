"""Create or update the W&B workspaces and reports of dashboards/definitions.py.

    export WANDB_API_KEY=...                      # https://wandb.ai/authorize
    python dashboards/apply.py --entity my-team   # project mvdream-platform, all six objects
    python dashboards/apply.py --entity my-team --sweep-group first-sweep \
        --tune-conf conf/tune/reference.yaml --only sweeps-report
    python dashboards/apply.py --entity my-team --dry-run   # the objects as JSON, no network

Idempotent: the id of every saved object is recorded in a state file (``dashboards/state.json``
by default, ``--state`` to choose), per ``entity/project``; a later run puts the recorded id
back into the object before saving, so W&B updates that report or workspace view in place
instead of creating another one (same URL, same share links). ``--forget NAME`` drops a
recorded id (e.g. after the report was deleted in the W&B app) so the next save creates a new
one. The state file is rewritten after each saved object, so a run that fails half-way still
keeps the ids of what it saved.

The network and ``WANDB_API_KEY`` are needed only when saving: the key is checked before
anything is contacted, and ``--dry-run`` needs neither.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import wandb_workspaces.reports.v2 as wr
from definitions import Target, build_all, describe, sweep_params_from_yaml

API_KEY_ENV = "WANDB_API_KEY"
DEFAULT_STATE = Path(__file__).resolve().with_name("state.json")
STATE_VERSION = 1

# A saver stores one object on W&B (setting its ids) and returns its URL; injected in tests.
Saver = Callable[[Any], "str | None"]


class ApplyError(RuntimeError):
    """Something the user must fix (missing key, unreadable state, a failed save)."""


def require_api_key(environ: Mapping[str, str] = os.environ) -> None:
    """Raise ApplyError unless ``WANDB_API_KEY`` is set (checked before any network call)."""
    if not environ.get(API_KEY_ENV, "").strip():
        raise ApplyError(
            f"{API_KEY_ENV} is not set: saving dashboards needs a W&B API key "
            "(https://wandb.ai/authorize): `export WANDB_API_KEY=...`; or look at the objects "
            "without W&B with --dry-run")


def kind_of(obj: Any) -> str:
    return "report" if isinstance(obj, wr.Report) else "workspace"


def load_state(path: str | Path) -> dict[str, Any]:
    """The state file's content, or an empty state when the file does not exist.

    Format: ``{"version": 1, "targets": {"<entity>/<project>": {"<name>": {"kind", "id",
    ["view_name"], "url", "title", "saved_at"}}}}``. Raises ApplyError for a file that is not
    such JSON (rather than silently starting over and duplicating every report).
    """
    path = Path(path)
    if not path.exists():
        return {"version": STATE_VERSION, "targets": {}}
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ApplyError(f"state file {path} is not readable JSON ({exc}); fix or move it") \
            from exc
    if not isinstance(state, dict) or not isinstance(state.get("targets"), dict):
        raise ApplyError(f"state file {path} has no 'targets' mapping; is it a dashboards "
                         "state file?")
    return state


def write_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write the state atomically (temp file + rename: a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def restore_ids(obj: Any, entry: Mapping[str, Any]) -> None:
    """Put a recorded id back into an unsaved object so that saving updates it in place.

    Report.save() upserts the view with ``id``; Workspace.save() upserts the view with
    ``_internal_id`` and ``_internal_name`` (the ``nw=`` part of its URL).
    """
    if kind_of(obj) == "report":
        obj.id = entry["id"]
    else:
        obj._internal_id = entry["id"]
        obj._internal_name = entry.get("view_name", "")


def saved_ids(obj: Any) -> dict[str, str]:
    """The ids a saved object carries: ``{"id"}`` (+ ``"view_name"`` for a workspace)."""
    if kind_of(obj) == "report":
        return {"id": obj.id}
    return {"id": obj._internal_id, "view_name": obj._internal_name}


def save_to_wandb(obj: Any) -> str | None:
    """The real saver: upsert on the W&B server, return the object's URL."""
    obj.save()
    return obj.url


def apply(objects: Mapping[str, Any], target: Target, state_path: str | Path,
          saver: Saver = save_to_wandb, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Save every object, reusing the ids recorded for ``target`` in the state file.

    objects: name -> Workspace or Report (from :func:`definitions.build_all`).
    Returns the target's state entries after saving (name -> kind, id, url, ...).
    Raises ApplyError when a save fails (the state keeps every id saved before it) or when a
    recorded entry is of another kind than the object of that name.
    """
    state = load_state(state_path)
    key = f"{target.entity}/{target.project}"
    entries = state["targets"].setdefault(key, {})
    for name, obj in objects.items():
        kind = kind_of(obj)
        entry = entries.get(name)
        if entry is not None:
            if entry.get("kind") != kind or not entry.get("id"):
                raise ApplyError(f"state file {state_path}: entry {key} {name} is not a saved "
                                 f"{kind}; remove it with --forget {name}")
            restore_ids(obj, entry)
        try:
            url = saver(obj)
        except Exception as exc:
            hint = (f" (the recorded {kind} {entry['id']} may have been deleted in W&B: "
                    f"rerun with --forget {name} to create a new one)") if entry else ""
            raise ApplyError(f"saving {name} to {key} failed: {type(exc).__name__}: "
                             f"{exc}{hint}") from exc
        ids = saved_ids(obj)
        if not ids["id"]:
            raise ApplyError(f"saving {name}: W&B returned no id")
        title = obj.title if kind == "report" else obj.name
        entries[name] = {"kind": kind, **ids, "url": url, "title": title,
                         "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_state(state_path, state)
        verb = "updated" if entry is not None else "created"
        log(f"{verb} {kind} {name}: {url or ids['id']}")
    return dict(entries)


def forget(names: list[str], target: Target, state_path: str | Path) -> list[str]:
    """Drop the recorded ids of ``names`` for ``target``; returns the names that were there."""
    state = load_state(state_path)
    entries = state["targets"].get(f"{target.entity}/{target.project}", {})
    dropped = [n for n in names if entries.pop(n, None) is not None]
    if dropped:
        write_state(state_path, state)
    return dropped


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dashboards/apply.py",
        description="Create or update the W&B workspaces and reports (idempotent).")
    parser.add_argument("--entity", required=True, help="W&B entity (user or team)")
    parser.add_argument("--project", default="mvdream-platform",
                        help="W&B project our jobs log to (default: %(default)s)")
    parser.add_argument("--state", default=str(DEFAULT_STATE),
                        help="state file with the saved ids (default: dashboards/state.json)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the objects as JSON; no network, no API key")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="save only these objects (e.g. sweeps-report)")
    parser.add_argument("--forget", nargs="+", metavar="NAME", default=[],
                        help="drop these recorded ids first, so they are created anew")
    parser.add_argument("--train-group", help="only training runs of this W&B group")
    parser.add_argument("--sweep-group", help="only the trials of this sweep (its name)")
    parser.add_argument("--serve-group", help="only this Serve app's replicas (serve-<app>)")
    parser.add_argument("--tune-conf", default=None,
                        help="conf/tune/*.yaml of the sweep: swept parameters and objective "
                             "(default: those of conf/tune/tiny.yaml)")
    return parser.parse_args(argv)


def build_target(args: argparse.Namespace) -> Target:
    extra: dict[str, Any] = {}
    if args.tune_conf:
        params, metric = sweep_params_from_yaml(args.tune_conf)
        extra = {"sweep_params": params, "sweep_metric": metric}
    return Target(entity=args.entity, project=args.project, train_group=args.train_group,
                  sweep_group=args.sweep_group, serve_group=args.serve_group, **extra)


def main(argv: list[str] | None = None, saver: Saver = save_to_wandb,
         environ: Mapping[str, str] = os.environ) -> int:
    """The command line; returns the exit status (0 ok, 2 a problem the message explains)."""
    args = parse_args(argv)
    try:
        target = build_target(args)
        objects = build_all(target)
        if args.only:
            unknown = sorted(set(args.only) - set(objects))
            if unknown:
                raise ApplyError(f"--only: unknown {unknown}; known: {sorted(objects)}")
            objects = {n: o for n, o in objects.items() if n in args.only}
        if args.dry_run:
            recorded = load_state(args.state)["targets"].get(f"{args.entity}/{args.project}", {})
            print(json.dumps({"target": f"{args.entity}/{args.project}",
                              "objects": {n: {"recorded": recorded.get(n), **describe(o)}
                                          for n, o in objects.items()}}, indent=2))
            return 0
        require_api_key(environ)
        if args.forget:
            dropped = forget(args.forget, target, args.state)
            print(f"forgot {dropped or 'nothing'}")
        apply(objects, target, args.state, saver=saver)
    except (ApplyError, ValueError, OSError) as exc:
        print(f"dashboards/apply.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
