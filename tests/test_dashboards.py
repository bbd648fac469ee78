"""dashboards/: W&B workspaces and reports built offline, apply's idempotence, and the offline
HTML report (detection of every kind of run folder, bad input, rendering in headless Chromium).

The run folders are written with our own producers where they are cheap (the tracker's local
record, the serving metrics window, the sweep result writers) so the formats are the real ones.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import wandb_workspaces.reports.v2 as wr
from PIL import Image

from mvdream_platform.tracking import start_tracking

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards"
PLATFORM = ROOT / "platform" / "mvdream_platform"


def _load(name: str):
    """A dashboards/ module (the folder holds scripts, not a package)."""
    if str(DASHBOARDS) not in sys.path:
        sys.path.insert(0, str(DASHBOARDS))
    return importlib.import_module(name)


definitions = _load("definitions")
apply_cli = _load("apply")
collect = _load("collect")
report = _load("report")
wandb_offline = _load("wandb_offline")

# ------------------------------------------------------------------------------ fixtures
# The keys mvdream_platform.training.loop._Window.flush logs (checked against its source in
# test_metric_keys_are_what_the_jobs_log).
TRAIN_KEYS = ("loss", "lr", "grad_norm", "images_per_s", "samples_per_s", "step_time_s",
              "multiview_fraction", "skipped_records", "max_rss_mb", "data_time_s",
              "forward_time_s", "backward_time_s", "optimizer_time_s", "allreduce_time_s")


def _tracker(folder: Path, job_type: str):
    # mode="disabled": the local record only (what report.py reads), no W&B files.
    return start_tracking(mode="disabled", project="test", run_name=folder.name, group=None,
                          config={}, dir=folder, job_type=job_type)


def _gif(path: Path, colour: tuple[int, int, int], frames: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pictures = [Image.new("RGB", (24, 24), tuple(min(255, c + 30 * i) for c in colour))
                for i in range(frames)]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=80, loop=0)


def make_training_run(root: Path, name: str, speed: float) -> Path:
    run = root / name
    tracker = _tracker(run / "tracking", "train")
    for step in (10, 20, 30, 40):
        values = dict.fromkeys(TRAIN_KEYS, 0.1)
        values |= {"loss": 1.0 / step, "images_per_s": speed, "samples_per_s": speed / 4,
                   "max_rss_mb": 1000.0 + step, "step_time_s": 0.5}
        tracker.log(values, step=step)
    tracker.log_images("samples", np.full((4, 8, 8, 3), 200, np.uint8), step=20)
    tracker.log_images("samples", np.full((4, 8, 8, 3), 90, np.uint8), step=40)
    tracker.finish()
    (run / "train_summary.json").write_text(json.dumps({"metrics": {"loss": 0.025}}))
    (run / "config.yaml").write_text(f"run:\n  name: {name}\n")
    return run


def make_text_to_3d_run(folder: Path, prompt: str, colour: tuple[int, int, int],
                        iou: float) -> Path:
    tracker = _tracker(folder / "tracking", "text_to_3d")
    for step in (1, 2, 3, 4):
        tracker.log({"loss": 10.0 / step, "loss_sds": 10.0 / step, "t": 900.0 - step,
                     "opacity": 0.3, "step_time_s": 0.1}, step=step)
    tracker.log_images("renders", np.zeros((4, 8, 8, 3), np.uint8), step=4, ncols=4)
    tracker.finish()
    _gif(folder / "turntable.gif", colour)
    Image.new("RGB", (64, 16), colour).save(folder / "multiview.png")
    (folder / "metrics.json").write_text(json.dumps({
        "prompt": prompt, "seed": 0, "steps": 4, "final": {"loss": 2.5, "step": 4},
        "quality": {"mean_iou": iou, "colour_accuracy": 1.0}, "total_seconds": 3.0,
        "assets": {"turntable.gif": str(folder / "turntable.gif")}}))
    return folder


def make_tune_sweep(root: Path) -> tuple[Path, list[str]]:
    """A jobs/tune_sds.py sweep folder written by mvdream_platform.tune.results; returns it and
    its trial ids from best to worst objective."""
    from mvdream_platform.tune.results import METRIC_COLUMNS, write_table

    sweep = root / "sweep"
    gains = {"t0": 0.001, "t1": 0.004, "t2": -0.002, "t3": None}  # t3 errored: no objective
    rows = []
    for i, (trial, gain) in enumerate(gains.items()):
        out = sweep / "trials" / trial
        if gain is not None:
            make_text_to_3d_run(out, "a red cube", (40 * i, 80, 200), 0.5 + i / 10)
        row = {"trial_id": trial, "status": "TERMINATED" if gain is not None else "ERROR",
               "prompt": "a red cube", "guidance_scale": 2.0 + i,
               "negative_prompt": ["none", "short", "reference", "short"][i],
               "sds.guidance.recon_std_rescale": 0.1 * i, "objective": "prior_text_gain"}
        row |= dict.fromkeys(METRIC_COLUMNS)
        row |= {"step": 4, "prior_text_gain": gain, "gt_iou": 0.5 + i / 10 if gain else None,
                "error": "" if gain is not None else "FloatingPointError: non-finite loss",
                "out": str(out), "turntable_gif": str(out / "turntable.gif") if gain else None}
        rows.append(row)
    write_table(rows, str(sweep), "prior_text_gain")
    (sweep / "summary.json").write_text(json.dumps({"metric": "prior_text_gain", "mode": "max"}))
    return sweep, ["t1", "t0", "t2", "t3"]


def make_multirun(root: Path) -> Path:
    """A Hydra multirun of jobs/text_to_3d.py, summarised by mvdream_platform.sweeps."""
    from mvdream_platform.sweeps import job_record, write_summary

    sweep = root / "multirun"
    records = []
    for num, scale in enumerate((3.0, 7.5)):
        out = make_text_to_3d_run(sweep / str(num), "a blue sphere", (0, 0, 255), 0.6 + num / 5)
        records.append(job_record(num=num, status="COMPLETED", overrides=[
            f"guidance_scale={scale}", "steps=4"], out=str(out), job_dir=str(out), seconds=3.0))
    write_summary(sweep, records)
    return sweep


def make_serving(root: Path) -> Path:
    """A Serve storage folder: tracking/ingress-<replica>/ with MetricsWindow summaries."""
    from mvdream_platform.serve.metrics import MetricsWindow

    tracking = root / "serve" / "tracking"
    for replica, latency in (("ingress-a", 0.2), ("ingress-b", 0.4)):
        tracker = _tracker(tracking / replica, "serve")
        for step in range(4):
            window = MetricsWindow()
            for _ in range(3):
                window.request(latency * (1 + step / 4), batch_sizes=[2, 4], views=8)
            window.jobs_submitted = step
            tracker.log(window.summary(active_jobs=step % 2), step=step)
        tracker.finish()
    return root / "serve"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, object]:
    """One folder holding one of each kind of run (built once for the module)."""
    root = tmp_path_factory.mktemp("zoo")
    runs = root / "runs"
    make_training_run(runs, "train-a", 40.0)
    make_training_run(runs, "train-b", 20.0)
    make_text_to_3d_run(root / "t23d" / "cube", "a red cube", (220, 30, 30), 0.8)
    sweep, ranking = make_tune_sweep(root)
    make_multirun(root)
    make_serving(root)
    return {"root": root, "sweep": sweep, "ranking": ranking}


# ------------------------------------------------------------------------------ W&B objects
def _panels(obj) -> list:
    if isinstance(obj, wr.Report):
        return [p for b in obj.blocks if isinstance(b, wr.PanelGrid) for p in b.panels]
    return [p for section in obj.sections for p in section.panels]


def _line_keys(obj) -> set[str]:
    return {y for p in _panels(obj) if isinstance(p, wr.LinePlot) for y in p.y}


@pytest.fixture
def no_network(monkeypatch):
    """Building and describing the objects must not reach W&B (or anything else)."""
    import wandb

    def refuse(*args, **kwargs):
        raise AssertionError("network access while building dashboards")

    monkeypatch.setattr(wandb, "Api", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_build_all_offline_panels_and_keys(no_network):
    target = definitions.Target(entity="team", project="proj", sweep_group="first-sweep",
                                serve_group="serve-mvdream")
    objects = definitions.build_all(target)
    assert list(objects) == ["training-workspace", "training-report", "sweeps-workspace",
                             "sweeps-report", "serving-workspace", "serving-report"]
    for name, obj in objects.items():
        assert isinstance(obj, wr.Report) == name.endswith("-report")
        assert (obj.entity, obj.project) == ("team", "proj")

    for name in ("training-workspace", "training-report"):
        obj = objects[name]
        assert {"loss", "lr", "grad_norm", "images_per_s", "samples_per_s", "max_rss_mb",
                "step_time_s", *definitions.TRAIN_STEP_PARTS} <= _line_keys(obj)
        stacked = [p for p in _panels(obj) if isinstance(p, wr.LinePlot)
                   and p.plot_type == "stacked-area"]
        assert [p.y for p in stacked] == [list(definitions.TRAIN_STEP_PARTS)]
        media = [p for p in _panels(obj) if isinstance(p, wr.MediaBrowser)]
        assert [m.media_keys for m in media] == [["samples"]]

    for name in ("sweeps-workspace", "sweeps-report"):
        panels = _panels(objects[name])
        (pc,) = [p for p in panels if isinstance(p, wr.ParallelCoordinatesPlot)]
        metrics = [c.metric for c in pc.columns]
        assert metrics[:3] == [wr.Config("seed"), wr.Config("guidance_scale"),
                               wr.Config("params.negative_prompt")]
        assert wr.Config("sds.guidance.recon_std_rescale") in metrics
        assert metrics[len(definitions.DEFAULT_SWEEP_PARAMS)] == wr.SummaryMetric(
            "prior_text_gain")
        (importance,) = [p for p in panels if isinstance(p, wr.ParameterImportancePlot)]
        assert importance.with_respect_to == "prior_text_gain"
        (media,) = [p for p in panels if isinstance(p, wr.MediaBrowser)]
        assert media.media_keys == ["renders"] and (media.grid_y_axis, media.mode) == (
            "run", "grid")
        assert {"loss", "loss_sds", "t", "opacity"} <= _line_keys(objects[name])

    for name in ("serving-workspace", "serving-report"):
        assert {"latency_p50_s", "latency_p95_s", "latency_max_s", "mean_batch_size",
                "max_batch_size", "active_jobs", "jobs_submitted", "requests_per_s",
                "views_per_s", "errors"} <= _line_keys(objects[name])

    # The sweep table: pinned parameter and score columns, best trial first.
    runset = objects["sweeps-report"].blocks[2].runsets[0]
    assert runset.pinned_columns[:3] == ["config:seed.value", "config:guidance_scale.value",
                                         "config:params.value.negative_prompt"]
    assert "config:sds.value.guidance.recon_std_rescale" in runset.pinned_columns
    assert "summary:prior_text_gain" in runset.pinned_columns
    assert runset.order[0].name == wr.SummaryMetric("prior_text_gain")
    assert runset.order[0].ascending is False
    assert objects["sweeps-workspace"].settings.max_runs == definitions.SWEEP_MAX_RUNS

    # The workspaces convert to W&B's wire format offline, with the accessors W&B expects.
    spec = json.dumps(objects["sweeps-workspace"]._spec)
    assert '"accessor": "config:sds.value.guidance.recon_std_rescale"' in spec
    assert '"accessor": "summary:prior_text_gain"' in spec


def test_runset_filters_by_job_type_and_group(no_network):
    grouped = definitions.build_all(definitions.Target(
        entity="e", train_group="nightly", sweep_group="sweep-1", serve_group="serve-app"))
    expected = {"training": ("train", "nightly"), "sweeps": ("tune_trial", "sweep-1"),
                "serving": ("serve", "serve-app")}
    for name, obj in grouped.items():
        job_type, group = expected[name.split("-")[0]]
        filters = [obj.runset_settings.filters] if name.endswith("workspace") else \
            [rs.filters for b in obj.blocks if isinstance(b, wr.PanelGrid) for rs in b.runsets]
        assert filters and all(f == f"Metric(\"JobType\") == '{job_type}' and "
                                    f"Metric(\"Group\") == '{group}'" for f in filters), name
    ungrouped = definitions.build_all(definitions.Target(entity="e"))
    assert ungrouped["training-workspace"].runset_settings.filters == \
        "Metric(\"JobType\") == 'train'"
    wire = ungrouped["serving-workspace"]._spec["spec"]["section"]["runSets"][0]["filters"]
    assert wire["filters"] == [{"key": {"section": "run", "name": "jobType"}, "op": "=",
                                "value": "serve", "disabled": False}]


def test_target_validation_and_tune_conf():
    with pytest.raises(ValueError, match="entity"):
        definitions.Target(entity=" ")
    with pytest.raises(ValueError, match="sweep_group"):
        definitions.Target(entity="e", sweep_group="it's")
    params, metric = definitions.sweep_params_from_yaml(ROOT / "conf" / "tune" / "tiny.yaml")
    assert params == definitions.DEFAULT_SWEEP_PARAMS  # the default is tiny.yaml's space
    assert "sds.guidance.max_step_percent_start" not in params  # a constant, not swept
    assert metric == "prior_text_gain"
    params, _ = definitions.sweep_params_from_yaml(ROOT / "conf" / "tune" / "reference.yaml")
    sweep = definitions.build_all(definitions.Target(entity="e", sweep_params=params))
    (pc,) = [p for p in _panels(sweep["sweeps-report"])
             if isinstance(p, wr.ParallelCoordinatesPlot)]
    assert len(pc.columns) == len(params) + 3  # + objective, gt_iou, gt_colour_accuracy
    with pytest.raises(ValueError, match="params"):
        definitions.sweep_params_from_yaml(ROOT / "conf" / "text_to_3d.yaml")


def _string_constants(path: Path, within: str | None = None) -> set[str]:
    tree = ast.parse(path.read_text())
    if within is not None:
        tree = next(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                    and n.name == within)
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)}


def test_metric_keys_are_what_the_jobs_log():
    """The dashboards' keys against the producers' source (read, not imported: importing the
    training loop costs seconds of diffusers), and serving against the real metrics window."""
    from mvdream_platform.serve.metrics import MetricsWindow

    window_class = _string_constants(PLATFORM / "training" / "loop.py", "_Window")
    phases = ("data", "forward", "backward", "optimizer", "allreduce")
    assert set(phases) <= window_class  # flush logs f"{phase}_time_s" for these
    assert definitions.TRAIN_STEP_PARTS == tuple(f"{p}_time_s" for p in phases)
    plain = set(definitions.TRAIN_LOSS + definitions.TRAIN_OPTIM + definitions.TRAIN_THROUGHPUT
                + definitions.TRAIN_MEMORY + definitions.TRAIN_STEP_TIME + definitions.TRAIN_DATA)
    assert plain <= window_class
    assert definitions.TRAIN_MEDIA in _string_constants(PLATFORM / "training" / "loop.py")

    sds = _string_constants(PLATFORM / "sds" / "optimize.py")
    assert set(definitions.SDS_LOSS + definitions.SDS_SCHEDULE + definitions.SDS_FIELD
               + definitions.SDS_STEP_TIME + (definitions.SDS_MEDIA,)) <= sds
    tune = set().union(*(_string_constants(p) for p in (PLATFORM / "tune").glob("*.py")))
    assert set(definitions.SDS_SCORES) <= tune
    objective = ast.parse((PLATFORM / "tune" / "objective.py").read_text())
    modes = next(ast.literal_eval(n.value) for n in ast.walk(objective)
                 if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "METRICS")
    assert {m for m, mode in modes.items() if mode == "min"} == set(definitions.MINIMISED)

    window = MetricsWindow()
    window.request(0.1, [2, 4], views=8)
    served = set(window.summary(active_jobs=1))
    assert set(definitions.SERVE_LATENCY + definitions.SERVE_THROUGHPUT + definitions.SERVE_BATCH
               + definitions.SERVE_QUEUE + definitions.SERVE_ERRORS) <= served


# ------------------------------------------------------------------------------ apply
class FakeSaver:
    """Stands in for W&B: assigns ids to new objects, keeps the ids of known ones."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple[str, str | None]] = []
        self.fail_on, self.counter = fail_on, 0

    def __call__(self, obj) -> str:
        is_report = isinstance(obj, wr.Report)
        title = obj.title if is_report else obj.name
        if title == self.fail_on:
            raise ConnectionError("server unreachable")
        known = obj.id if is_report else obj._internal_id
        self.calls.append((title, known or None))
        if not known:
            self.counter += 1
            if is_report:
                obj.id = f"report-{self.counter}"
            else:
                obj._internal_id, obj._internal_name = f"view-{self.counter}", f"nw-{self.counter}"
        return f"https://wandb.example/{obj.id if is_report else obj._internal_name}"


