"""One sweep trial = one text-to-3D run (:func:`~mvdream_platform.sds.pipeline.run_text_to_3d`)
that reports to Ray Tune as it goes.

The trial's settings are the sweep's job-shaped base (``run``: prompt, seed, steps, guidance,
guidance_scale, sds, device: what ``jobs/text_to_3d.py`` composes) with the sampled parameters
set into it (:func:`~mvdream_platform.tune.space.apply_overrides`), so the best trial is a
text-to-3D job config as it stands.

Reports (``ray.tune.report``), from ``run_text_to_3d``'s ``on_log`` hook after every logged
window: the window's training scalars (``step`` is Tune's time attribute), the objective
(:class:`~mvdream_platform.tune.objective.PriorScore` on the last committed checkpoint, every
``objective.every`` steps, carried forward in between with ``objective_step`` saying when it
was measured), and a ``ray.tune.Checkpoint`` of ``out/checkpoints`` whenever the run committed
one. The last window is reported once the run has exported its assets, together with the
ground-truth scores (``gt_*``, procedural prompts only) and ``done_steps``; so a scheduler stop
at ``max_t`` never cuts the export short.

Everything a trial writes lands in ``<sweep>/trials/<trial_id>/`` (the run's assets,
metrics.json, checkpoints, tracking/, ``run.json`` with its settings and ``attempts.jsonl``, one
line per start: a resumed trial shows two).
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import storage
from ..sds.checkpoint import read_latest
from ..sds.config import TextTo3DSettings
from ..sds.optimize import CHECKPOINTS
from .objective import ClipScore, ObjectiveConfig, PriorScore
from .space import SearchSpace, apply_overrides

log = logging.getLogger(__name__)

TRIALS = "trials"
RUN_RECORD = "run.json"
ATTEMPTS = "attempts.jsonl"


@dataclass
class TrialSpec:
    """What every trial of a sweep shares (everything but its sampled parameters).

    Attributes:
        sweep_dir: the sweep folder (absolute path or URI); trials write under ``trials/``.
        name: the sweep's name (W&B run names).
        run: the job-shaped base settings (``prompt``, ``seed``, ``steps``, ``guidance``,
            ``guidance_scale``, ``sds`` as a nested dict, ``device``).
        model: ModelConfig fields of the prior (paths absolute: workers have other cwds).
        space: the search space (named negative prompts).
        objective: how trials are scored.
        logger_mode, logger_project, group: W&B (one group per sweep, one run per trial).
    """

    sweep_dir: str
    name: str
    run: dict[str, Any]
    model: dict[str, Any]
    space: SearchSpace
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    logger_mode: str = "offline"
    logger_project: str = "mvdream-platform"
    group: str | None = None


def trial_run(spec: TrialSpec, sampled: dict[str, Any]) -> dict[str, Any]:
    """The job-shaped settings of the trial with these sampled parameters."""
    return apply_overrides(spec.run, spec.space.overrides(sampled))


def trial_dir(sweep_dir: str, trial_id: str) -> str:
    return storage.join(sweep_dir, TRIALS, trial_id)


# One pipeline per worker process and model (actors are reused across trials).
_PIPELINES: dict[str, Any] = {}
_CLIP: dict[str, ClipScore] = {}


def cached_pipeline(model: dict[str, Any], device: torch.device):
    from ..pipelines.loading import ModelConfig, build_pipeline

    key = json.dumps(model, sort_keys=True, default=str) + str(device)
    if key not in _PIPELINES:
        _PIPELINES.clear()  # one model at a time: a reused actor must not hoard GPU memory
        pipe = build_pipeline(ModelConfig(**model), device=device)
        pipe.set_progress_bar_config(disable=True)
        _PIPELINES[key] = pipe
    return _PIPELINES[key]


def _restore_tune_checkpoint(folder: str) -> int | None:
    """If Tune restored this trial with a checkpoint newer than ``folder``'s, copy it in."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None or not storage.is_local(folder):
        return None
    with checkpoint.as_directory() as local:
        theirs = read_latest(local)
        ours = read_latest(folder)
        if theirs is None or (ours is not None and ours["step"] >= theirs["step"]):
            return None
        checkpoint.to_directory(storage.local_path(folder))
        return int(theirs["step"])


