"""Loading an SD-2.1-sized MultiViewUNet folder with and without accelerate's low-memory path.

diffusers' ``from_pretrained`` prints "install accelerate" advice when accelerate is missing
and then builds the model twice over: a randomly initialised module, then the loaded weights
copied into it. With accelerate it builds the module on the meta device and assigns the
weights (``low_cpu_mem_usage=True``). This measures the difference that decides whether the
platform depends on accelerate: each arm in a fresh subprocess (peak RSS is per process),
arms interleaved, on one saved folder (868M parameters, float32, 3.5 GB).

    .venv/bin/python benchmarks/bench_load.py [--repeats 3] [--folder /tmp/sd21-unet]

Writes benchmarks/results/load.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_folder(folder: Path) -> int:
    import torch

    from mvdream_platform.models import MultiViewUNet

    from bench_unet import (
        sd_shaped,  # here, not at the top: the timed children import nothing early
    )

    torch.manual_seed(0)
    model = MultiViewUNet(unet_config=sd_shaped((320, 640, 1280, 1280), (5, 10, 20, 20))["unet"],
                          camera_dim=16)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def load_once(folder: str, low_cpu_mem_usage: bool) -> dict:
    """Runs in the child: import, load, report seconds and peak RSS."""
    start = time.perf_counter()
    import torch  # noqa: F401  (imports are timed separately from the load)

    from mvdream_platform.models import MultiViewUNet

    imported = time.perf_counter()
    model = MultiViewUNet.from_pretrained(folder, low_cpu_mem_usage=low_cpu_mem_usage)
    loaded = time.perf_counter()
    # safetensors maps the file: pages are read on first use. Touch every weight once (as the
    # first forward pass would), so the time and the resident memory include the real read.
    checksum = sum(float(p.detach().sum()) for p in model.parameters())
    touched = time.perf_counter()
    params = sum(p.numel() for p in model.parameters())
    return {"import_s": imported - start, "from_pretrained_s": loaded - imported,
            "load_s": touched - imported, "parameters": params, "checksum": checksum,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", default="/tmp/mvdream-bench-load/unet")
    parser.add_argument("--child", choices=["low", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(load_once(args.folder, args.child == "low")))
        return

    import importlib.util

    from machine_info import describe

    if importlib.util.find_spec("accelerate") is None:
        sys.exit("accelerate is not installed: the low-memory arm needs it")
    folder = Path(args.folder)
    if not (folder / "config.json").exists():
        print(f"writing an SD-2.1-sized MultiViewUNet to {folder} ...", flush=True)
        write_folder(folder)
    runs: dict[str, list[dict]] = {"full": [], "low": []}
    for _ in range(args.repeats):
        for arm in ("full", "low"):  # interleaved: drifts of the machine hit both arms
            out = subprocess.run([sys.executable, __file__, "--child", arm, "--folder", str(folder)],
                                 check=True, capture_output=True, text=True).stdout
            runs[arm].append(json.loads(out.strip().splitlines()[-1]))
            print(arm, runs[arm][-1], flush=True)
    summary = {arm: {key: statistics.median(r[key] for r in rs)
                     for key in ("import_s", "from_pretrained_s", "load_s", "peak_rss_gb")}
               for arm, rs in runs.items()}
    if runs["full"][0]["checksum"] != runs["low"][0]["checksum"]:
        raise AssertionError("the two arms loaded different weights")
    result = {
        "machine": describe(("torch", "diffusers", "accelerate")),
        "parameters": runs["low"][0]["parameters"],
        "repeats": args.repeats,
        "median": summary,
        "load_speedup_low_vs_full": summary["full"]["load_s"] / summary["low"]["load_s"],
        "peak_rss_ratio_low_vs_full": summary["low"]["peak_rss_gb"] / summary["full"]["peak_rss_gb"],
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "load.json").write_text(json.dumps(result, indent=2) + "\n")
    for arm, label in (("full", "without accelerate"), ("low", "with accelerate (low_cpu_mem_usage)")):
        s = summary[arm]
        print(f"{label:40s} from_pretrained {s['from_pretrained_s']:6.2f} s, + first read of every "
              f"weight {s['load_s']:6.2f} s  peak RSS {s['peak_rss_gb']:5.2f} GB")
    print(f"speed-up {result['load_speedup_low_vs_full']:.2f}x, "
          f"peak memory x{result['peak_rss_ratio_low_vs_full']:.2f}")


if __name__ == "__main__":
    main()