def test_apply_is_idempotent(tmp_path, no_network):
    state = tmp_path / "state.json"
    target = definitions.Target(entity="team")
    saver = FakeSaver()
    logged: list[str] = []
    first = apply_cli.apply(definitions.build_all(target), target, state, saver=saver,
                            log=logged.append)
    assert all(known is None for _, known in saver.calls) and len(saver.calls) == 6
    assert all(line.startswith("created ") for line in logged)
    recorded = json.loads(state.read_text())["targets"]["team/mvdream-platform"]
    assert recorded == first
    assert recorded["training-report"]["kind"] == "report"
    assert recorded["serving-workspace"]["view_name"].startswith("nw-")

    # A second run with freshly built objects saves the same ids: nothing new is created.
    saver.calls.clear()
    logged.clear()
    second = apply_cli.apply(definitions.build_all(target), target, state, saver=saver,
                             log=logged.append)
    assert saver.counter == 6
    assert sorted(known for _, known in saver.calls) == sorted(e["id"] for e in first.values())
    assert {n: e["id"] for n, e in second.items()} == {n: e["id"] for n, e in first.items()}
    assert all(line.startswith("updated ") for line in logged)

    # Another project gets its own objects; this one's ids stay.
    other = definitions.Target(entity="team", project="other")
    apply_cli.apply(definitions.build_all(other), other, state, saver=saver, log=logged.append)
    targets = json.loads(state.read_text())["targets"]
    assert set(targets) == {"team/mvdream-platform", "team/other"}
    assert targets["team/mvdream-platform"]["training-report"]["id"] == \
        first["training-report"]["id"]


