"""How much more marker at the front than at the back? A continuous Janus measure, paired by run.

The Janus verdict (:mod:`mvdream_platform.evaluation.janus`) needs a face: an arc whose marker
share reaches 0.15 somewhere. A faint front (13% of the object at azimuth 0, none at the back)
is ``none``, the same verdict as no marker at all. This script reads the per-view marker shares
of every scored run of ``bench_sds_quality.py`` (16 orbit views; its rows' ``marker_shares``,
or ``<out>/metrics.json``) and reports, per guidance, the mean share of the three views facing
the front (MVDream azimuths -22.5, 0, 22.5) and of the three facing the back (157.5-202.5), and
their difference, the **front excess** (ground truth: about +0.6; a marker painted everywhere or nowhere: 0).
Multi-view SDS and the 2D baseline are compared run by run (same prompt, seed and settings),
with a 95% bootstrap interval on the mean paired difference.

    .venv/bin/python benchmarks/janus_front.py --json benchmarks/results/janus_sds_10_prompts_stage4.json \\
        benchmarks/results/janus_sds_10_prompts_stage4_seed1.json ... --out results/janus_front_stage4.json

Result files written since stop 35 carry the shares in their rows (``marker_shares``); for
older ones the run folders (``out`` of each run) must still be on disk.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mvdream_platform.evaluation.consistency import bootstrap_interval

ROOT = Path(__file__).resolve().parent
FRONT_VIEWS = (15, 0, 1)   # of the 16-view Janus orbit: azimuths 337.5, 0, 22.5
BACK_VIEWS = (7, 8, 9)     # 157.5, 180, 202.5


def front_back(shares: list[float]) -> tuple[float, float]:
    """(front, back) mean marker share of the views facing azimuth 0 and 180 (16-view orbit)."""
    if len(shares) != 16:
        raise ValueError(f"expected the 16 shares of the Janus orbit, got {len(shares)}")
    values = np.asarray(shares, dtype=np.float64)
    return float(values[list(FRONT_VIEWS)].mean()), float(values[list(BACK_VIEWS)].mean())


def read_runs(paths: list[Path]) -> list[dict]:
    runs = []
    for path in paths:
        for run in json.loads(path.read_text())["runs"]:
            if run.get("janus") is None:
                continue  # not a marked prompt
            shares = run.get("marker_shares")  # in the rows since stop 35; else the run folder
            if shares is None:
                metrics = Path(run["out"]) / "metrics.json"
                if not metrics.exists():
                    raise FileNotFoundError(f"{metrics} (run folder of {path.name}) is gone; rerun "
                                            "the benchmark to score its fronts")
                shares = json.loads(metrics.read_text())["quality"]["janus"]["shares"]
            front, back = front_back(shares)
            runs.append({"prompt": run["prompt"], "seed": run["seed"], "guidance": run["guidance"],
                         "steps": run["steps"], "verdict": run["janus"], "front": round(front, 4),
                         "back": round(back, 4), "excess": round(front - back, 4)})
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, nargs="+", required=True,
                        help="bench_sds_quality.py result files")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "janus_front.json")
    args = parser.parse_args()
    runs = read_runs(args.json)
    summary = {}
    for guidance in sorted({r["guidance"] for r in runs}):
        rows = [r for r in runs if r["guidance"] == guidance]
        excess = np.asarray([r["excess"] for r in rows])
        summary[guidance] = {"runs": len(rows), "front": round(float(np.mean([r["front"] for r in rows])), 4),
                             "back": round(float(np.mean([r["back"] for r in rows])), 4),
                             "excess": round(float(excess.mean()), 4),
                             "excess_interval": [round(v, 4) for v in bootstrap_interval(excess)],
                             "runs_with_excess_over_0.05": int((excess > 0.05).sum())}
        print(f"{guidance:11s} {len(rows)} runs: front {summary[guidance]['front']:.3f}, back "
              f"{summary[guidance]['back']:.3f}, excess {excess.mean():+.3f} "
              f"{summary[guidance]['excess_interval']}, excess > 0.05 in "
              f"{summary[guidance]['runs_with_excess_over_0.05']}")
    by_key = {(r["prompt"], r["seed"], r["steps"], r["guidance"]): r for r in runs}
    pairs = [(by_key[k[:3] + ("mvdream",)]["excess"], by_key[k[:3] + ("dreamfusion",)]["excess"])
             for k in by_key if k[3] == "mvdream" and k[:3] + ("dreamfusion",) in by_key]
    paired = None
    if pairs:
        difference = np.asarray([m - d for m, d in pairs])
        paired = {"pairs": len(pairs), "mean": round(float(difference.mean()), 4),
                  "interval": [round(v, 4) for v in bootstrap_interval(difference)],
                  "mvdream_higher": int((difference > 0).sum()), "dreamfusion_higher": int((difference < 0).sum())}
        print(f"multi-view - 2D front excess, {len(pairs)} paired runs: {paired['mean']:+.3f} "
              f"{paired['interval']} (multi-view higher in {paired['mvdream_higher']}, 2D in "
              f"{paired['dreamfusion_higher']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "janus_front", "date": time.strftime("%Y-%m-%d"),
        "sources": [str(p) for p in args.json], "front_views_deg": [337.5, 0.0, 22.5],
        "back_views_deg": [157.5, 180.0, 202.5], "summary": summary, "paired": paired,
        "runs": runs}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
