"""Can a model's camera pathway carry view-dependent content at the noisiest timestep?

A diagnostic for issue 16's negative result (no model places the front marker). At t = T - 1
the pixels of x_t hardly show the object, so only the caption and the camera can say what each
view looks like: the front view of "a red cube with a yellow front" is a yellow face, its back
view a red one. This benchmark asks whether a model's parameterisation lets its weights learn
that at all, in the easiest setting there is: one held-out marked object, its four views at
MVDream azimuths 0 / 90 / 180 / 270, memorised by fine-tuning every weight on

    L = || x0_hat(x_t, t = T - 1, caption, cameras) - x0 ||^2,   x_t = sqrt(abar) x0 + sqrt(1 - abar) eps

with fresh noise eps at each step (so noise cannot name the view), Adam, ``--steps`` steps.
x0_hat is formed from the model's own output (eps: (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar);
v: sqrt(abar) x_t - sqrt(1 - abar) v_hat). Then, on fresh noise, the x0 error with the views'
own cameras is compared with the error when the cameras are turned by 180 degrees:

    camera gain = mse(cameras turned) / mse(own cameras)

1 means the camera did not help tell the views apart; the larger, the more the camera carries.
An eps model at t = T - 1 must put x0 into 1/sqrt(SNR) ~ 1/15 of its output (under SD's
schedule), where a v model of a zero-terminal-SNR schedule outputs -x0 itself.

    .venv/bin/python benchmarks/camera_pathway.py --models checkpoints/tiny [other pipelines]
        [--objects 3] [--steps 100] [--lr 1e-4] [--out results/camera_pathway.json]

``--jointly N [N ...]`` asks the next question: one object can be memorised, but can N at once?
The first N marked objects are memorised together (``--batch`` objects per step, ``--steps``
steps), then the camera gain is measured on those N and on ``--unseen`` marked objects that were
not in the set. If the gain on the memorised set falls as N grows, the weights cannot hold the
caption-times-camera rule for many objects; if it holds but the unseen gain stays at 1, they
memorise objects without learning the rule.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from mvdream_platform.cameras import camera_matrices_to_vectors
from mvdream_platform.diffusion import NoiseSchedule, add_noise, x0_from_prediction
from mvdream_platform.evaluation.consistency import (
    ConsistencySettings,
    consistency_objects,
    render_truth,
    view_cameras,
)
from mvdream_platform.pipelines import MVDreamPipeline

from machine_info import describe

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def _views(pipe, obj, settings):
    """x0 (F, C, h, w), context (F, L, D) of one object's benchmark views."""
    truth = torch.from_numpy(render_truth(obj, settings, pipe.unet.sample_size)).float()
    with torch.no_grad():
        return (pipe.codec.encode(truth.permute(0, 3, 1, 2) * 2 - 1),
                pipe.encode_prompts([obj.caption], settings.num_views))


def _last_step_error(pipe, unet, views: int, generator):
    """error(items, camera): the x0 error at t = T - 1 of [(x0, context), ...] seen with the
    F cameras ``camera`` (F, 16), on fresh noise from ``generator``."""
    schedule = NoiseSchedule.from_scheduler_config(dict(pipe.scheduler.config))
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    t = schedule.num_train_timesteps - 1
    abar = schedule.abar_at(t)

    def error(items, camera) -> torch.Tensor:
        x0 = torch.cat([x for x, _ in items])
        context = torch.cat([c for _, c in items])
        x_t = add_noise(x0, torch.randn(x0.shape, generator=generator), abar)
        out = unet(x_t, torch.full((len(x0),), t), context, camera=camera.repeat(len(items), 1),
                   num_frames=views).sample
        return (x0_from_prediction(out, x_t, abar, prediction_type) - x0).pow(2).mean()

    return error