def test_apply_failure_keeps_saved_ids_and_forget(tmp_path, no_network):
    state = tmp_path / "state.json"
    target = definitions.Target(entity="team")
    with pytest.raises(apply_cli.ApplyError, match="saving sweeps-workspace .* failed"):
        apply_cli.apply(definitions.build_all(target), target, state,
                        saver=FakeSaver(fail_on="SDS sweeps"), log=lambda _: None)
    recorded = json.loads(state.read_text())["targets"]["team/mvdream-platform"]
    assert sorted(recorded) == ["training-report", "training-workspace"]

    assert apply_cli.forget(["training-report", "nope"], target, state) == ["training-report"]
    assert list(json.loads(state.read_text())["targets"]["team/mvdream-platform"]) == [
        "training-workspace"]

    state.write_text("{not json")
    with pytest.raises(apply_cli.ApplyError, match="not readable JSON"):
        apply_cli.apply({}, target, state, saver=FakeSaver())


def test_apply_cli_needs_api_key_only_to_save(tmp_path, capsys, no_network):
    state = tmp_path / "state.json"

    def must_not_save(obj):
        raise AssertionError("saved without an API key")

    code = apply_cli.main(["--entity", "team", "--state", str(state)], saver=must_not_save,
                          environ={})
    assert code == 2
    assert "WANDB_API_KEY is not set" in capsys.readouterr().err
    assert not state.exists()

    code = apply_cli.main(["--entity", "team", "--state", str(state), "--dry-run",
                           "--sweep-group", "s1", "--only", "sweeps-report"],
                          saver=must_not_save, environ={})
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["target"] == "team/mvdream-platform"
    (report_json,) = printed["objects"].values()
    assert report_json["type"] == "Report" and report_json["recorded"] is None
    assert report_json["blocks"][2]["runsets"][0]["filters"] == \
        "Metric(\"JobType\") == 'tune_trial' and Metric(\"Group\") == 's1'"
    assert {"type": "SummaryMetric", "name": "prior_text_gain"} in [
        c["metric"] for c in report_json["blocks"][2]["panels"][0]["columns"]]
    assert not state.exists()

    saver = FakeSaver()
    code = apply_cli.main(["--entity", "team", "--state", str(state)], saver=saver,
                          environ={"WANDB_API_KEY": "x" * 40})
    assert code == 0 and len(saver.calls) == 6
    code = apply_cli.main(["--entity", "team", "--state", str(state), "--only", "bogus"],
                          saver=saver, environ={"WANDB_API_KEY": "x" * 40})
    assert code == 2 and "unknown ['bogus']" in capsys.readouterr().err