def run_trial(sampled: dict[str, Any], spec: TrialSpec) -> None:
    """The Ray Tune trainable (wrap with ``tune.with_parameters(run_trial, spec=...)``)."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    out = trial_dir(spec.sweep_dir, trial_id)

    def report(metrics: dict[str, Any], checkpoint_folder: str | None) -> None:
        tune.report(metrics, checkpoint=_checkpoint(checkpoint_folder))

    restored = _restore_tune_checkpoint(storage.join(out, CHECKPOINTS))
    execute_trial(spec, sampled, trial_id, report, restored_from=restored)


def execute_trial(spec: TrialSpec, sampled: dict[str, Any], trial_id: str,
                  report: Callable[[dict[str, Any], str | None], None],
                  restored_from: int | None = None) -> dict[str, Any]:
    """One trial's work without Ray: the run, its scores and ``report(metrics, checkpoint)``
    calls (Tune's in :func:`run_trial`; a no-op for a direct comparison). Returns the final
    report."""
    from ..evaluation.text_to_3d import ProceduralScorer, headline
    from ..pipelines.loading import pick_device
    from ..sds.pipeline import run_text_to_3d
    from ..threads import set_torch_threads
    from ..tracking import start_tracking, tracking_dir

    set_torch_threads(None)  # a Tune trial: exactly the CPUs its resources gave it
    run = trial_run(spec, sampled)
    sds = TextTo3DSettings.of_run(run).config()  # a bad value raises here: the trial errors, the sweep goes on
    out = trial_dir(spec.sweep_dir, trial_id)
    folder = storage.join(out, CHECKPOINTS)
    storage.write_json(storage.join(out, RUN_RECORD),
                       {"trial_id": trial_id, "sweep": spec.name, "params": dict(sampled), "run": run})
    _append_line(storage.join(out, ATTEMPTS), {"time": time.time(), "restored_from_tune_checkpoint": restored_from,
                                                "resumes_from_step": (read_latest(folder) or {}).get("step", 0)})

    device = pick_device(run.get("device", "auto"))
    pipe = cached_pipeline(spec.model, device)
    objective = spec.objective
    scorer = PriorScore(pipe, sds, run["prompt"], objective, seed=run["seed"], device=device)
    clip = None
    if objective.clip_model:
        if objective.clip_model not in _CLIP:
            _CLIP[objective.clip_model] = ClipScore(objective.clip_model, device)
        clip = _CLIP[objective.clip_model]
    every = objective.every or sds.checkpoint_every

    def measure(at: str) -> dict[str, float]:
        if read_latest(at) is None:  # nothing committed yet: the step-0 field, scored already
            step, scores = 0, dict(scorer.initial)
        else:
            step, scores = scorer.score_checkpoint(at)
        if clip is not None:
            scores["clip_score"] = clip(scorer.renders(scorer.scene, objective.clip_resolution), run["prompt"])
        return scores | {"objective_step": step}

    latest = measure(folder)  # step 0 (or the resumed checkpoint): every report has the metric
    pending: dict[str, Any] = {}

    def on_log(metrics: dict[str, float], checkpoint_folder: str | None) -> None:
        nonlocal latest
        step = int(metrics["step"])
        if checkpoint_folder is not None and (step % every == 0 or step == sds.steps):
            latest = measure(checkpoint_folder)
        values = {**metrics, **latest}
        if step >= sds.steps:  # the last window waits for the assets and ground truth
            pending.update(report=values, checkpoint=checkpoint_folder)
            return
        report(values, checkpoint_folder)

    tracker = start_tracking(
        mode=spec.logger_mode, project=spec.logger_project, run_name=f"{spec.name}-{trial_id}",
        group=spec.group or spec.name, config={"params": dict(sampled), **run},
        dir=tracking_dir(out, spec.name, trial_id),
        job_type="tune_trial", resume_id=f"tune-{zlib.crc32(spec.sweep_dir.encode()):08x}-{trial_id}")
    exit_code = 1
    try:
        result = run_text_to_3d(run["prompt"], pipe, sds, out, seed=run["seed"], device=device,
                                tracker=tracker, progress=False, on_log=on_log,
                                scorer=ProceduralScorer() if run.get("score", True) else None)
        final = pending.get("report") or {**(result.final or {}), **measure(folder)}
        final = {**final, "step": sds.steps, "done_steps": sds.steps, "total_seconds": result.total_seconds}
        if result.quality is not None:
            scores = headline(result.quality)
            final |= {"gt_iou": scores["iou"], "gt_iou_raw": scores["iou_raw"],
                      "gt_colour_accuracy": scores["colour_accuracy"], "gt_volume_iou": scores["volume_iou"]}
            if "janus_free" in scores:
                final["gt_janus_free"] = float(scores["janus_free"])
        tracker.summary({k: v for k, v in final.items() if isinstance(v, (int, float))})
        exit_code = 0
        report(final, pending.get("checkpoint") or folder)
        return final
    except SystemExit:  # Tune stopped the trial (a scheduler decision), not a failure
        if exit_code:  # before the end (ASHA's stop at max_t comes with the final report)
            tracker.summary({"stopped_early": True})
            exit_code = 0
        raise
    finally:
        tracker.finish(exit_code=exit_code)


def _checkpoint(folder: str | None):
    from ray import tune

    if folder is None or not storage.exists(storage.join(folder, "latest.json")):
        return None
    return tune.Checkpoint.from_directory(storage.local_path(folder)) if storage.is_local(folder) \
        else tune.Checkpoint(folder)


def _append_line(uri: str, record: dict[str, Any]) -> None:
    line = json.dumps(record) + "\n"
    if storage.is_local(uri):
        path = storage.local_path(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
    else:  # object stores cannot append: rewrite
        previous = storage.read_bytes(uri).decode() if storage.exists(uri) else ""
        storage.write_bytes(uri, (previous + line).encode())
