"""MultiViewUNet training-step cost per attention mode (3d / temporal / 2d) at F=4.

For each model config (the embedded tiny model and a small SD-shaped latent model) and each
mode, in ONE process with interleaved repetitions: median forward+backward step time, the
activation memory autograd saves for backward (the part that attention modes change), and on
CUDA the peak allocated memory. Prints a table and writes benchmarks/results/unet.json.

    .venv/bin/python benchmarks/bench_unet.py [--repeats 5] [--objects 2] [--configs tiny sd_small]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mvdream_platform.models import MultiViewUNet

from machine_info import describe

RESULTS = Path(__file__).resolve().parent / "results"


def sd_shaped(widths: tuple[int, ...], heads: tuple[int, ...]) -> dict:
    """An SD-2.1-layout latent UNet config (4 levels, cross-attention on the first 3)."""
    unet = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=widths,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=1024, attention_head_dim=heads, use_linear_projection=True)
    return dict(unet=unet, channels=4, size=32, tokens=77, text_dim=1024)


CONFIGS = {
    # conf/model/tiny.yaml's UNet: pixel space, 32x32 RGB, MiniLM width 384.
    "tiny": dict(
        unet=dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                  block_out_channels=(32, 64, 128),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  cross_attention_dim=384, attention_head_dim=(1, 2, 4), norm_num_groups=8,
                  use_linear_projection=True),
        channels=3, size=32, tokens=32, text_dim=384,
    ),
    # SD 2.1's shape at 1/5 width: 4 levels, attention on the first 3, 32-d heads, 32x32 latents.
    "sd_small": sd_shaped((64, 128, 256, 256), heads=(2, 4, 8, 8)),
    # SD 2.1's shape at 1/2 width (32-d heads): shows how the 3d overhead shrinks with width,
    # since convolutions and projections grow with C^2 while attention grows with tokens^2 * C.
    "sd_half": sd_shaped((160, 320, 640, 640), heads=(5, 10, 20, 20)),
    # The real SD 2.1-base UNet at 256 px (32x32 latents, 64-d heads).
    "sd21": sd_shaped((320, 640, 1280, 1280), heads=(5, 10, 20, 20)),
}
MODES = ("3d", "temporal", "2d")
FRAMES = 4


def saved_activation_bytes(step) -> int:
    """Bytes of the tensors autograd keeps for backward during ``step()`` (forward only)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return total


def make_step(model, inputs, dtype):
    x, t, text, camera = inputs
    autocast = torch.autocast(device_type=x.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            out = model(x, t, text, camera=camera, num_frames=FRAMES).sample
        return out.float().square().mean()

    return step


def bench_config(name: str, repeats: int, objects: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    spec = CONFIGS[name]
    torch.manual_seed(0)
    model = MultiViewUNet(unet_config=spec["unet"]).to(device).train()
    params = sum(p.numel() for p in model.parameters())
    n = objects * FRAMES
    g = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(n, spec["channels"], spec["size"], spec["size"], generator=g).to(device),
        torch.randint(0, 1000, (n,), generator=g).to(device),
        torch.randn(n, spec["tokens"], spec["text_dim"], generator=g).to(device),
        torch.randn(n, 16, generator=g).to(device),
    )
    step = make_step(model, inputs, dtype)
    rows = {mode: {"config": name, "mode": mode, "params_M": round(params / 1e6, 3), "times": []} for mode in MODES}
    for mode in MODES:  # warm-up + memory, one mode at a time
        model.set_attention_mode(mode)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rows[mode]["saved_activations_MB"] = round(saved_activation_bytes(step) / 2**20, 1)
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            rows[mode]["peak_allocated_MB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    for _ in range(repeats):  # interleaved so drift hits every mode alike
        for mode in MODES:
            model.set_attention_mode(mode)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            rows[mode]["times"].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    base = statistics.median(rows["2d"]["times"])
    for row in rows.values():
        row["step_s"] = round(statistics.median(row["times"]), 4)
        row["ratio_vs_2d"] = round(row["step_s"] / base, 3)
        row["images_per_s"] = round(n / row["step_s"], 2)
        row["times"] = [round(t, 4) for t in row["times"]]
    return list(rows.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "sd_small", "sd_half"], choices=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--objects", type=int, default=2, help="B; the batch is B*4 views")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=str(RESULTS / "unet.json"))
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for name in args.configs:
        rows += bench_config(name, args.repeats, args.objects, device, dtype)
    header = f"{'config':9} {'mode':9} {'params M':>9} {'step s':>8} {'x 2d':>6} {'img/s':>7} {'saved MB':>9}"
    print(f"MultiViewUNet fwd+bwd, F={FRAMES}, B={args.objects}, {args.device} {args.dtype}")
    print(header)
    for r in rows:
        print(f"{r['config']:9} {r['mode']:9} {r['params_M']:9.2f} {r['step_s']:8.3f} "
              f"{r['ratio_vs_2d']:6.2f} {r['images_per_s']:7.1f} {r['saved_activations_MB']:9.1f}"
              + (f"  peak {r['peak_allocated_MB']} MB" if "peak_allocated_MB" in r else ""))
    record = {"benchmark": "unet_attention_modes", "frames": FRAMES, "objects": args.objects,
              "device": args.device, "dtype": args.dtype, "machine": describe(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
