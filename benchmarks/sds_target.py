"""Where does score distillation pull the front marker? The SDS target on known renders.

A diagnostic for issue 16's Janus runs, in which score distillation drops the front marker
(verdict ``none``) although the prior draws it when it samples views. The reconstruction-loss
gradient of one step is ``z - x0_hat`` (:mod:`mvdream_platform.sds.guidance`), so over the noise
the field moves towards the *mean target* E_eps[x0_hat | z, t]. This script feeds the guidance
renders whose answer is known and reads the marker colour off that mean target:

* ``keep``: ground-truth renders of held-out marked objects (``evaluation.consistency``'s marked
  set, 4 views at MVDream azimuths 0 / 90 / 180 / 270, elevation 15). A guidance that keeps a
  correct object keeps the marker in the front view's target and none at the back.
* ``create``: the same objects with the marker painted in the body's colour, i.e. what the field
  looks like after the blob has taken the body colour. To grow a marker from there the target's
  front view has to hold marker colour that the render does not; a 2D prior without the camera
  would put it on the back too.

Both are composited over a background (``--backgrounds``): mid-grey; one grey level per object
(what the model was trained on); or one RGB colour per object (what half of the text-to-3D
steps render over, the reference's random background). For each setting and timestep t the
target is averaged over ``--draws`` noise draws (the same draws for every setting), and each
view's marker share is read inside the true silhouette less its one-pixel rim: the share of
those pixels whose nearest shaded palette colour is the marker's (as the consistency
benchmark reads samples, with the silhouette known).

Settings (declared before measuring, none tuned on the Janus runs): the shipped multi-view and
DreamFusion-style guidances (``conf/sds/tiny.yaml``: CFG 7.5, std rescale 0.5, empty negative
prompt), and each with one change: CFG 2 (the scale the model samples views with in the
held-out evaluation and the consistency benchmark) or 15, no std rescale, or the prompt without
its marker clause as the negative prompt (``contrast``: eps_hat = eps(no marker) + s (eps(prompt)
- eps(no marker)), so the CFG direction is the marker alone).

    .venv/bin/python benchmarks/sds_target.py [--model checkpoints/tiny] [--objects 12]
        [--draws 4] [--timesteps 900 700 500 300 100] [--backgrounds grey random_rgb]
        [--variants shipped cfg2] [--guidances mvdream dreamfusion] [--out results/sds_target.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from scipy import ndimage

from mvdream_platform.data.shapes import build_mesh, caption_for
from mvdream_platform.evaluation.consistency import (
    ConsistencySettings,
    consistency_objects,
    palette_names,
    view_cameras,
)
from mvdream_platform.evaluation.models import render_ground_truth_rgba
from mvdream_platform.pipelines import MVDreamPipeline
from mvdream_platform.sds.config import SDSConfig
from mvdream_platform.sds.guidance import DreamFusionGuidance, GuidanceConfig, MultiViewGuidance

from machine_info import describe

ROOT = Path(__file__).resolve().parent
GUIDANCES = {"mvdream": MultiViewGuidance, "dreamfusion": DreamFusionGuidance}
BACKGROUNDS = ("grey", "random_grey", "random_rgb")
VARIANTS = {
    "shipped": {},
    "cfg2": {"guidance_scale": 2.0},
    "cfg15": {"guidance_scale": 15.0},
    "no_rescale": {"recon_std_rescale": 0.0},
    "contrast": {"negative_prompt": "<unmarked caption>"},
}


def plain_version(obj):
    """The object with its marker painted in the body colour, and its caption without it."""
    attributes = dict(obj.attributes)
    attributes["parts"] = [dict(p, front=None, front_rgb=None) for p in obj.attributes["parts"]]
    mesh, _ = build_mesh(attributes)
    return dataclasses.replace(obj, mesh=mesh, attributes=attributes,
                               caption=caption_for(attributes))


def background_colour(kind: str, index: int) -> np.ndarray:
    """(3,) the background of object ``index``: mid-grey; a grey level ~ U[0, 1] (what the
    training data is composited over, ``data/datasets.py``); or an RGB colour ~ U[0, 1]^3
    (what half of the text-to-3D steps render over, ``sds.shading.random_background_color``)."""
    generator = np.random.default_rng(index)
    if kind == "grey":
        return np.full(3, 0.5)
    if kind == "random_grey":
        return np.full(3, generator.uniform())
    return generator.uniform(size=3)


def marker_shares(images: np.ndarray, inner: np.ndarray, marker: str) -> list[float]:
    """Per view, the share of the object's inner pixels (``inner`` (V, H, W) bool: the true
    silhouette less its one-pixel rim) whose nearest shaded palette colour is the marker's."""
    return [float((palette_names(image[mask]) == marker).mean()) if mask.any() else 0.0
            for image, mask in zip(images, inner)]