# ------------------------------------------------------------------------------ offline report
def test_discover_recognises_every_kind(zoo):
    items = collect.discover(zoo["root"])
    kinds = {(type(i).__name__, i.name.split("/", 1)[1]) for i in items}
    root = zoo["root"].name
    assert kinds == {("TrainingRun", "runs/train-a"), ("TrainingRun", "runs/train-b"),
                     ("TextTo3DRun", "t23d/cube"), ("Sweep", "sweep"), ("Sweep", "multirun"),
                     ("Serving", "serve")}, root
    by_name = {i.name.split("/", 1)[1]: i for i in items}
    train = by_name["runs/train-a"]
    assert [r["step"] for r in train.records] == [10, 20, 30, 40]
    assert [s for s, _ in train.samples] == [20, 40] and train.summary == {"loss": 0.025}
    sweep = by_name["sweep"]
    assert sweep.params == ["guidance_scale", "negative_prompt",
                            "sds.guidance.recon_std_rescale"]
    assert (sweep.metric, sweep.mode) == ("prior_text_gain", "max")
    assert [r["trial_id"] for r in sweep.sorted_rows()] == zoo["ranking"]
    multirun = by_name["multirun"]
    assert (multirun.metric, multirun.params) == ("iou", ["guidance_scale"])
    assert [r["guidance_scale"] for r in multirun.sorted_rows()] == [7.5, 3.0]
    assert all(r["turntable"] is not None for r in multirun.rows)
    assert sorted(by_name["serve"].replicas) == ["ingress-a", "ingress-b"]
    # Each kind is also recognised when given directly (a tracking folder, one replica).
    (only,) = collect.discover(zoo["root"] / "serve" / "tracking" / "ingress-b")
    assert isinstance(only, collect.Serving) and list(only.replicas) == ["ingress-b"]
    (tracking,) = collect.discover(zoo["root"] / "runs" / "train-b" / "tracking")
    assert isinstance(tracking, collect.TrainingRun) and len(tracking.records) == 4


