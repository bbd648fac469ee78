"""A scaling model of MVDream's joint multi-view fine-tuning, on paper, from measured parts.

Nobody in this field publishes training throughput or scaling figures. This script projects
them for the paper's run (SD-2.1-base inflated, 256 px = 32x32 latents, 4 views, a global
batch of 4096 images, 50K steps, 32 A100s, "about 3 days") from:

* **measured here** (no GPU needed): the FLOPs of one training image, counted by
  ``torch.utils.flop_counter`` on the meta device through our real models: the multi-view UNet
  (forward + backward, 3D attention over 4 views, camera MLP, 77 text tokens of width 1024),
  the frozen VAE encoder (forward, 256 px) and the frozen CLIP text encoder (forward, one
  caption per object); the parameter count (gradient bytes to all-reduce); and our loader's
  decode rate per CPU core at 256 px (``results/data.json``);
* **stated assumptions** (every one in ``ASSUMPTIONS``, printed and written with the result):
  the GPU's dense bf16 peak, the model FLOPs utilisation (MFU), the interconnects' all-reduce
  bus bandwidth, how much of the all-reduce hides behind the backward pass, the bytes of one
  stored view.

When the GPU figures of ``results/gpu.json`` exist (issue 22: MFU measured on an H100), the MFU
assumption should be replaced by them; until then it is an assumption and says so.

    .venv/bin/python benchmarks/scaling_model.py [--mfu 0.4] [--gpus 1 8 32]

Writes results/scaling_model.json and prints the table that benchmarks/README.md quotes.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench_unet import sd_shaped
from machine_info import describe

RESULTS = Path(__file__).resolve().parent / "results"

# SD-2.1-base's UNet, VAE and text encoder configurations (their config.json files).
SD21_UNET = sd_shaped((320, 640, 1280, 1280), (5, 10, 20, 20))["unet"]  # SD-2.1-base's UNet
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
              block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD21_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu")

PAPER = {"gpus": 32, "gpu": "A100", "images_per_step": 4096, "steps": 50_000, "days": 3.0}

ASSUMPTIONS = {
    "a100_bf16_dense_tflops": 312.0,   # NVIDIA A100 datasheet, dense (no sparsity)
    "h100_bf16_dense_tflops": 989.0,   # NVIDIA H100 SXM datasheet, dense
    "mfu": 0.40,                       # typical of well-tuned SD-sized UNet training (not measured here)
    "gradient_bytes_per_param": 4,     # DDP all-reduces fp32 gradients (weights fp32, bf16 autocast)
    # NCCL ring all-reduce bus bandwidth (GB/s): inside an 8-GPU NVSwitch node, and across nodes
    # with 8 x 200 Gb/s InfiniBand per node (DGX A100 class) or one 400 Gb/s link per node.
    "busbw_intra_node_GBps": 230.0,
    "busbw_inter_node_8x200G_GBps": 180.0,
    "busbw_inter_node_400G_GBps": 45.0,
    "overlap_with_backward": 0.7,      # share of the all-reduce DDP's bucketing hides behind backward
    "bytes_per_view_256px_png": 60_000,  # one RGBA 256 px render of an object, PNG
    "gpus_per_node": 8,
    "usd_per_a100_hour": 2.0,          # a round cloud price, for scale only
}


def count_flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def flops_per_image() -> dict[str, float]:
    """Training FLOPs of one 256 px image of a 4-view object, on the meta device."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from mvdream_platform.models import MultiViewUNet

    views = 4
    with torch.device("meta"):
        unet = MultiViewUNet(unet_config=SD21_UNET, camera_dim=16)
        params = sum(p.numel() for p in unet.parameters())
        x, t = torch.randn(views, 4, 32, 32), torch.zeros(views, dtype=torch.long)
        context, camera = torch.randn(views, 77, 1024), torch.randn(views, 16)

        def unet_step():
            unet(x, t, context, camera=camera, num_frames=views).sample.float().pow(2).mean().backward()

        unet_train = count_flops(unet_step) / views
        vae = AutoencoderKL(**SD_VAE).requires_grad_(False)
        with torch.no_grad():
            vae_encode = count_flops(lambda: vae.encode(torch.randn(1, 3, 256, 256))) / 1
        text = CLIPTextModel(CLIPTextConfig(**SD21_TEXT)).requires_grad_(False)
        with torch.no_grad():
            caption = count_flops(lambda: text(torch.zeros(1, 77, dtype=torch.long)))
    return {"unet_params": params, "unet_train_gflop": unet_train / 1e9,
            "vae_encode_gflop": vae_encode / 1e9, "text_encode_gflop_per_image": caption / views / 1e9,
            "total_gflop": (unet_train + vae_encode + caption / views) / 1e9}


