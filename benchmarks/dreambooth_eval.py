"""Multi-view DreamBooth evidence at tiny scale: does fine-tuning on a subject make the
identifier prompt produce that subject, and what does it cost on the standard captions?

For the base model and each DreamBooth run (same subject, same steps; different preservation
weights), with identical settings:

* **subject, multi-view sampling**: ``--seeds`` 4-view samples of the identifier prompt against
  renders of the subject mesh at the same cameras: silhouette IoU (aligned / raw) and whether the
  dominant colour matches the subject's;
* **subject, text-to-3D**: multi-view SDS of the identifier prompt (conf/sds/tiny.yaml,
  ``--sds-steps``), the NeRF's albedo at 8 held-out orbit views against the subject's renders
  there: IoU and colour (:func:`mvdream_platform.evaluation.text_to_3d.score_views`);
* **procedural captions**: :func:`mvdream_platform.evaluation.evaluate` on held-out
  single-primitive captions (colour accuracy, IoU), and the change against the base model.

    .venv/bin/python benchmarks/dreambooth_eval.py --subject tests/data/meshes/Duck.glb \
        --prompt "a sks toy" --runs subject-only=outputs/dreambooth/db-w0/pipeline \
        with-prior=outputs/dreambooth/p-w0/pipeline

Several processes can score models in parallel (``--threads 1 --out part_k.json``); a last call
with ``--reuse part_*.json`` merges them (rows measured with other settings are refused).

Writes results/dreambooth.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml

from machine_info import describe

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def subject_truth_views(mesh, settings, resolution: int) -> np.ndarray:
    """(F, H, W, 3) the subject at the evaluation cameras of multi-view sampling, on mid-grey."""
    from mvdream_platform.evaluation import render_ground_truth

    return render_ground_truth(SimpleNamespace(mesh=mesh), settings, resolution)


def score_multiview(pipe, mesh, prompt: str, seeds: int, guidance: float, steps: int) -> dict:
    """Identifier-prompt samples vs the subject's renders at the same 4 cameras."""
    from mvdream_platform.evaluation import (
        EvalSettings,
        aligned_iou,
        classify_colour,
        foreground_mask,
        raw_iou,
        shaded_palette,
    )

    settings = EvalSettings(steps=steps, guidance_scale=guidance)
    resolution = pipe.default_size
    truth = subject_truth_views(mesh, settings, resolution)
    palette = shaded_palette()
    truth_masks = [foreground_mask(v, settings.foreground_threshold) for v in truth]
    expected = classify_colour(np.concatenate([v[m] for v, m in zip(truth, truth_masks)]), palette)
    ious, raws, colours = [], [], []
    grids = []
    for seed in range(seeds):
        views = pipe(prompt, num_views=4, elevation=settings.elevation, num_inference_steps=steps,
                     guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
                     output_type="np").images[0]
        grids.append(np.concatenate(list(views), 1))
        for view, gt_mask in zip(views, truth_masks):
            mask = foreground_mask(view, settings.foreground_threshold)
            ious.append(aligned_iou(mask, gt_mask))
            raws.append(raw_iou(mask, gt_mask))
            colours.append(classify_colour(view[mask], palette) == expected)
    grid = np.concatenate(grids + [np.concatenate(list(truth), 1)], 0)
    return {"iou": float(np.mean(ious)), "iou_raw": float(np.mean(raws)),
            "colour_accuracy": float(np.mean(colours)), "expected_colour": expected,
            "views": len(ious)}, grid


def score_text_to_3d(pipe, mesh, prompt: str, steps: int, out: Path) -> dict:
    """Multi-view SDS of the identifier prompt, scored against the subject at held-out views
    (a scorer injected into the run: the finished field's albedo against the subject's renders)."""
    from mvdream_platform.data import render
    from mvdream_platform.evaluation import classify_colour, shaded_palette
    from mvdream_platform.evaluation.text_to_3d import evaluation_orbit, score_views
    from mvdream_platform.sds.config import TextTo3DSettings
    from mvdream_platform.sds.pipeline import run_text_to_3d

    def against_subject(run) -> dict:
        c2w = evaluation_orbit(run.views, run.elevation_deg, run.distance)
        views = run.render(c2w, run.resolution)
        rgba = render.render_views(mesh, c2w, run.fovy_deg, run.resolution, antialias=2)
        truth = rgba[..., 3] > 127
        expected = classify_colour(rgba[..., :3][truth] / 255, shaded_palette())
        return score_views(views.albedo, views.opacity, truth, expected)

    sds = yaml.safe_load((REPO / "conf" / "sds" / "tiny.yaml").read_text())
    cfg = TextTo3DSettings(sds=sds, steps=steps).config()
    result = run_text_to_3d(prompt, pipe, cfg, str(out), seed=0, progress=False, scorer=against_subject)
    scores = result.quality
    return {"iou": scores["mean_iou"], "iou_raw": scores["mean_iou_raw"],
            "colour_accuracy": scores["colour_accuracy"], "expected_colour": scores["expected_colour"],
            "seconds": result.total_seconds}


