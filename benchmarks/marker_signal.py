"""Can the noisy image itself tell where the front marker is? The ideal observer's d'(t).

A diagnostic for issue 16's negative result (no model places the front marker). A camera can
only be learned as the cause of view-dependent content if training ever shows the model an
input x_t whose own pixels leave that content undecided: where x_t already reveals the marker,
copying it out of x_t solves the loss and the camera earns no gradient.

For each held-out marked object (``evaluation.consistency``'s marked set) the front view
(MVDream azimuth 0, the benchmark's camera) is rendered twice, with its marker (x0_m) and with
the marker painted in the body's colour (x0_b), both in [-1, 1] on mid-grey. Telling the two
apart from x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps is a Gaussian detection problem whose
ideal (likelihood-ratio) observer has the sensitivity

    d'(t) = sqrt(SNR_t) ||x0_m - x0_b||,      SNR_t = abar_t / (1 - abar_t),

and errs with probability Phi(-d'/2). d' >> 1 means the pixels decide the marker's presence
at that t; d' << 1 means only the conditioning (caption and camera) can. Reported for the
schedule of each given scheduler config at the training timesteps a sampler visits first
(t = T - 1, ...), with and without zero-terminal-SNR rescaling (Lin et al. 2024,
``rescale_betas_zero_snr``), at which d'(T - 1) = 0 by construction.

    .venv/bin/python benchmarks/marker_signal.py [--objects 64] [--resolution 32]
        [--timesteps 999 949 899 799 599] [--out results/marker_signal.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
from scipy.stats import norm

from mvdream_platform.data.shapes import build_mesh
from mvdream_platform.diffusion import NoiseSchedule
from mvdream_platform.evaluation.consistency import (
    ConsistencySettings,
    consistency_objects,
    render_truth,
)
from mvdream_platform.pipelines.loading import SD_SCHEDULER

from machine_info import describe

RESULTS = Path(__file__).resolve().parent / "results"


def marker_difference(obj, settings: ConsistencySettings, resolution: int) -> float:
    """||x0_m - x0_b|| of the object's azimuth-0 view, pixels in [-1, 1] (3 x H x W values)."""
    unmarked = dict(obj.attributes)
    unmarked["parts"] = [dict(p, front=None, front_rgb=None) for p in obj.attributes["parts"]]
    mesh, _ = build_mesh(unmarked)
    plain = dataclasses.replace(obj, mesh=mesh)
    # View 0 of the benchmark's cameras is MVDream azimuth 0, the side the marker faces.
    marked_view = render_truth(obj, settings, resolution)[0] * 2 - 1
    plain_view = render_truth(plain, settings, resolution)[0] * 2 - 1
    return float(np.linalg.norm(marked_view - plain_view))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[999, 949, 899, 799, 599])
    parser.add_argument("--out", default=str(RESULTS / "marker_signal.json"))
    args = parser.parse_args()

    start = time.perf_counter()
    settings = ConsistencySettings(sets=args.objects, kinds=("marker",))
    objects = consistency_objects("marker", args.objects, settings.shape_seed)
    norms = np.asarray([marker_difference(obj, settings, args.resolution) for obj in objects])

    schedules = {"sd (scaled_linear)": dict(SD_SCHEDULER),
                 "sd, zero terminal SNR": dict(SD_SCHEDULER, rescale_betas_zero_snr=True)}
    table = {}
    for name, config in schedules.items():
        abar = NoiseSchedule.from_scheduler_config(config).alphas_cumprod.double().numpy()
        rows = {}
        for t in args.timesteps:
            snr = abar[t] / (1.0 - abar[t])
            d = math.sqrt(snr) * norms
            rows[str(t)] = {"abar": float(abar[t]), "d_prime_median": float(np.median(d)),
                            "d_prime_p10": float(np.percentile(d, 10)),
                            "error_median": float(norm.cdf(-np.median(d) / 2)),
                            "share_d_prime_over_2": float((d > 2).mean())}
        table[name] = rows
        print(name)
        for t, row in rows.items():
            print(f"  t={t:>4}  abar {row['abar']:.5f}  d' median {row['d_prime_median']:.2f} "
                  f"(p10 {row['d_prime_p10']:.2f})  ideal error {row['error_median']:.1%}  "
                  f"d'>2 in {row['share_d_prime_over_2']:.0%}")
    result = {
        "what": "ideal-observer d' of the front marker in the azimuth-0 view, from x_t alone",
        "objects": args.objects, "resolution": args.resolution,
        "difference_norm": {"median": float(np.median(norms)), "p10": float(np.percentile(norms, 10)),
                            "p90": float(np.percentile(norms, 90))},
        "schedules": table, "seconds": round(time.perf_counter() - start, 1), "machine": describe(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"||x0_m - x0_b|| median {result['difference_norm']['median']:.1f}; wrote {args.out}")


if __name__ == "__main__":
    main()