def _images(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]*)"', page)


def test_report_cli_writes_a_self_contained_page(zoo, tmp_path, capsys):
    out = tmp_path / "site" / "report.html"
    assert report.main([str(zoo["root"]), "--out", str(out), "--title", "Nightly"]) == 0
    page = out.read_text()
    assert "wrote" in capsys.readouterr().out
    sources = _images(page)
    assert sources and all(s.startswith("data:image/") for s in sources)
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch: mailable
    assert "<script" not in page
    # Turntables: 1 run + 3 finished trials + 2 multirun jobs; samples: the last grids.
    assert sum(s.startswith("data:image/gif") for s in sources) == 6
    assert page.count('alt="samples at step') == 4
    for heading in ("Overview", "Training", "Text-to-3D runs", "Sweeps", "Serving"):
        assert f">{heading}</h2>" in page
    for caption in ("Training loss", "Throughput", "Peak resident memory",
                    "Step time: data, forward", "Latency percentiles", "Batch size per window",
                    "Jobs queued or running", "Each line is a trial"):
        assert caption in page, caption
    # The sweep table is sorted by the objective: t1 (best, highlighted) ... t3 (errored).
    sweep_table = page[page.index("objective prior_text_gain, higher is better"):]
    order = [m for m in re.findall(r">(t\d)<", sweep_table)][:4]
    assert order == zoo["ranking"]
    assert re.search(r"<tr class=best><td>1</td><td>t1</td>", sweep_table)
    assert "FloatingPointError: non-finite loss" in sweep_table
    assert "#1 t1: a red cube, prior_text_gain 0.004" in page  # the gallery follows the ranking
    assert "ingress-a" in page and "ingress-b" in page
    assert not [p for p in out.parent.iterdir() if p.name != "report.html"]  # no temp files


