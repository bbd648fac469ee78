"""Ray Serve multi-view endpoint: throughput with ``@serve.batch`` against ``max_batch_size=1``,
latency percentiles under load, and the HTTP path's overhead against calling the sampler directly.

One local Ray cluster (``--cpus``), the shipped tiny model, one generator replica with 1 CPU
(so torch uses 1 thread there; the direct baseline also runs with 1 thread). Variants:

* ``direct``: :func:`mvdream_platform.serve.generator.sample_items` on one request at a time in
  this process: the floor for one request's latency;
* ``http_serial``: the same requests one at a time through HTTP (proxy, ingress, handle call,
  batcher, base64 PNG): ``http_serial / direct - 1`` is the HTTP path's overhead;
* ``batch_1`` and ``batch_N``: ``--requests`` requests from ``--clients`` concurrent clients,
  with the generator's ``max_batch_size`` 1 and N (the application is redeployed in between).
  Reported: requests/s, views/s, p50/p95/max latency, mean batch size; ratio batch_N / batch_1.

Every request is one prompt x ``--views`` views, ``--steps`` DDIM steps, guidance 2 (the tiny
model's). Needs an otherwise idle machine (the load average at start is in the JSON).

    .venv/bin/python benchmarks/bench_serve.py [--requests 64] [--clients 16] [--steps 20]
        [--batch 8] [--serial 10] [--out results/serve.json]

Smoke test: ``.venv/bin/python benchmarks/bench_serve.py --requests 8 --clients 4 --steps 2
--serial 2 --out /tmp/serve.json``.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch
import yaml

from mvdream_platform.serve.metrics import percentile

from machine_info import describe

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
APP = "bench-serve"


def body(i: int, args) -> dict:
    return {"prompts": [f"a red cube {i}"], "steps": args.steps, "num_views": args.views, "seed": i}


def deploy(storage: str, batch: int, wait_s: float) -> None:
    from ray import serve

    from mvdream_platform.serve.app import build_app

    model = yaml.safe_load((REPO / "conf" / "model" / "tiny.yaml").read_text())
    serve.run(build_app({
        "model": model, "storage": storage, "auth_token_env": "MVDREAM_BENCH_NO_TOKEN",
        "generator": {"num_cpus": 1, "max_batch_size": batch, "batch_wait_timeout_s": wait_s,
                      "max_ongoing_requests": max(64, 4 * batch)},
        "worker": {"num_cpus": 1},
    }), name=APP, route_prefix="/")


def load_run(url: str, args) -> dict:
    """``args.requests`` requests from ``args.clients`` threads; latency per request."""
    session = requests.Session()

    def one(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = session.post(url + "/v1/multiview", json=body(i, args), timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["results"][0]["batch_size"]

    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(one, range(args.clients)))  # warm-up: connections, first batch
        began = time.perf_counter()
        out = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - began
    latencies = [o[0] for o in out]
    return {"requests": args.requests, "clients": args.clients, "wall_s": round(wall, 3),
            "requests_per_s": round(args.requests / wall, 3),
            "views_per_s": round(args.requests * args.views / wall, 2),
            "latency_p50_s": round(percentile(latencies, 0.5), 4),
            "latency_p95_s": round(percentile(latencies, 0.95), 4),
            "latency_max_s": round(max(latencies), 4),
            "mean_batch_size": round(statistics.mean(o[1] for o in out), 2)}


def serial_http(url: str, args) -> list[float]:
    session = requests.Session()
    session.post(url + "/v1/multiview", json=body(0, args), timeout=600).raise_for_status()
    times = []
    for i in range(args.serial):
        t0 = time.perf_counter()
        session.post(url + "/v1/multiview", json=body(i, args), timeout=600).raise_for_status()
        times.append(time.perf_counter() - t0)
    return times


def serial_direct(args) -> list[float]:
    """The generator's own work for one request (noise, pipeline, PNG encoding), 1 thread."""
    from mvdream_platform.pipelines.loading import ModelConfig, build_pipeline
    from mvdream_platform.serve.generator import SampleItem, SamplingKey, sample_items

    torch.set_num_threads(1)
    model = yaml.safe_load((REPO / "conf" / "model" / "tiny.yaml").read_text())
    pipe = build_pipeline(ModelConfig(**model))
    pipe.set_progress_bar_config(disable=True)
    key = SamplingKey(num_views=args.views, elevation=15.0, azimuth_start=0.0, steps=args.steps,
                      guidance_scale=float(model["guidance_scale"]), guidance_rescale=0.0,
                      resolution=None, negative_prompt="")
    sample_items(pipe, [SampleItem("a red cube 0", 0, key)])
    times = []
    for i in range(args.serial):
        t0 = time.perf_counter()
        sample_items(pipe, [SampleItem(f"a red cube {i}", i, key)])
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batch-wait", type=float, default=0.05)
    parser.add_argument("--serial", type=int, default=10)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "serve.json"))
    args = parser.parse_args()

    import ray
    from ray import serve

    record: dict = {"machine": describe(("torch", "ray")), "settings": vars(args).copy()}
    direct = serial_direct(args)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    with tempfile.TemporaryDirectory() as storage:
        deploy(storage, args.batch, args.batch_wait)
        http = serial_http(url, args)
        batched = load_run(url, args)
        deploy(storage, 1, 0.0)
        unbatched = load_run(url, args)
    serve.shutdown()
    ray.shutdown()

    d, h = statistics.median(direct), statistics.median(http)
    record["serial"] = {"direct_median_s": round(d, 4), "http_median_s": round(h, 4),
                        "http_overhead_s": round(h - d, 4), "http_overhead_ratio": round(h / d - 1, 4)}
    record["batch_1"] = unbatched
    record[f"batch_{args.batch}"] = batched
    record["throughput_ratio_batched_vs_1"] = round(batched["requests_per_s"] / unbatched["requests_per_s"], 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")

    print(f"machine: {record['machine']['cpu']} x{record['machine']['cores']}, steps {args.steps}, "
          f"{args.views} views, {args.requests} requests from {args.clients} clients")
    print("| variant | req/s | views/s | p50 s | p95 s | mean batch |\n| --- | --- | --- | --- | --- | --- |")
    for name, r in (("max_batch_size=1", unbatched), (f"max_batch_size={args.batch}", batched)):
        print(f"| {name} | {r['requests_per_s']} | {r['views_per_s']} | {r['latency_p50_s']} | "
              f"{r['latency_p95_s']} | {r['mean_batch_size']} |")
    print(f"batched / unbatched throughput: {record['throughput_ratio_batched_vs_1']}x")
    s = record["serial"]
    print(f"one request at a time: direct {s['direct_median_s']} s, HTTP {s['http_median_s']} s "
          f"(overhead {s['http_overhead_s']} s, {100 * s['http_overhead_ratio']:.1f}%)")
    print(f"wrote {args.out}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