def _cameras(settings):
    """The benchmark's F camera vectors, and the same turned by 180 degrees (F, 16) each."""
    cams = camera_matrices_to_vectors(view_cameras(settings.num_views, settings.elevation))
    return cams, torch.roll(cams, settings.num_views // 2, dims=0)


def _fit(unet, error, next_items, cams, steps: int, lr: float) -> None:
    """``steps`` Adam steps of ``unet`` on error(next_items(), cams); leaves it in eval mode."""
    optimizer = torch.optim.Adam(unet.parameters(), lr=lr)
    for _ in range(steps):
        loss = error(next_items(), cams)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval()


def _gain(error, items, cams, turned, draws: int) -> dict:
    """x0 error of each item with its own and with turned cameras (``draws`` noises each)."""
    with torch.no_grad():
        own = np.mean([float(error([item], cams)) for item in items for _ in range(draws)])
        away = np.mean([float(error([item], turned)) for item in items for _ in range(draws)])
    return {"mse_own_cameras": round(own, 5), "mse_turned_cameras": round(away, 5),
            "camera_gain": round(away / own, 3)}


def memorise_jointly(pipe, objects, unseen, settings, steps: int, lr: float, batch: int,
                     seed: int) -> dict:
    """Fine-tune a copy of the UNet on ``objects``' views at t = T - 1, ``batch`` objects a step;
    the camera gain on the memorised objects and on ``unseen`` ones."""
    unet = copy.deepcopy(pipe.unet).train()
    cams, turned = _cameras(settings)
    data = [_views(pipe, obj, settings) for obj in objects]
    held = [_views(pipe, obj, settings) for obj in unseen]
    generator = torch.Generator().manual_seed(seed)
    error = _last_step_error(pipe, unet, settings.num_views, generator)
    _fit(unet, error, lambda: [data[i] for i in torch.randperm(len(data), generator=generator)[:batch]],
         cams, steps, lr)
    return {"objects": len(objects), "memorised": _gain(error, data, cams, turned, draws=2),
            "unseen": _gain(error, held, cams, turned, draws=2)}


def memorise(pipe, obj, settings, steps: int, lr: float, seed: int) -> dict:
    """Fine-tune a copy of ``pipe``'s UNet on one object's views at t = T - 1; score it."""
    unet = copy.deepcopy(pipe.unet).train()
    cams, turned = _cameras(settings)  # turned: each view gets the camera 180 degrees away
    item = _views(pipe, obj, settings)
    generator = torch.Generator().manual_seed(seed)
    error = _last_step_error(pipe, unet, settings.num_views, generator)
    _fit(unet, error, lambda: [item], cams, steps, lr)
    return {"caption": obj.caption, **_gain(error, [item], cams, turned, draws=8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[str(REPO / "checkpoints" / "tiny")])
    parser.add_argument("--objects", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--jointly", type=int, nargs="*", default=[],
                        help="set sizes N to memorise together (instead of one object at a time)")
    parser.add_argument("--batch", type=int, default=4, help="objects per step with --jointly")
    parser.add_argument("--unseen", type=int, default=8, help="unseen objects scored with --jointly")
    parser.add_argument("--pool", type=int, default=64,
                        help="--jointly memorises from the first POOL marked objects; the unseen ones "
                             "follow them, so every N and every run scores the same unseen objects")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "camera_pathway.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = describe()
    settings = ConsistencySettings(sets=args.objects)
    if args.jointly:
        joint(args, settings, info)
        return
    objects = consistency_objects("marker", args.objects, settings.shape_seed)
    rows = []
    for model in args.models:
        pipe = MVDreamPipeline.from_pretrained(model)
        config = pipe.scheduler.config
        started = time.perf_counter()
        per_object = [memorise(pipe, obj, settings, args.steps, args.lr, seed=i)
                      for i, obj in enumerate(objects)]
        rows.append({"model": model, "prediction_type": config.get("prediction_type", "epsilon"),
                     "zero_terminal_snr": bool(config.get("rescale_betas_zero_snr", False)),
                     "camera_gain": round(float(np.mean([o["camera_gain"] for o in per_object])), 3),
                     "seconds": round(time.perf_counter() - started, 1), "objects": per_object})
    print("| model | parameterisation | x0 error, own cameras | cameras turned 180 deg | camera gain |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        own = np.mean([o["mse_own_cameras"] for o in row["objects"]])
        away = np.mean([o["mse_turned_cameras"] for o in row["objects"]])
        kind = row["prediction_type"] + (", zero terminal SNR" if row["zero_terminal_snr"] else "")
        print(f"| {row['model']} | {kind} | {own:.4f} | {away:.4f} | {row['camera_gain']:.2f}x |")
    record = {"benchmark": "camera_pathway", "date": time.strftime("%Y-%m-%d"), "machine": info,
              "settings": {"objects": len(objects), "steps": args.steps, "lr": args.lr,
                           "elevation": settings.elevation}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


def joint(args, settings, info) -> None:
    """``--jointly``: camera gain on memorised sets of N objects and on unseen objects."""
    if max(args.jointly) > args.pool:
        raise SystemExit(f"--jointly sizes must be <= --pool {args.pool}, got {args.jointly}")
    pool = consistency_objects("marker", args.pool + args.unseen, settings.shape_seed)
    unseen = pool[args.pool:]
    rows = []
    for model in args.models:
        pipe = MVDreamPipeline.from_pretrained(model)
        for n in args.jointly:
            started = time.perf_counter()
            row = memorise_jointly(pipe, pool[:n], unseen, settings, args.steps, args.lr,
                                   min(args.batch, n), seed=n)
            row.update(model=model, seconds=round(time.perf_counter() - started, 1))
            rows.append(row)
            print(f"{model} N={n}: memorised gain {row['memorised']['camera_gain']:.2f}x, "
                  f"unseen {row['unseen']['camera_gain']:.2f}x ({row['seconds']} s)", flush=True)
    print("| model | objects memorised together | camera gain, memorised | camera gain, unseen |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['model']} | {row['objects']} | {row['memorised']['camera_gain']:.2f}x | "
              f"{row['unseen']['camera_gain']:.2f}x |")
    record = {"benchmark": "camera_pathway_jointly", "date": time.strftime("%Y-%m-%d"),
              "machine": info, "settings": {"steps": args.steps, "lr": args.lr, "batch": args.batch,
                                           "unseen": args.unseen, "pool": args.pool,
                                           "elevation": settings.elevation},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