def score_procedural(pipe, objects: int, guidance: float, steps: int) -> dict:
    from mvdream_platform.evaluation import EvalSettings, evaluate

    report, _ = evaluate(pipe, EvalSettings(num_objects=objects, steps=steps, guidance_scale=guidance),
                         progress=False)
    return {"objects": report.objects, "colour_accuracy": report.colour_accuracy,
            "iou": report.mean_iou, "iou_raw": report.mean_iou_raw}


def weight_distance(pipe, base) -> float:
    """Mean |theta - theta_0| over the UNet's scalars (the L1 preservation distance, lambda = 1)."""
    total, count = 0.0, 0
    for p, p0 in zip(pipe.unet.parameters(), base.unet.parameters()):
        total += (p.detach() - p0.detach()).abs().sum().item()
        count += p.numel()
    return total / count


MEASUREMENT = ("prompt", "seeds", "objects", "steps", "guidance", "sds_steps")


def reused_rows(args) -> dict:
    """Rows of earlier results files; an error if one was measured differently."""
    rows = {}
    for path in args.reuse:
        earlier = json.loads(Path(path).read_text())
        differing = [k for k in MEASUREMENT if earlier["settings"][k] != getattr(args, k)]
        if differing or Path(earlier["settings"]["subject"]).name != Path(args.subject).name:
            raise SystemExit(f"{path} was measured with other settings ({differing or 'subject'}); "
                             "rerun it or match them")
        rows.update(earlier["rows"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subject", default=str(REPO / "tests" / "data" / "meshes" / "Duck.glb"))
    parser.add_argument("--prompt", default="a sks toy")
    parser.add_argument("--base", default=str(REPO / "checkpoints" / "tiny"))
    parser.add_argument("--runs", nargs="+", default=[], help="name=pipeline_folder ...")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--objects", type=int, default=24)
    parser.add_argument("--steps", type=int, default=30, help="DDIM steps of multi-view sampling")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--sds-steps", type=int, default=400)
    parser.add_argument("--work", default="outputs/dreambooth_eval")
    parser.add_argument("--out", default=str(RESULTS / "dreambooth.json"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--reuse", nargs="+", default=[],
                        help="earlier results files measured with the same settings: their rows are kept "
                             "and not measured again (so models can be scored by parallel processes)")
    args = parser.parse_args()

    from mvdream_platform import storage
    from mvdream_platform.data import render
    from mvdream_platform.pipelines import MVDreamPipeline

    torch.set_num_threads(max(1, args.threads))
    mesh, _ = render.load_normalized_mesh(args.subject)
    models = {"base": args.base} | dict(item.split("=", 1) for item in args.runs)
    work = Path(args.work)
    rows = reused_rows(args)
    base_pipe = MVDreamPipeline.from_pretrained(args.base)
    for name, path in models.items():
        if name in rows:
            if "weight_distance" not in rows[name]:  # results from before this column existed
                rows[name]["weight_distance"] = weight_distance(MVDreamPipeline.from_pretrained(path), base_pipe)
            continue
        began = time.perf_counter()
        pipe = MVDreamPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        subject_mv, grid = score_multiview(pipe, mesh, args.prompt, args.seeds, args.guidance, args.steps)
        storage.write_bytes(str(work / f"{name}_subject_samples.png"),
                            storage.encode_png((grid * 255).round().clip(0, 255).astype(np.uint8)))
        subject_3d = score_text_to_3d(pipe, mesh, args.prompt, args.sds_steps, work / f"{name}_t23d")
        procedural = score_procedural(pipe, args.objects, args.guidance, args.steps)
        training = {}
        record_file = Path(path).parent / "dreambooth.json"
        if record_file.is_file():
            db = json.loads(record_file.read_text())
            training = {"preservation": db["preservation"], "prior": db.get("prior"), "steps": db["steps"],
                        "final_loss": db["final_metrics"].get("loss"),
                        "preservation_loss": db["final_metrics"].get("preservation_loss")}
        rows[name] = {"model": str(path), "training": training, "weight_distance": weight_distance(pipe, base_pipe),
                      "subject_multiview": subject_mv,
                      "subject_text_to_3d": subject_3d, "procedural": procedural,
                      "seconds": round(time.perf_counter() - began, 1)}
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
    base = rows["base"]["procedural"]
    for row in rows.values():
        row["procedural_change"] = {k: round(row["procedural"][k] - base[k], 4)
                                    for k in ("colour_accuracy", "iou")}
    record = {"machine": describe(),
              "settings": vars(args), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")

    print("| model | lambda | prior | mean abs(theta - theta_0) | subject samples IoU / colour "
          "| subject text-to-3D IoU / colour | procedural colour / IoU (change) |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        p, prior = row["training"].get("preservation"), (row["training"].get("prior") or {})
        mv, t3, pr, d = row["subject_multiview"], row["subject_text_to_3d"], row["procedural"], row["procedural_change"]
        share = f"{prior['fraction']:.0%}" if prior.get("uri") else "-"
        print(f"| {name} | {'-' if p is None else p['weight']} | {share} | {row['weight_distance']:.2e} "
              f"| {mv['iou']:.3f} / {100 * mv['colour_accuracy']:.0f}% "
              f"| {t3['iou']:.3f} / {100 * t3['colour_accuracy']:.0f}% "
              f"| {100 * pr['colour_accuracy']:.1f}% / {pr['iou']:.3f} "
              f"({100 * d['colour_accuracy']:+.1f} pt / {d['iou']:+.3f}) |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