def project(gflop_per_image: float, params: int, gpus: int, peak_tflops: float, a: dict,
            decode_images_per_s_per_core: float | None) -> dict[str, float]:
    """Per-step time, images/s, scaling efficiency and ingest needs at ``gpus`` GPUs."""
    batch = PAPER["images_per_step"]
    per_gpu_images_s = peak_tflops * 1e12 * a["mfu"] / (gflop_per_image * 1e9)
    compute_s = batch / gpus / per_gpu_images_s
    backward_s = compute_s * (2.0 / 3.0)  # backward ~ 2/3 of a training step's FLOPs
    grad_bytes = params * a["gradient_bytes_per_param"]
    rows = {"gpus": gpus, "per_gpu_images_per_s": per_gpu_images_s, "compute_s": compute_s}
    links = {"nvlink_node": a["busbw_intra_node_GBps"]} if gpus <= a["gpus_per_node"] else {
        "ib_8x200G": a["busbw_inter_node_8x200G_GBps"], "eth_400G": a["busbw_inter_node_400G_GBps"]}
    for name, busbw in links.items():
        comm = 0.0 if gpus == 1 else 2 * (gpus - 1) / gpus * grad_bytes / (busbw * 1e9)
        exposed = max(comm - a["overlap_with_backward"] * backward_s, 0.0)
        step = compute_s + exposed
        rows[f"{name}_allreduce_s"] = comm
        rows[f"{name}_step_s"] = step
        rows[f"{name}_images_per_s"] = batch / step
        rows[f"{name}_efficiency"] = compute_s / step
        days = PAPER["steps"] * step / 86400
        rows[f"{name}_paper_run_days"] = days
        rows[f"{name}_paper_run_gpu_hours"] = days * 24 * gpus
    node_images_s = per_gpu_images_s * min(gpus, a["gpus_per_node"])
    rows["ingest_images_per_s_per_node"] = node_images_s
    rows["ingest_MBps_per_node"] = node_images_s * a["bytes_per_view_256px_png"] / 1e6
    if decode_images_per_s_per_core:
        rows["decode_cores_per_node"] = node_images_s / decode_images_per_s_per_core
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mfu", type=float, default=ASSUMPTIONS["mfu"])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--out", type=Path, default=RESULTS / "scaling_model.json")
    args = parser.parse_args()
    a = dict(ASSUMPTIONS, mfu=args.mfu)
    flops = flops_per_image()
    decode = None
    data = RESULTS / "data.json"
    if data.exists():  # our loader's decode rate at 256 px on this machine (bench_data.py)
        rows = json.loads(data.read_text())
        row = next(r for r in rows["rows"] if r["fixture"] == "256x256" and r["loader"] == "MultiViewDataset")
        decode = row["images_per_s"] / rows["machine"]["cores"]
    result = {"benchmark": "scaling_model", "machine": describe(), "paper": PAPER, "assumptions": a,
              "measured": flops | {"decode_images_per_s_per_core_256px": decode}, "projections": {}}
    for gpu, peak in (("A100", a["a100_bf16_dense_tflops"]), ("H100", a["h100_bf16_dense_tflops"])):
        result["projections"][gpu] = [project(flops["total_gflop"], flops["unet_params"], n, peak, a, decode)
                                      for n in args.gpus]
    implied = PAPER["steps"] * PAPER["images_per_step"] / (PAPER["days"] * 86400) / PAPER["gpus"]
    result["paper_implied_images_per_s_per_gpu"] = implied
    result["paper_implied_mfu"] = implied * flops["total_gflop"] * 1e9 / (a["a100_bf16_dense_tflops"] * 1e12)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"one 256 px training image: UNet fwd+bwd {flops['unet_train_gflop']:.0f} GFLOP, VAE encode "
          f"{flops['vae_encode_gflop']:.0f}, text {flops['text_encode_gflop_per_image']:.1f} "
          f"-> {flops['total_gflop']:.0f} GFLOP; UNet {flops['unet_params'] / 1e6:.1f}M parameters")
    print(f"the paper's run implies {implied:.1f} images/s per A100 = MFU {result['paper_implied_mfu']:.1%}")
    print("| GPU | GPUs | images/s | step s | all-reduce s | efficiency | paper run (days) | GPU-hours | ingest per node (images/s, MB/s, decode cores) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for gpu, rows in result["projections"].items():
        for r in rows:
            for link in [k[:-len("_step_s")] for k in r if k.endswith("_step_s")]:
                cores = f", {r['decode_cores_per_node']:.0f}" if "decode_cores_per_node" in r else ""
                print(f"| {gpu} | {r['gpus']} ({link}) | {r[f'{link}_images_per_s']:.0f} | "
                      f"{r[f'{link}_step_s']:.2f} | {r[f'{link}_allreduce_s']:.2f} | "
                      f"{r[f'{link}_efficiency']:.0%} | {r[f'{link}_paper_run_days']:.1f} | "
                      f"{r[f'{link}_paper_run_gpu_hours']:.0f} | {r['ingest_images_per_s_per_node']:.0f}, "
                      f"{r['ingest_MBps_per_node']:.0f}{cores} |")
    print(f"wrote {args.out}")
    assert math.isfinite(flops["total_gflop"])


if __name__ == "__main__":
    main()