def test_serving_time_axis_and_plots_without_data():
    replicas = {"a": [{"step": 0, "time": 100.0}, {"step": 1, "time": 110.0}],
                "b": [{"step": 0, "time": 105.0}, {"step": 1, "time": 115.0}]}
    timed, x, _ = report._on_time_axis(replicas)
    assert x == "elapsed_s" and [r["elapsed_s"] for r in timed["b"]] == [5.0, 15.0]
    same_millisecond = {"a": [{"step": 0, "time": 100.0}, {"step": 1, "time": 100.0}]}
    assert report._on_time_axis(same_millisecond)[1] == "step"

    plots = _load("plots")
    records = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    assert plots.lines({"a": records}, ["images_per_s"], "never logged") is None
    assert plots.lines({"a": records}, ["loss"], "loss", log_y=True).startswith(b"\x89PNG")
    assert plots.stacked(records, ["data_time_s"], "step_time_s", "none") is None
    assert plots.parallel_coordinates([{"x": 1, "m": None}], ["x"], "m") is None


def test_report_bad_input_names_it_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "report.html"
    missing = tmp_path / "no-such-run"
    assert report.main([str(missing), "--out", str(out)]) == 2
    assert f"{missing}: no such file or folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("hello")
    assert report.main([str(empty), "--out", str(out)]) == 2
    assert f"{empty}: nothing recognisable" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    # A good folder beside a bad one: still an error, and an older report is left as it was.
    out.write_text("previous")
    good = make_text_to_3d_run(tmp_path / "good", "a cube", (0, 200, 0), 0.7)
    assert report.main([str(good), str(missing), "--out", str(out)]) == 2
    assert out.read_text() == "previous"