def mean_target(guidance, views: np.ndarray, c2w: torch.Tensor, prompt: str, t: int,
                draws: int, seed: int) -> np.ndarray:
    """(V, H, W, 3) in [0, 1]: the guidance's target x0_hat at timestep t, averaged over
    ``draws`` noise draws (draw k uses seed + k whatever the setting), decoded to pixels.
    Pins the guidance's timestep bounds to t (its config is changed in place)."""
    T = guidance.schedule.num_train_timesteps
    guidance.config.min_step_percent_start = guidance.config.min_step_percent_end = t / T
    guidance.config.max_step_percent_start = guidance.config.max_step_percent_end = t / T
    rgb = torch.from_numpy(views).float()
    total = None
    for k in range(draws):
        out = guidance(rgb, c2w, prompt, 0, torch.Generator().manual_seed(seed + k))
        assert out.t == t, (out.t, t)
        total = out.target if total is None else total + out.target
    with torch.no_grad():
        images = guidance.codec.decode((total / draws).to(guidance.codec.dtype)).float()
    return ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()


def score_setting(guidance, variant: str, cases: list, views: dict, c2w: torch.Tensor, t: int,
                  draws: int) -> dict[str, list[float]]:
    """``{"keep_share_per_view": (V,), "create_share_per_view": (V,)}``: the marker share of the
    mean target per view at t, averaged over the objects (``cases`` and ``views`` as in
    :func:`main`)."""
    per_start = {"keep": [], "create": []}
    for i, (caption, plain_caption, marker, inner, _) in enumerate(cases):
        if variant == "contrast":
            guidance.config.negative_prompt = plain_caption
        for start_name, shares in per_start.items():
            target = mean_target(guidance, views[i, start_name], c2w, caption, t, draws, 0)
            shares.append(marker_shares(target, inner, marker))
    return {f"{name}_share_per_view": np.mean(shares, 0).round(4).tolist()
            for name, shares in per_start.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT.parent / "checkpoints" / "tiny"))
    parser.add_argument("--sds-config", default=str(ROOT.parent / "conf" / "sds" / "tiny.yaml"))
    parser.add_argument("--objects", type=int, default=12)
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[900, 700, 500, 300, 100])
    parser.add_argument("--guidances", nargs="+", default=list(GUIDANCES), choices=list(GUIDANCES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--backgrounds", nargs="+", default=["grey"], choices=list(BACKGROUNDS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "sds_target.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    pipe = MVDreamPipeline.from_pretrained(args.model)
    shipped = SDSConfig.from_dict(OmegaConf.to_container(OmegaConf.load(args.sds_config),
                                                        resolve=True)).guidance
    settings = ConsistencySettings(sets=args.objects, kinds=("marker",))
    size = pipe.default_size
    c2w = view_cameras(settings.num_views, settings.elevation)
    objects = consistency_objects("marker", args.objects, settings.shape_seed)
    cases = []  # per object: caption, plain caption, marker, inner mask, {start: (rgb, alpha)}
    for obj in objects:
        plain = plain_version(obj)
        renders = {"keep": render_ground_truth_rgba(obj, settings, size),
                   "create": render_ground_truth_rgba(plain, settings, size)}
        alpha = renders["keep"][1]
        inner = np.stack([ndimage.binary_erosion(a > 0.5) for a in alpha])
        cases.append((obj.caption, plain.caption, obj.attributes["parts"][0]["front"], inner, renders))

    rows, inputs = [], {}
    for background in args.backgrounds:
        views = {}  # (object index, start) -> (V, H, W, 3) composited renders
        for i, (*_, renders) in enumerate(cases):
            colour = background_colour(background, i)
            for start_name, (rgb, alpha) in renders.items():
                views[i, start_name] = rgb * alpha[..., None] + colour * (1 - alpha[..., None])
        inputs[background] = {name: np.mean([marker_shares(views[i, name], c[3], c[2])
                                             for i, c in enumerate(cases)], 0).round(4).tolist()
                              for name in ("keep", "create")}
        for guidance_name in args.guidances:
            for variant in args.variants:
                # One guidance per setting (its text cache then encodes each caption once);
                # mean_target pins its timestep, `contrast` sets its negative prompt per object.
                fields = dict(dataclasses.asdict(shipped), **VARIANTS[variant])
                guidance = GUIDANCES[guidance_name](pipe, GuidanceConfig(**fields))
                for t in args.timesteps:
                    row = {"background": background, "guidance": guidance_name, "variant": variant,
                           "t": t, **score_setting(guidance, variant, cases, views, c2w, t, args.draws)}
                    rows.append(row)
                    print(f"{background:11s} {guidance_name:11s} {variant:10s} t={t:4d}  keep "
                          f"{row['keep_share_per_view']}  create {row['create_share_per_view']}",
                          flush=True)

    print(f"input renders' marker share per view: {inputs}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "sds_target", "date": time.strftime("%Y-%m-%d"), "machine": describe(),
        "settings": {"model": args.model, "sds_config": args.sds_config, "objects": len(cases),
                     "draws": args.draws, "timesteps": args.timesteps,
                     "variants": {v: VARIANTS[v] for v in args.variants},
                     "backgrounds": args.backgrounds,
                     "views": "MVDream azimuths 0 / 90 / 180 / 270, elevation 15",
                     "captions": [c[0] for c in cases]},
        "input_share_per_view": inputs, "rows": rows,
        "seconds": round(time.perf_counter() - start, 1)}, indent=1) + "\n")
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
