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

``--views`` and ``--t-low`` move the memorising, one difference at a time, toward what training
shows (the scoring never changes: benchmark cameras, t = T - 1, mid-grey):

- ``fixed`` (default): the four benchmark cameras, azimuths 0 / 90 / 180 / 270, elevation 15;
- ``start``: each object rendered at 32 azimuths (the benchmark's elevation, fov and distance),
  each step's views evenly spaced from a random start, as ``MultiViewDataset`` picks them;
- ``start --vary elevation zoom light background`` (any of them): as ``start``, with each
  object's elevation, fov and distance ("zoom") and light drawn as ``jobs/prepare_data.py``
  draws them, and a random grey background per item, as ``MultiViewDataset`` draws it;
- ``training``: ``start`` with all four varied;
- ``--t-low L``: t uniform in [L, T - 1] per item instead of t = T - 1;
- ``--t-mix P``: a share P of each step's objects at t uniform in [0, T - 1], the rest at T - 1,
  fitted with the training loss, as a training batch mixes them;
- ``loader --data URI``: the training job's own batches (``MixtureLoader.from_uris`` on a
  prepared multi-view folder, multi-view steps only, captions encoded per view as
  ``training.loop`` encodes them): every object of the world, marked or not, open captions and
  composites included. N is then the world's size, not a memorised set, and the "memorised"
  column is not scored. It asks whether what stops a real fine-tune is the data or the loop.

``--weight-decay --grad-clip --warmup-steps --text-dropout --ema-decay`` (default off: plain
Adam) take up the training loop's other choices, each through the loop's own code
(``training.optim``, ``training.losses.drop_text``), with the meaning of the ``trainer.*`` key of
the same name; the row records the gradient norm's median and the share of clipped steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from mvdream_platform.cameras import (
    camera_matrices_to_vectors,
    mvdream_to_orbit_azimuth,
    orbit_camera_to_world,
)
from mvdream_platform.data import render
from mvdream_platform.data.datasets import multiview_item
from mvdream_platform.data.layout import ObjectRecord
from mvdream_platform.data.prepare import ObjectSpec, RenderSettings, object_cameras
from mvdream_platform.diffusion import NoiseSchedule, add_noise, x0_from_prediction
from mvdream_platform.evaluation.consistency import (
    ConsistencySettings,
    consistency_objects,
    render_truth,
    view_cameras,
)
from mvdream_platform.pipelines import MVDreamPipeline
from mvdream_platform.training.losses import diffusion_loss, drop_text, timestep_weights
from mvdream_platform.training.optim import EMA, build_lr_scheduler, build_optimizer, clip_grad_norm

from machine_info import describe

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def _views(pipe, obj, settings):
    """x0 (F, C, h, w), context (F, L, D), cameras (F, 16) of one object's benchmark views."""
    truth = torch.from_numpy(render_truth(obj, settings, pipe.unet.sample_size)).float()
    with torch.no_grad():
        return (pipe.codec.encode(truth.permute(0, 3, 1, 2) * 2 - 1),
                pipe.encode_prompts([obj.caption], settings.num_views), _cameras(settings))


VARIED = ("elevation", "zoom", "light", "background")


class _Orbit:
    """One object rendered at 32 azimuths; ``item(generator)`` draws a training-style group of
    F views evenly spaced from a random start (``datasets.multiview_item``), encoded:
    (x0 (F, C, h, w), context (F, L, D), cameras (F, 16)).

    ``vary``: which of VARIED are drawn as training draws them (per object, as
    ``jobs/prepare_data.py``: elevation in 0-30, fov and distance ("zoom"), light; per item, as
    ``MultiViewDataset``: a random grey background); the rest keep the benchmark's values
    (elevation 15, fov 37.5, fill 1.075, the default light, mid-grey)."""

    def __init__(self, pipe, obj, index: int, settings, vary: tuple[str, ...]):
        size = pipe.unet.sample_size
        drawn = object_cameras(ObjectSpec(f"pathway-{index:06d}", "shape", index),
                               RenderSettings(resolution=size))
        elevation = drawn["elevation_deg"] if "elevation" in vary else settings.elevation
        if "zoom" in vary:
            fovy, distance = drawn["fovy_deg"], drawn["distance"]
        else:
            fovy = settings.gt_fovy_deg
            distance = render.distance_to_fit(fovy, settings.gt_fill)
        light = render.random_light(drawn["light_seed"]) if "light" in vary else None
        azimuths = np.arange(32) * 360.0 / 32
        c2w = orbit_camera_to_world(elevation, mvdream_to_orbit_azimuth(azimuths), distance)
        rgba = render.render_views(obj.mesh, c2w, fovy, size, light=light, antialias=2)
        self.rgba = torch.from_numpy(rgba).permute(0, 3, 1, 2).float() / 255  # (32, 4, S, S)
        self.record = ObjectRecord(object_id=f"pathway-{index:06d}", caption=obj.caption,
                                   attributes={}, resolution=size, azimuths_deg=azimuths.tolist(),
                                   elevation_deg=elevation, fovy_deg=fovy, distance=distance,
                                   camera_to_world=c2w.tolist())
        self.background = None if "background" in vary else (0.5, 0.5, 0.5)
        self.pipe, self.views = pipe, settings.num_views
        with torch.no_grad():
            self.context = pipe.encode_prompts([obj.caption], settings.num_views)

    def item(self, generator: torch.Generator):
        u_start, u_grey = torch.rand(2, generator=generator).tolist()
        got = multiview_item(self.record, lambda v: self.rgba[v], u_start, u_grey, self.views,
                             self.record.resolution, self.background)
        with torch.no_grad():
            return self.pipe.codec.encode(got["images"]), self.context, got["cameras"]


