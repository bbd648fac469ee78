"""How much does a multi-view model's prediction move when only the cameras turn?

A diagnostic for issue 16's negative result (the model paints a front marker in every view):
for marked captions ("a red cube with a yellow front") and fixed noisy inputs x_t, the UNet's
epsilon prediction is computed with the views' own cameras (MVDream azimuths 0, 90, 180, 270)
and again with the cameras turned by ``--turn`` degrees (the same images, the same caption, the
same t: only the camera vectors differ). The relative change

    camera effect = ||eps(x_t, c, cams + turn) - eps(x_t, c, cams)|| / ||eps(x_t, c, cams)||

is reported beside two reference scales measured on the same inputs: the effect of changing
the caption's *marker colour* ("... with a blue front") and of dropping the camera altogether
(``camera=None``, the 2D path). A model whose cameras matter for view-dependent content should
move clearly when its cameras turn; one that ignores them moves about as little as it would
for no camera at all. Inputs are built from our own renders of the held-out marked objects
(``evaluation.consistency``'s marked set) noised to each of ``--timesteps``.

A model's output (eps, v or x0, the scheduler config's ``prediction_type``) is turned into
its eps and its x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), and the three effects are
reported on both: eps compares models of one parameterisation at moderate t (the table's
first numbers); x0, "how much the model's picture of the clean views moves", is the one that
compares an eps model with a v model and stays meaningful near t = T, where eps ~ x_t for
every model (``--timesteps 949 899 750 500``; a zero-terminal-SNR schedule has abar = 0 at
t = T - 1, where x0 cannot be formed from eps).

    .venv/bin/python benchmarks/camera_sensitivity.py [--model checkpoints/tiny] [--objects 16]
        [--timesteps 250 500 750] [--turn 180] [--out results/camera_sensitivity.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mvdream_platform.cameras import get_camera
from mvdream_platform.data.shapes import COLOURS
from mvdream_platform.diffusion import NoiseSchedule, eps_from_prediction, x0_from_eps
from mvdream_platform.evaluation.consistency import (
    ConsistencySettings,
    consistency_objects,
    render_truth,
)
from mvdream_platform.pipelines import MVDreamPipeline

from machine_info import describe

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def other_colour(caption: str, colour: str) -> str:
    """The caption with its marker colour replaced by another colour of the vocabulary."""
    for candidate in COLOURS:
        if candidate != colour and f" {candidate} front" not in caption:
            return caption.replace(f" {colour} front", f" {candidate} front")
    raise ValueError(f"no other colour for {caption!r}")


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "checkpoints" / "tiny"))
    parser.add_argument("--objects", type=int, default=16)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[250, 500, 750])
    parser.add_argument("--turn", type=float, default=180.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "camera_sensitivity.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = describe()

    pipe = MVDreamPipeline.from_pretrained(args.model)
    unet, scheduler = pipe.unet, pipe.scheduler
    settings = ConsistencySettings(sets=args.objects)
    objects = consistency_objects("marker", args.objects, settings.shape_seed)
    resolution = unet.sample_size  # pixels (pixel-space model; the codec scales latents)
    views = 4
    cams = get_camera(views, elevation=settings.elevation)
    turned = get_camera(views, elevation=settings.elevation, azimuth_start=args.turn)
    generator = torch.Generator().manual_seed(0)
    schedule = NoiseSchedule.from_scheduler_config(dict(scheduler.config))
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    for t in args.timesteps:
        if schedule.abar_at(t) <= 0.0:
            raise ValueError(f"abar_t = 0 at t = {t} (zero terminal SNR): x0 cannot be formed "
                             f"from eps there; pass timesteps below {t}")
    keys = ("camera_turned", "marker_colour", "no_camera")
    effects = {space: {k: [] for k in keys} for space in ("eps", "x0")}
    per_t = {space: {t: {k: [] for k in keys} for t in args.timesteps} for space in effects}
    for obj in objects:
        truth = torch.from_numpy(render_truth(obj, settings, resolution)).float()  # (F, H, W, 3) in [0, 1]
        x0 = pipe.codec.encode(truth.permute(0, 3, 1, 2) * 2 - 1)
        front = obj.attributes["parts"][0]["front"]
        texts = {"caption": obj.caption, "other": other_colour(obj.caption, front)}
        embeds = {k: pipe.encode_prompts([v], views) for k, v in texts.items()}
        for t in args.timesteps:
            abar = schedule.abar_at(t)
            noise = torch.randn(x0.shape, generator=generator)
            x_t = scheduler.add_noise(x0, noise, torch.tensor([t]))
            timestep = torch.full((views,), t)

            def predict(text: str, camera, x_t=x_t, timestep=timestep, embeds=embeds, abar=abar):
                out = unet(x_t, timestep, embeds[text], camera=camera, num_frames=views).sample
                eps = eps_from_prediction(out, x_t, abar, prediction_type)
                return {"eps": eps, "x0": x0_from_eps(x_t, eps, abar)}

            base = predict("caption", cams)
            moved = {"camera_turned": predict("caption", turned), "marker_colour": predict("other", cams),
                     "no_camera": predict("caption", None)}
            for key, value in moved.items():
                for space in effects:
                    effect = float((value[space] - base[space]).norm() / base[space].norm())
                    effects[space][key].append(effect)
                    per_t[space][t][key].append(effect)
    summary = {space: {key: round(float(np.mean(v)), 4) for key, v in d.items()} for space, d in effects.items()}
    by_t = {space: {t: {key: round(float(np.mean(v)), 4) for key, v in d.items()} for t, d in table.items()}
            for space, table in per_t.items()}
    for space in effects:
        print(f"relative change of {space} over {len(objects)} marked objects x {len(args.timesteps)} timesteps:")
        print(f"| t | cameras turned by {args.turn:g} deg | marker colour changed | no camera |")
        print("| --- | --- | --- | --- |")
        for t, d in list(by_t[space].items()) + [("all", summary[space])]:
            print(f"| {t} | {d['camera_turned']:.4f} | {d['marker_colour']:.4f} | {d['no_camera']:.4f} |")
    record = {"benchmark": "camera_sensitivity", "date": time.strftime("%Y-%m-%d"), "machine": info,
              "settings": {"model": args.model, "objects": len(objects), "timesteps": args.timesteps,
                           "turn_deg": args.turn, "elevation": settings.elevation,
                           "prediction_type": prediction_type},
              "summary": summary["eps"], "by_timestep": by_t["eps"],
              "summary_x0": summary["x0"], "by_timestep_x0": by_t["x0"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