def test_offline_wandb_run_is_read_and_reported(tmp_path, monkeypatch):
    """A real offline W&B run (wandb-core writes it), read back without W&B's service, and a
    training run that only has W&B files shown from them."""
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)  # conftest's kill switch
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    run = tmp_path / "runs" / "wb-only"
    tracker = start_tracking(mode="offline", project="test", run_name="wb-only", group="g1",
                             config={"trainer": {"lr": 0.001}}, dir=run / "tracking",
                             job_type="train")
    if tracker.run is None:
        pytest.skip("wandb could not start an offline run here")
    for step in (5, 10, 15):
        tracker.log({"loss": 1.0 / step, "images_per_s": 30.0 + step, "step_time_s": 0.2},
                    step=step)
    tracker.log_images("samples", np.zeros((2, 8, 8, 3), np.uint8), step=15)
    tracker.finish()
    # wandb-core writes the .wandb file asynchronously after finish(); shutting the service
    # down flushes it (as the end of the job's process would).
    wandb.teardown()
    (folder,) = (run / "tracking" / "wandb").glob("offline-run-*")
    read = wandb_offline.read_offline_run(folder)
    assert read["run"]["name"] == "wb-only" and read["run"]["job_type"] == "train"
    assert read["run"]["group"] == "g1" and read["config"]["trainer"] == {"lr": 0.001}
    assert [(r["_step"], r["loss"], r["images_per_s"]) for r in read["history"]] == [
        (5, 0.2, 35.0), (10, 0.1, 40.0), (15, 1.0 / 15, 45.0)]
    assert all(not k.startswith("samples") for r in read["history"] for k in r)  # media
    assert read["summary"]["loss"] == pytest.approx(1.0 / 15)

    (run / "tracking" / "metrics.jsonl").unlink()  # only the W&B files are left
    shutil.rmtree(run / "tracking" / "media")
    (run / "train_summary.json").write_text("{}")
    (item,) = collect.discover(run)
    assert isinstance(item, collect.TrainingRun) and item.source == "W&B offline run"
    assert [r["step"] for r in item.records] == [5, 10, 15]
    (direct,) = collect.discover(folder)  # an offline-run folder given directly
    assert isinstance(direct, collect.TrainingRun) and len(direct.records) == 3

    data = next(folder.glob("*.wandb")).read_bytes()
    assert len(wandb_offline.iter_payloads(data[: len(data) // 2])) > 0  # a killed run's file
    with pytest.raises(wandb_offline.OfflineRunError):
        wandb_offline.iter_payloads(b"not a wandb file at all")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(zoo, tmp_path):
    """The page loads in a real browser with every image decoded and no console errors."""
    executable = _chromium()
    if executable is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api")
    out = tmp_path / "report.html"
    assert report.main([str(zoo["root"]), "--out", str(out)]) == 0
    messages: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True)
        try:
            page = browser.new_page()
            page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
            page.on("requestfailed", lambda r: messages.append(f"requestfailed: {r.url}"))
            page.goto(out.as_uri(), wait_until="load")
            images = page.evaluate("() => Array.from(document.images).map("
                                   "i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
            headings = page.evaluate("() => Array.from(document.querySelectorAll('h2'))"
                                     ".map(h => h.textContent)")
        finally:
            browser.close()
    assert len(images) == len(_images(out.read_text())) > 20
    broken = [alt for alt, complete, width, height in images
              if not (complete and width > 0 and height > 0)]
    assert broken == []
    assert [m for m in messages if m.split(":")[0] in ("error", "pageerror", "requestfailed")] \
        == []
    assert headings == ["Overview", "Training", "Text-to-3D runs", "Sweeps", "Serving"]