def _last_step_error(pipe, unet, views: int, generator, t_low: int | None = None,
                     t_mix: float = 0.0):
    """error(items, turned=False): the x0 error of [(x0, context, cameras), ...] at t = T - 1
    (or, with ``t_low``, at one t per item drawn uniformly from [t_low, T - 1]; with ``t_mix``,
    that share of the objects at t uniform in [0, T - 1] instead, as a training batch mixes
    them; the loss is then the training loss, the v or eps error, not the x0 error), each item
    seen with its own F cameras, or with them turned by 180 degrees (rolled by F / 2), on
    fresh noise from ``generator``."""
    schedule = NoiseSchedule.from_scheduler_config(dict(pipe.scheduler.config))
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    last = schedule.num_train_timesteps - 1
    # t = T - 1 with probability 1 - t_mix, else uniform on {0, ..., T - 1}: the "range" bias
    # [T - 1, T) of the training job with the multiplier m that gives
    # p(T - 1) = m / (T - 1 + m) = 1 - t_mix + t_mix / T.
    mix_weights = None
    if t_mix:
        if not 0.0 < t_mix <= 1.0:
            raise ValueError(f"t_mix must be in (0, 1], got {t_mix!r}")
        p_last = 1.0 - t_mix + t_mix / schedule.num_train_timesteps
        mix_weights = timestep_weights(schedule.num_train_timesteps, [last, last + 1],
                                       last * p_last / (1.0 - p_last))

    def error(items, turned: bool = False) -> torch.Tensor:
        x0 = torch.cat([x for x, _, _ in items])
        context = torch.cat([c for _, c, _ in items])
        camera = torch.cat([torch.roll(cam, views // 2, dims=0) if turned else cam
                            for _, _, cam in items])
        if t_mix:  # the training job's own loss and timestep draw, not a copy of them
            return diffusion_loss(unet, x0, context, camera, views, schedule, prediction_type,
                                  generator=generator, t_weights=mix_weights)[0]
        if t_low is None:
            t, abar = torch.full((len(x0),), last), schedule.abar_at(last)
        else:
            t = torch.randint(t_low, last + 1, (len(items),), generator=generator)
            t = t.repeat_interleave(views)
            abar = schedule.abar(t).view(-1, 1, 1, 1).to(x0.dtype)
        x_t = add_noise(x0, torch.randn(x0.shape, generator=generator), abar)
        out = unet(x_t, t, context, camera=camera, num_frames=views).sample
        return (x0_from_prediction(out, x_t, abar, prediction_type) - x0).pow(2).mean()

    return error


def _cameras(settings):
    """The benchmark's F camera vectors (F, 16)."""
    return camera_matrices_to_vectors(view_cameras(settings.num_views, settings.elevation))


@dataclass(frozen=True)
class LoopChoices:
    """The training loop's choices the diagnostic can take up one at a time (all off: plain Adam,
    as the diagnostic was first run). Each is the loop's own code (``training.optim``,
    ``training.losses.drop_text``) with the same meaning as the ``trainer.*`` key of that name."""

    weight_decay: float = 0.0   # AdamW decay on >= 2-D weights (build_optimizer; 0 = Adam)
    grad_clip: float = 0.0      # global-norm clipping (clip_grad_norm; 0 = off)
    warmup_steps: int = 0       # linear warmup, then constant (build_lr_scheduler)
    text_dropout: float = 0.0   # empty caption per object (drop_text)
    ema_decay: float = 0.0      # scored on the EMA weights (EMA; 0 = off)


def _fit(unet, error, next_items, steps: int, lr: float, loop: LoopChoices = LoopChoices(),
         empty: torch.Tensor | None = None, generator: torch.Generator | None = None,
         views: int = 4) -> dict:
    """``steps`` optimizer steps of ``unet`` on error(next_items()) with the ``loop`` choices;
    leaves it in eval mode (holding the EMA weights when ``loop.ema_decay``). ``empty``: the
    (1, L, D) context of "" for text dropout. Returns the gradient norms' summary."""
    optimizer = build_optimizer(unet, lr=lr, weight_decay=loop.weight_decay)
    schedule = build_lr_scheduler(optimizer, warmup_steps=loop.warmup_steps)
    ema = EMA(unet, decay=loop.ema_decay) if loop.ema_decay else None
    norms = []
    for _ in range(steps):
        items = next_items()
        if loop.text_dropout:
            items = [_drop_caption(item, loop.text_dropout, empty, generator, views)
                     for item in items]
        loss = error(items)
        optimizer.zero_grad()
        loss.backward()
        norms.append(clip_grad_norm(unet, loop.grad_clip))
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.update(unet)
    if ema is not None:
        ema.copy_to(unet)
    unet.eval()
    norms = np.asarray(norms)
    return {"grad_norm_median": round(float(np.median(norms)), 3) if len(norms) else None,
            "share_clipped": (round(float(np.mean(norms > loop.grad_clip)), 3)
                              if loop.grad_clip and len(norms) else None)}


def _drop_caption(item, p: float, empty: torch.Tensor, generator: torch.Generator, views: int):
    """(x0, context, cameras) of B*F views with each object's (F, L, D) context replaced by that
    of "" with probability p, all of its views together: the draw ``drop_text`` makes."""
    x0, context, cameras = item
    kept = drop_text(["kept"] * len(x0), p, generator, num_frames=views)
    keep = torch.tensor([c != "" for c in kept]).view(-1, 1, 1)
    return x0, torch.where(keep, context, empty.expand_as(context)), cameras


def _gain(error, items, draws: int) -> dict:
    """x0 error of each item with its own and with turned cameras (``draws`` noises each)."""
    with torch.no_grad():
        own = np.mean([float(error([item])) for item in items for _ in range(draws)])
        away = np.mean([float(error([item], turned=True)) for item in items for _ in range(draws)])
    return {"mse_own_cameras": round(own, 5), "mse_turned_cameras": round(away, 5),
            "camera_gain": round(away / own, 3)}


def memorise_jointly(pipe, objects, unseen, settings, steps: int, lr: float, batch: int,
                     seed: int, views: str = "fixed", t_low: int | None = None,
                     vary: tuple[str, ...] = (), save: Path | None = None,
                     data_uri: str | None = None, t_mix: float = 0.0,
                     loop: LoopChoices = LoopChoices()) -> dict:
    """Fine-tune a copy of the UNet on ``objects``' views (``views``: fixed / start / training,
    see the module docstring), ``batch`` objects a step, at t = T - 1 or t in [t_low, T - 1];
    the camera gain at t = T - 1 on the memorised objects' benchmark views and on ``unseen``."""
    unet = copy.deepcopy(pipe.unet).train()
    data = [_views(pipe, obj, settings) for obj in objects]
    held = [_views(pipe, obj, settings) for obj in unseen]
    generator = torch.Generator().manual_seed(seed)
    if views == "fixed":
        def draw(i):
            return data[i]
    elif views == "loader":
        world, batches = _loader_batches(pipe, data_uri, settings.num_views, batch, seed)
    else:
        vary = VARIED if views == "training" else tuple(vary)
        orbits = [_Orbit(pipe, obj, i, settings, vary) for i, obj in enumerate(objects)]

        def draw(i):
            return orbits[i].item(generator)
    fit_error = _last_step_error(pipe, unet, settings.num_views, generator, t_low, t_mix)
    if views == "loader":
        def next_items():
            return [next(batches)]
    else:
        def next_items():
            return [draw(int(i)) for i in torch.randperm(len(data), generator=generator)[:batch]]
    with torch.no_grad():
        empty = pipe.encode_prompts([""], 1) if loop.text_dropout else None
    fitted = _fit(unet, fit_error, next_items, steps, lr, loop, empty, generator, settings.num_views)
    error = _last_step_error(pipe, unet, settings.num_views, generator)
    if save:  # the memorised model as a pipeline, for benchmarks/consistency.py and marker_fit.py
        MVDreamPipeline(unet=unet, text_encoder=pipe.text_encoder, codec=pipe.codec,
                        scheduler=pipe.scheduler).save_pretrained(save)
    return {"objects": world if views == "loader" else len(objects), "views": views,
            "t_low": t_low, "t_mix": t_mix, "loop": asdict(loop), **fitted,
            "vary": [] if views == "fixed" else list(vary),
            "memorised": None if views == "loader" else _gain(error, data, draws=2),
            "unseen": _gain(error, held, draws=2)}


def _loader_batches(pipe, data_uri: str, views: int, batch: int, seed: int):
    """(number of objects in ``data_uri``, an iterator of the training job's multi-view batches
    as (x0, context, cameras) tuples of ``batch`` objects each, views contiguous per object, as
    ``training.loop`` builds them)."""
    from mvdream_platform.data.mixture import MULTIVIEW, MixtureLoader

    loader = MixtureLoader.from_uris(data_uri, None, resolution=pipe.unet.sample_size,
                                     num_views=views, seed=seed, multiview_batch=batch,
                                     image_batch=1, p_multiview=1.0, rank=0, world_size=1,
                                     num_workers=0)

    def encoded():
        for got in loader:
            with torch.no_grad():  # yield outside it: a generator suspended inside no_grad
                item = (pipe.codec.encode(got.images),  # leaves grad mode off in its caller
                        pipe.text_encoder.encode(got.captions), got.cameras)
            yield item

    return len(loader.datasets[MULTIVIEW]), encoded()


def memorise(pipe, obj, settings, steps: int, lr: float, seed: int) -> dict:
    """Fine-tune a copy of ``pipe``'s UNet on one object's views at t = T - 1; score it."""
    unet = copy.deepcopy(pipe.unet).train()
    item = _views(pipe, obj, settings)
    generator = torch.Generator().manual_seed(seed)
    error = _last_step_error(pipe, unet, settings.num_views, generator)
    _fit(unet, error, lambda: [item], steps, lr)
    return {"caption": obj.caption, **_gain(error, [item], draws=8)}


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
    parser.add_argument("--views", choices=("fixed", "start", "training", "loader"), default="fixed",
                        help="--jointly: which views are memorised (module docstring)")
    parser.add_argument("--vary", nargs="*", choices=VARIED, default=[],
                        help="--views start: which training draws to add (training = all four)")
    parser.add_argument("--data", default=None,
                        help="--views loader: the prepared multi-view folder the training reads")
    parser.add_argument("--t-low", type=int, default=None,
                        help="--jointly: memorise at t uniform in [T_LOW, T - 1] (default: T - 1)")
    parser.add_argument("--t-mix", type=float, default=0.0,
                        help="--jointly: this share of each step's objects at t uniform in "
                             "[0, T - 1], the rest at T - 1, fitted with the training loss")
    loop = parser.add_argument_group("the training loop's choices, for --jointly (default: off)")
    for field in fields(LoopChoices):
        loop.add_argument("--" + field.name.replace("_", "-"), type=int if field.type == "int" else float,
                          default=field.default, help=f"as trainer.{field.name}")
    parser.add_argument("--save", type=Path, default=None,
                        help="--jointly: save each memorised model as a pipeline in SAVE/N<n>")
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
    if args.views == "loader" and not args.data:
        raise SystemExit("--views loader needs --data (a prepared multi-view folder)")
    if args.views != "loader" and max(args.jointly) > args.pool:
        raise SystemExit(f"--jointly sizes must be <= --pool {args.pool}, got {args.jointly}")
    loop = LoopChoices(**{f.name: getattr(args, f.name) for f in fields(LoopChoices)})
    pool = consistency_objects("marker", args.pool + args.unseen, settings.shape_seed)
    unseen = pool[args.pool:]
    rows = []
    for model in args.models:
        pipe = MVDreamPipeline.from_pretrained(model)
        for n in args.jointly:
            started = time.perf_counter()
            loader = args.views == "loader"
            row = memorise_jointly(pipe, [] if loader else pool[:n], unseen, settings, args.steps,
                                   args.lr, args.batch if loader else min(args.batch, n), seed=n,
                                   views=args.views, t_low=args.t_low, vary=tuple(args.vary),
                                   save=args.save / f"N{n}" if args.save else None,
                                   data_uri=args.data, t_mix=args.t_mix, loop=loop)
            row.update(model=model, seconds=round(time.perf_counter() - started, 1))
            rows.append(row)
            memorised = row["memorised"]["camera_gain"] if row["memorised"] else float("nan")
            print(f"{model} N={n}: memorised gain {memorised:.2f}x, "
                  f"unseen {row['unseen']['camera_gain']:.2f}x ({row['seconds']} s)", flush=True)
    print("| model | objects memorised together | camera gain, memorised | camera gain, unseen |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        memorised = f"{row['memorised']['camera_gain']:.2f}x" if row["memorised"] else "-"
        print(f"| {row['model']} | {row['objects']} | {memorised} | "
              f"{row['unseen']['camera_gain']:.2f}x |")
    record = {"benchmark": "camera_pathway_jointly", "date": time.strftime("%Y-%m-%d"),
              "machine": info, "settings": {"steps": args.steps, "lr": args.lr, "batch": args.batch,
                                           "unseen": args.unseen, "pool": args.pool,
                                           "elevation": settings.elevation, "views": args.views,
                                           "vary": args.vary, "t_low": args.t_low,
                                           "data": args.data, "t_mix": args.t_mix,
                                           "loop": asdict(loop)},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
