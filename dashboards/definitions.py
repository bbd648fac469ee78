"""W&B workspaces and reports as code: training, SDS sweeps and serving.

Everything here only *builds* ``wandb_workspaces`` objects from plain arguments; nothing touches
the network (``dashboards/apply.py`` saves them). The metric keys are the ones our jobs log
through :mod:`mvdream_platform.tracking`:

* training (``jobs/train.py``, W&B ``job_type="train"``, no group): loss, lr, grad_norm,
  images_per_s, samples_per_s, max_rss_mb, the step-time breakdown (data/forward/backward/
  optimizer/allreduce seconds) and the ``samples`` image grids;
* SDS sweeps (``jobs/tune_sds.py``, ``job_type="tune_trial"``, group = the sweep's name): the
  sampled hyper-parameters in the run config (the job-shaped ``run`` dict, so
  ``sds.guidance.recon_std_rescale`` is a nested config key; the negative prompt's set name is
  ``params.negative_prompt``), the objective and ground-truth scores in the run summary, the
  SDS loss curves and the ``renders`` images (4 views around the object at each render step);
* serving (``jobs/serve.py``, ``job_type="serve"``, group ``serve-<app>``): one run per ingress
  replica with latency percentiles, batch sizes, throughput and queue depth per window.

Each dashboard is described once as sections of panels (:func:`training_sections`, ...) and
assembled into a Workspace (one W&B section per entry) and a Report (a heading and a panel grid
per entry), so the two never drift apart. :func:`build_all` returns every object by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws
from wandb_workspaces import expr

# ---------------------------------------------------------------------------- metric keys
# Training (mvdream_platform.training.loop logs these every `log_every` steps).
TRAIN_LOSS = ("loss", "preservation_loss")  # the second only with DreamBooth's parameter preservation
TRAIN_OPTIM = ("lr", "grad_norm")
TRAIN_THROUGHPUT = ("images_per_s", "samples_per_s")
TRAIN_MEMORY = ("max_rss_mb", "cuda_max_allocated_mb")  # host; GPU when there is one
TRAIN_STEP_PARTS = ("data_time_s", "forward_time_s", "backward_time_s", "optimizer_time_s",
                    "allreduce_time_s")
TRAIN_STEP_TIME = ("step_time_s",)
TRAIN_DATA = ("multiview_fraction",)
TRAIN_MEDIA = "samples"

# SDS (mvdream_platform.sds.optimize logs the history; tune.trial writes the summary).
SDS_LOSS = ("loss", "loss_sds", "loss_orient")
SDS_SCHEDULE = ("t", "min_step", "max_step")
SDS_FIELD = ("opacity", "resolution")
SDS_STEP_TIME = ("step_time_s",)
SDS_MEDIA = "renders"
SDS_SCORES = ("prior_text_gain", "prior_eps_mse", "clip_score", "gt_iou", "gt_colour_accuracy")

# Serving (mvdream_platform.serve.metrics.MetricsWindow.summary, one row per window).
SERVE_LATENCY = ("latency_p50_s", "latency_p95_s", "latency_max_s")
SERVE_THROUGHPUT = ("requests_per_s", "views_per_s")
SERVE_BATCH = ("mean_batch_size", "max_batch_size")
SERVE_QUEUE = ("active_jobs", "jobs_submitted")
SERVE_ERRORS = ("errors", "requests")

# W&B job types our jobs set (start_tracking(job_type=...)).
JOB_TYPES = {"training": "train", "sweeps": "tune_trial", "serving": "serve"}

# The swept parameters of conf/tune/tiny.yaml, used when no tune config is given.
DEFAULT_SWEEP_PARAMS = ("seed", "guidance_scale", "negative_prompt",
                        "sds.guidance.recon_std_rescale", "sds.guidance.min_step_percent_start",
                        "sds.guidance.min_step_percent_end", "sds.guidance.max_step_percent_end",
                        "sds.guidance.anneal_steps")
# A sweep's panels show this many trials (W&B's default of 10 hides most of a sweep).
SWEEP_MAX_RUNS = 50
# Objectives Tune minimises (mode "min" in mvdream_platform.tune.objective.METRICS).
MINIMISED = ("prior_eps_mse",)


@dataclass(frozen=True)
class Target:
    """Where the dashboards go and which runs they show.

    entity, project: the W&B entity and project our jobs log to (conf/logger: mvdream-platform).
    train_group: show only training runs of this W&B group (ours log none: None = all).
    sweep_group: one sweep (the tune job's ``group``, by default its ``name``); None = all.
    serve_group: one Serve application (``serve-<app>``); None = all replicas.
    sweep_params: the swept parameter keys (conf/tune/*.yaml ``params``), see
        :func:`sweep_params_from_yaml`.
    sweep_metric: the sweep's objective (conf/tune/*.yaml ``objective.metric``).
    """

    entity: str
    project: str = "mvdream-platform"
    train_group: str | None = None
    sweep_group: str | None = None
    serve_group: str | None = None
    sweep_params: tuple[str, ...] = field(default=DEFAULT_SWEEP_PARAMS)
    sweep_metric: str = "prior_text_gain"

    def __post_init__(self) -> None:
        # Fail here, not in W&B's API: an empty entity makes wandb_workspaces ask the network
        # for a default one.
        for name in ("entity", "project", "sweep_metric"):
            if not str(getattr(self, name) or "").strip():
                raise ValueError(f"dashboards: {name} must be a non-empty string")
        # wandb_workspaces writes filters as Python-like strings and does not escape quotes.
        for name in ("train_group", "sweep_group", "serve_group"):
            value = getattr(self, name)
            if value is not None and ("'" in value or '"' in value or not value.strip()):
                raise ValueError(f"dashboards: {name}={value!r}: a W&B group name without quotes "
                                 "is needed")


def sweep_params_from_yaml(path: str | Path) -> tuple[tuple[str, ...], str]:
    """The swept parameter keys and objective metric of a conf/tune/*.yaml file.

    Reads ``params`` (keys whose value is a distribution, i.e. a mapping; constants such as
    ``max_step_percent_start: 0.98`` are not swept) and ``objective.metric``.
    Returns ``(params, metric)``; raises ValueError when the file has no ``params`` mapping.
    """
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    params = data.get("params")
    if not isinstance(params, dict):
        raise ValueError(f"{path}: no 'params' mapping (is it a conf/tune/*.yaml file?)")
    swept = tuple(k for k, v in params.items() if isinstance(v, dict))
    metric = (data.get("objective") or {}).get("metric") or "prior_text_gain"
    return swept, str(metric)


def param_config_key(param: str) -> str:
    """The W&B config key of a swept parameter.

    Tune trials log the job-shaped ``run`` dict as the config, so a dotted parameter is a nested
    config key; ``negative_prompt`` is a set name that becomes the long text
    ``sds.guidance.negative_prompt``: the short name in ``params`` reads better on an axis.
    """
    return "params.negative_prompt" if param == "negative_prompt" else param


def run_filter(kind: str, group: str | None) -> expr.And:
    """The runs of one dashboard: its W&B job type (:data:`JOB_TYPES`), and its group if given.

    Runsets turn it into wandb_workspaces' filter string, e.g.
    ``Metric("JobType") == 'tune_trial' and Metric("Group") == 'first-sweep'``.
    """
    job_type = expr.Metric("JobType") == JOB_TYPES[kind]
    if group is None:
        return expr.And(job_type)
    return expr.And(job_type, expr.Metric("Group") == group)


# ---------------------------------------------------------------------------- panels
def _lines(title: str, keys: tuple[str, ...], **options: Any) -> wr.LinePlot:
    return wr.LinePlot(title=title, x="Step", y=list(keys), **options)


def training_sections() -> list[tuple[str, list[Any]]]:
    """(section title, panels) of the training dashboard."""
    return [
        ("Loss", [_lines("Loss", TRAIN_LOSS, log_y=True, smoothing_type="exponential",
                         smoothing_factor=0.6, smoothing_show_original=True),
                  _lines("Learning rate", TRAIN_OPTIM[:1]),
                  _lines("Gradient norm", TRAIN_OPTIM[1:])]),
        ("Throughput", [_lines("Images per second", TRAIN_THROUGHPUT[:1]),
                        _lines("Samples per second", TRAIN_THROUGHPUT[1:]),
                        _lines("Multi-view fraction of the batch", TRAIN_DATA)]),
        ("Memory", [_lines("Peak host memory (MB)", TRAIN_MEMORY[:1]),
                    _lines("Peak GPU memory (MB)", TRAIN_MEMORY[1:])]),
        ("Step time", [_lines("Step time breakdown (s)", TRAIN_STEP_PARTS,
                              plot_type="stacked-area"),
                       _lines("Step time (s)", TRAIN_STEP_TIME)]),
        ("Samples", [wr.MediaBrowser(title="Sample grids", media_keys=[TRAIN_MEDIA],
                                     gallery_axis="step", num_columns=1)]),
    ]


def sweep_sections(target: Target) -> list[tuple[str, list[Any]]]:
    """(section title, panels) of the SDS sweep dashboard."""
    metric = target.sweep_metric
    scores = [metric] + [s for s in SDS_SCORES if s != metric and s.startswith("gt_")]
    columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(param_config_key(p)),
                                                display_name=p.rsplit(".", 1)[-1])
               for p in target.sweep_params]
    columns += [wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(s), display_name=s)
                for s in scores]
    return [
        ("Hyper-parameters to metrics", [
            wr.ParallelCoordinatesPlot(title=f"Hyper-parameters -> {metric}", columns=columns,
                                       layout=wr.Layout(w=24, h=9)),
            wr.ParameterImportancePlot(with_respect_to=metric),
            wr.ScatterPlot(title=f"{metric} by trial", x=wr.Metric("CreatedTimestamp"),
                           y=wr.SummaryMetric(metric)),
        ]),
        ("Turntable renders", [
            wr.MediaBrowser(title="Views around the object, per trial and step",
                            media_keys=[SDS_MEDIA], mode="grid", grid_x_axis="step",
                            grid_y_axis="run", layout=wr.Layout(w=24, h=12)),
        ]),
        ("Optimisation", [_lines("SDS loss", SDS_LOSS, log_y=True),
                          _lines("Timestep schedule", SDS_SCHEDULE),
                          _lines("Field", SDS_FIELD),
                          _lines("Step time (s)", SDS_STEP_TIME)]),
    ]


def serving_sections() -> list[tuple[str, list[Any]]]:
    """(section title, panels) of the serving dashboard (one line per ingress replica)."""
    return [
        ("Latency", [_lines("Request latency (s)", SERVE_LATENCY)]),
        ("Batch size", [_lines("Batch size", SERVE_BATCH)]),
        ("Queue", [_lines("Jobs in the queue", SERVE_QUEUE[:1]),
                   _lines("Jobs submitted per window", SERVE_QUEUE[1:])]),
        ("Throughput", [_lines("Requests and views per second", SERVE_THROUGHPUT),
                        _lines("Errors and requests per window", SERVE_ERRORS)]),
    ]


# ---------------------------------------------------------------------------- assembly
def _workspace(target: Target, name: str, kind: str, group: str | None,
               sections: list[tuple[str, list[Any]]], pinned: list[str] | None = None,
               order: list[Any] | None = None, max_runs: int = 10) -> ws.Workspace:
    runset = ws.RunsetSettings(filters=run_filter(kind, group), pinned_columns=pinned or [])
    if order:
        runset.order = order
    return ws.Workspace(
        entity=target.entity, project=target.project, name=name,
        sections=[ws.Section(name=title, panels=panels, is_open=True)
                  for title, panels in sections],
        settings=ws.WorkspaceSettings(x_axis="Step", max_runs=max_runs),
        runset_settings=runset,
    )


def _report(target: Target, title: str, description: str, kind: str, group: str | None,
            sections: list[tuple[str, list[Any]]], pinned: list[str] | None = None,
            order: list[wr.OrderBy] | None = None) -> wr.Report:
    def runset() -> wr.Runset:
        extra: dict[str, Any] = {"order": order} if order else {}
        return wr.Runset(entity=target.entity, project=target.project, name=title,
                         filters=run_filter(kind, group), pinned_columns=pinned or [], **extra)

    blocks: list[Any] = [wr.P(text=description)]
    for heading, panels in sections:
        blocks += [wr.H2(text=heading), wr.PanelGrid(runsets=[runset()], panels=panels)]
    return wr.Report(entity=target.entity, project=target.project, title=title,
                     description=description, blocks=blocks, width="fluid")


def _sweep_columns(target: Target) -> list[str]:
    """The sweep table's pinned columns: parameters, then the objective and ground truth."""
    params = []
    for p in target.sweep_params:
        head, *rest = param_config_key(p).split(".")
        params.append(f"config:{head}.value" + "".join(f".{r}" for r in rest))
    scores = [target.sweep_metric] + [s for s in SDS_SCORES if s.startswith("gt_")]
    return params + [f"summary:{s}" for s in dict.fromkeys(scores)]


def build_all(target: Target) -> dict[str, ws.Workspace | wr.Report]:
    """Every dashboard object by name: ``<dashboard>-workspace`` and ``<dashboard>-report`` for
    training, sweeps and serving (six objects, in that order)."""
    ascending = target.sweep_metric in MINIMISED  # best trial first
    sweep_pinned = _sweep_columns(target)
    sweep_of = f" of sweep {target.sweep_group!r}" if target.sweep_group else ""
    serve_of = f" of {target.serve_group!r}" if target.serve_group else ""
    train = training_sections()
    sweeps = sweep_sections(target)
    serving = serving_sections()
    return {
        "training-workspace": _workspace(target, "Training", "training", target.train_group,
                                         train),
        "training-report": _report(
            target, "MVDream training",
            "Loss, throughput, memory, step-time breakdown and sample grids of the "
            "multi-view diffusion training runs (jobs/train.py).",
            "training", target.train_group, train),
        "sweeps-workspace": _workspace(
            target, "SDS sweeps", "sweeps", target.sweep_group, sweeps, pinned=sweep_pinned,
            order=[ws.Ordering(ws.Summary(target.sweep_metric), ascending=ascending)],
            max_runs=SWEEP_MAX_RUNS),
        "sweeps-report": _report(
            target, "SDS hyper-parameter sweeps",
            f"Text-to-3D trials{sweep_of} (jobs/tune_sds.py): sampled hyper-parameters against "
            f"the objective {target.sweep_metric} and the ground-truth scores, and the renders "
            "of every trial.",
            "sweeps", target.sweep_group, sweeps, pinned=sweep_pinned,
            order=[wr.OrderBy(wr.SummaryMetric(target.sweep_metric), ascending=ascending)]),
        "serving-workspace": _workspace(target, "Serving", "serving", target.serve_group,
                                        serving),
        "serving-report": _report(
            target, "MVDream serving",
            f"Latency, batch size, queue depth and throughput of the Serve ingress "
            f"replicas{serve_of} (jobs/serve.py), one line per replica.",
            "serving", target.serve_group, serving),
    }


def describe(obj: Any) -> Any:
    """A JSON-able picture of a dashboard object (what ``apply.py --dry-run`` prints).

    Every dataclass (wandb_workspaces objects and their metric references) becomes
    ``{"type": <class name>, <public field>: ...}``, so ``Config("seed")`` and
    ``SummaryMetric("seed")`` stay distinct. Internal fields (leading ``_``: generated panel ids
    and the like) are left out, so two builds describe the same. Not ``_to_model()``: a report's
    runsets ask the server for their project's internal id while converting, and a dry run
    must not need the network.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {"type": type(obj).__name__}
        for f in dataclasses.fields(obj):
            if not f.name.startswith("_"):
                out[f.name] = describe(getattr(obj, f.name))
        return out
    if isinstance(obj, dict):
        return {str(k): describe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [describe(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return repr(obj)
