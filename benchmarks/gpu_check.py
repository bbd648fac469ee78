"""GPU figures (issue 22): training MFU, SDS speed and Serve batching on one accelerator.

One prepared script, so the scarce device minutes go to measuring, not debugging. No weights
can be downloaded on the device either, so every part uses an SD-2.1-base-shaped model with
random weights, written as a diffusers SD folder and loaded the way a user loads real SD 2.1
(``model.source=sd``: the UNet inflated to multi-view, CLIP text encoder, 8x KL VAE):

* UNet levels 320/640/1280/1280, attention on the first three (5/10/20/20 heads of 64),
  linear projections, 32x32 latents (256 px), the 16-dim camera: 867.6M parameters.
* The VAE at SD's widths (128/256/512/512); a CLIP text model at SD 2.1's width and depth
  (1024 wide, 23 layers, 77 positions) whose vocabulary is a toy one (the embedding table is
  the only part smaller than SD's; text encoding is not what is measured).

Parts (``--parts``; each appends to ``--out`` as soon as it is done, so a run cut short still
returns what it measured):

1. ``train``: the library's training step (text and VAE encoding under no_grad, then
   ``diffusion_loss`` under bf16 autocast, backward, grad clipping, AdamW) on 4-view objects,
   gradient checkpointing off and on, the batch doubled until it no longer fits. Per batch:
   images/s, step time split (encode / UNet forward+backward / optimizer), peak memory. FLOPs
   come from ``torch.utils.flop_counter`` on one step; MFU = counted FLOPs per second over the
   GPU's dense bf16 peak (``PEAK_BF16_TFLOPS``, or ``--peak-tflops``): reported for the UNet's
   forward+backward alone and for the whole step.
2. ``ray_train``: the same model and batch through the real job (``run_training``: Ray Train's
   TorchTrainer, 1 GPU worker, the mixture loader reading prepared shards, bf16 from
   ``trainer.mixed_precision``) against the plain loop of part 1: the overhead of Ray Train plus
   the real loader.
3. ``sds``: ``conf/sds/reference.yaml`` with the SD-sized prior (bf16): nerfacc's CUDA
   extension build timed apart (its first import JIT-compiles it), then seconds per SDS step at
   64 px (8 groups x 4 views, albedo: the reference's first 5000 steps) and 256 px (4 groups x
   4 views, lit with analytic normals: the last 5000), and the projected minutes for 10k steps.
4. ``serve``: the Serve application on a local Ray cluster, the generator on the GPU with
   ``max_batch_size`` 1, 2, 4, 8; ``--requests`` 4-view, ``--serve-steps``-step requests from
   ``--clients`` concurrent clients over HTTP: requests/s, p50/p95 latency, mean batch.

On the device (see benchmarks/README.md, "GPU check", for the wheels to carry and the command):

    python benchmarks/gpu_check.py --data .gpu/shards --out $OUT/gpu.json

On CPU, ``--smoke`` runs every part on an SD-layout model at a tenth of the width and 64 px in
about a minute (``tests/test_gpu_check.py`` runs it), which checks the plumbing, not speed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import socket
import statistics
import string
import tempfile
import time
from pathlib import Path

import torch

from bench_sds import synchronizer  # benchmarks/ is on sys.path: as a script, and in tests

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
PARTS = ("train", "ray_train", "sds", "serve")
FRAMES = 4

# Dense bf16 tensor-core peaks (NVIDIA data sheets, TFLOP/s, without sparsity), matched in this
# order against torch.cuda.get_device_name(). H100 SXM and H200 share the same chip and clocks.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                    ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0))

# SD 2.1-base (stabilityai/stable-diffusion-2-1-base, its unet/ and vae/ config.json), and the
# smoke test's reduction of it: the same layout at a tenth of the UNet's width, 64 px.
FULL = dict(unet_channels=(320, 640, 1280, 1280), heads=(5, 10, 20, 20), latent=32,
            vae_channels=(128, 256, 512, 512), text_dim=1024, text_layers=23, text_heads=16)
SMOKE = dict(unet_channels=(32, 64, 128, 128), heads=(2, 4, 8, 8), latent=8,
             vae_channels=(32, 32, 32, 32), text_dim=64, text_layers=2, text_heads=4)
PROMPT = "a red cube with a yellow front"


# ----------------------------------------------------------------------------- the model


def write_sd_folder(root: Path, shape: dict, seed: int = 0) -> Path:
    """A diffusers SD-2.1-layout folder (unet/, vae/, text_encoder/, tokenizer/), random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    UNet2DConditionModel(
        sample_size=shape["latent"], in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=shape["unet_channels"],
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=shape["text_dim"], attention_head_dim=shape["heads"],
        use_linear_projection=True,
    ).save_pretrained(root / "unet")
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=shape["vae_channels"], down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=shape["latent"] * 8,
        scaling_factor=0.18215,
    ).save_pretrained(root / "vae")
    # A character-level CLIP BPE vocabulary: real tokenizer files, toy vocabulary.
    folder = root / "tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase) + list(",.!")
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": "!"}))
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    width = shape["text_dim"]
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=shape["text_layers"], num_attention_heads=shape["text_heads"],
        max_position_embeddings=77, hidden_act="gelu", projection_dim=width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )).save_pretrained(root / "text_encoder")
    return root


def model_values(folder: Path, dtype: str = "float32") -> dict:
    """conf/model/sd21_base.yaml pointed at ``folder``, as the jobs and Serve read it."""
    import yaml

    values = yaml.safe_load((REPO / "conf" / "model" / "sd21_base.yaml").read_text())
    return values | {"name": "sd21_random", "path": str(folder), "dtype": dtype}


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS if key in name), None)


# ----------------------------------------------------------------------------- part 1: train


class TrainStep:
    """The training loop's step (training/loop.py ``_micro_step`` and what follows it), timed."""

    def __init__(self, pipe, device: torch.device, bf16: bool):
        from mvdream_platform.diffusion import NoiseSchedule
        from mvdream_platform.training.optim import build_optimizer
        from mvdream_platform.training.parallel import parameter_ndims

        self.pipe, self.device = pipe, device
        self.unet = pipe.unet.train()
        self.schedule = NoiseSchedule.from_scheduler_config(dict(pipe.scheduler.config)).to(device)
        self.optimizer = build_optimizer(self.unet, lr=1e-5, weight_decay=0.01,
                                         ndims=parameter_ndims(self.unet))
        self.autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
        self.sync = synchronizer(device)

    def inputs(self, objects: int, size: int, seed: int) -> tuple:
        from mvdream_platform.cameras import get_camera

        g = torch.Generator().manual_seed(seed)
        images = (torch.rand(objects * FRAMES, 3, size, size, generator=g) * 2 - 1).to(self.device)
        cameras = get_camera(FRAMES).repeat(objects, 1).to(self.device)
        return images, [PROMPT] * (objects * FRAMES), cameras

    def __call__(self, images, captions, cameras, flops=None) -> dict[str, float]:
        """One step: seconds per phase. With ``flops`` (a FlopCounterMode) the step runs under
        it and ``flops_by_phase`` receives each phase's FLOPs."""
        from mvdream_platform.training.losses import diffusion_loss

        times, marks, counted = {}, [time.perf_counter()], [0]
        self.flops_by_phase = {}

        def mark(name: str) -> None:
            self.sync()
            marks.append(time.perf_counter())
            times[name] = marks[-1] - marks[-2]
            if flops is not None:
                counted.append(flops.get_total_flops())
                self.flops_by_phase[name] = counted[-1] - counted[-2]

        with flops if flops is not None else contextlib.nullcontext():
            with torch.no_grad():
                context = self.pipe.text_encoder.encode(captions).to(self.device)
                x0 = self.pipe.codec.encode(images)
            mark("encode")
            with self.autocast:
                loss, _ = diffusion_loss(self.unet, x0, context, cameras, FRAMES, self.schedule)
            loss.backward()
            mark("unet")
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            mark("optimizer")
        return times


def measure_train(step: TrainStep, objects: int, size: int, warmup: int, iters: int) -> dict:
    images, captions, cameras = step.inputs(objects, size, seed=objects)
    for _ in range(warmup):
        step(images, captions, cameras)
    if step.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(step.device)
    runs = [step(images, captions, cameras) for _ in range(iters)]
    row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    total = sum(row.values())
    out = {"objects": objects, "images": objects * FRAMES, "step_s": round(total, 5),
           "images_per_s": round(objects * FRAMES / total, 2),
           **{f"{k}_s": round(v, 5) for k, v in row.items()}}
    if step.device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(step.device) / 2**30, 2)
    return out


def count_flops(step: TrainStep, size: int) -> dict[str, float]:
    """FLOPs per image of each phase, counted on one 1-object step (they scale with the batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    images, captions, cameras = step.inputs(1, size, seed=0)
    step(images, captions, cameras, flops=FlopCounterMode(display=False))
    return {phase: count / FRAMES for phase, count in step.flops_by_phase.items()}


def part_train(pipe, device: torch.device, args, shape: dict) -> dict:
    size = shape["latent"] * 8
    step = TrainStep(pipe, device, bf16=device.type == "cuda")
    flops = count_flops(step, size)
    peak = peak_flops(device, args.peak_tflops)
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    rows = []
    for checkpointing in (False, True):
        if checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        else:
            pipe.unet.disable_gradient_checkpointing()
        objects = 1
        while objects <= args.max_objects:
            try:
                row = measure_train(step, objects, size, args.warmup, args.iters)
            except torch.OutOfMemoryError:
                rows.append({"gradient_checkpointing": checkpointing, "objects": objects, "oom": True})
                print(f"train: checkpointing={checkpointing} {objects} objects: out of memory", flush=True)
                step.optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                break
            row["gradient_checkpointing"] = checkpointing
            row["unet_flops_per_s"] = flops["unet"] * row["images"] / row["unet_s"]
            row["step_flops_per_s"] = sum(flops.values()) * row["images"] / row["step_s"]
            if peak:
                row["mfu_unet"] = round(row["unet_flops_per_s"] / peak, 4)
                row["mfu_step"] = round(row["step_flops_per_s"] / peak, 4)
            rows.append(row)
            print(f"train: checkpointing={checkpointing} {objects} objects x {FRAMES} views: "
                  f"{row['images_per_s']} images/s, step {row['step_s']:.3f} s "
                  f"(encode {row['encode_s']:.3f}, unet {row['unet_s']:.3f}, optimizer {row['optimizer_s']:.3f})"
                  + (f", MFU unet {row['mfu_unet']:.1%} step {row['mfu_step']:.1%}" if peak else "")
                  + (f", peak {row['peak_memory_gib']} GiB" if "peak_memory_gib" in row else ""), flush=True)
            objects *= 2
    pipe.unet.disable_gradient_checkpointing()
    fitted = [r for r in rows if not r.get("oom")]
    best = max(fitted, key=lambda r: r["images_per_s"])
    return {"resolution": size, "views": FRAMES, "unet_parameters": unet_params,
            "bf16_autocast": device.type == "cuda", "peak_bf16_flops": peak,
            "flops_per_image": flops, "runs": rows,
            "best": {k: best[k] for k in ("objects", "gradient_checkpointing", "images_per_s",
                                          "mfu_unet", "mfu_step") if k in best},
            "target_mfu": 0.40}


# ----------------------------------------------------------------------------- part 2: Ray Train


def prepare_shards(root: Path, objects: int, resolution: int) -> str:
    """Multi-view training shards of procedural objects (as jobs/prepare_data.py writes them)."""
    from mvdream_platform.data import prepare

    out = root / f"shards_{resolution}"
    prepare.prepare_multiview(prepare.plan_shapes(objects), str(out),
                              prepare.RenderSettings(views=8, resolution=resolution), backend="serial")
    return str(out)


def part_ray_train(folder: Path, device: torch.device, args, shape: dict, plain: dict, tmp: Path) -> dict:
    from mvdream_platform.pipelines.loading import ModelConfig
    from mvdream_platform.tracking import read_metrics
    from mvdream_platform.training.config import (
        ClusterConfig,
        DataConfig,
        LoggerConfig,
        RunSettings,
        TrainerConfig,
        TrainJobConfig,
    )
    from mvdream_platform.training.samples import SampleConfig
    from mvdream_platform.training.trainer import run_training

    size = shape["latent"] * 8
    best = plain["best"]
    data = args.data or prepare_shards(tmp, 16, size)
    cuda = device.type == "cuda"
    steps = args.warmup + args.iters
    cfg = TrainJobConfig(
        model=ModelConfig(**model_values(folder)),
        data=DataConfig(uri=str(Path(data).resolve()), resolution=size, multiview_batch=best["objects"],
                        p_multiview=1.0, num_workers=2 if cuda else 0),
        trainer=TrainerConfig(max_steps=steps, warmup_steps=0, lr=1e-5, checkpoint_every=steps,
                              log_every=1, mixed_precision="bf16" if cuda else "no",
                              gradient_checkpointing=best["gradient_checkpointing"], ema_decay=0.0),
        cluster=ClusterConfig(name="gpu_check", num_workers=1, use_gpu=cuda, backend="nccl" if cuda else "gloo",
                              cpus_per_worker=4 if cuda else 1, torch_threads=4 if cuda else 1),
        run=RunSettings(name="gpu-check", storage_path=str(tmp / "runs"), num_to_keep=1),
        logger=LoggerConfig(mode="disabled"), samples=SampleConfig(every=0),
    )
    began = time.perf_counter()
    run_training(cfg)
    wall = time.perf_counter() - began
    windows = [m for m in read_metrics(tmp / "runs" / "gpu-check" / "tracking") if m["step"] > args.warmup]
    images_per_s = statistics.median(m["images_per_s"] for m in windows)
    plain_row = next(r for r in plain["runs"] if not r.get("oom") and r["objects"] == best["objects"]
                     and r["gradient_checkpointing"] == best["gradient_checkpointing"])
    out = {"objects": best["objects"], "gradient_checkpointing": best["gradient_checkpointing"],
           "steps": steps, "images_per_s": round(images_per_s, 2),
           "data_time_s": round(statistics.median(m["data_time_s"] for m in windows), 5),
           "step_time_s": round(statistics.median(m["step_time_s"] for m in windows), 5),
           "plain_images_per_s": plain_row["images_per_s"],
           "ray_over_plain": round(images_per_s / plain_row["images_per_s"], 3), "run_wall_s": round(wall, 1)}
    print(f"ray_train: {out['images_per_s']} images/s through the job, plain loop {out['plain_images_per_s']} "
          f"({out['ray_over_plain']:.2f}x), data {out['data_time_s']:.4f} s/step", flush=True)
    return out


# ----------------------------------------------------------------------------- part 3: SDS


def part_sds(pipe, device: torch.device, args, shape: dict) -> dict:
    from mvdream_platform.sds.guidance import MultiViewGuidance
    from mvdream_platform.sds.optimize import build_optimizer, build_scene

    from bench_sds import (
        TimedCall,
        Variant,
        load_config,
        sds_iteration,
        variant_config,
        warm_occupancy_grid,
    )

    out: dict = {}
    if device.type == "cuda":  # nerfacc JIT-compiles its CUDA extension on first import
        began = time.perf_counter()
        import nerfacc.cuda._backend  # noqa: F401

        out["nerfacc_extension_build_s"] = round(time.perf_counter() - began, 1)
        print(f"sds: nerfacc CUDA extension ready in {out['nerfacc_extension_build_s']} s", flush=True)
    cfg = load_config(REPO / "conf" / "sds" / "reference.yaml")
    # The reference schedule: 8 groups x 4 views at 64 px (albedo until step 5000), then 4
    # groups at 256 px, lit. The smoke run shrinks both sizes (and the CPU path's samples).
    stages = (("64px_albedo", 64, 8, "albedo", 5000), ("256px_lit", 256, 4, "diffuse", 5000))
    if args.smoke:
        stages = (("64px_albedo", 16, 2, "albedo", 5000), ("256px_lit", 32, 1, "diffuse", 5000))
        cfg = dataclasses.replace(cfg, render=dataclasses.replace(cfg.render, num_samples_per_ray=16))
    sync_fn = synchronizer(device)
    guidance = MultiViewGuidance(pipe, cfg.guidance)
    unet_timer = TimedCall(guidance.predict_eps, sync_fn)
    guidance.predict_eps = unet_timer
    arm = "cuda" if device.type == "cuda" else "fast"
    rows, projected = [], 0.0
    for name, resolution, groups, shading, steps in stages:
        vcfg = variant_config(cfg, arm, "analytic", resolution, shading)
        vcfg = dataclasses.replace(vcfg, cameras=dataclasses.replace(vcfg.cameras, groups=groups))
        scene = build_scene(vcfg, seed=0, device=device)
        scene.renderer.train()
        warm_occupancy_grid(scene, vcfg)
        v = Variant(arm, resolution, shading, "analytic", vcfg, scene, build_optimizer(scene, vcfg))
        for _ in range(args.warmup):
            sds_iteration(v, guidance, unet_timer, PROMPT, device, sync_fn)
        its = [sds_iteration(v, guidance, unet_timer, PROMPT, device, sync_fn) for _ in range(args.iters)]
        row = {k: round(statistics.median(it[k] for it in its), 5) for k in its[0]}
        row |= {"stage": name, "resolution": resolution, "groups": groups, "views": groups * vcfg.cameras.views,
                "shading": shading, "reference_steps": steps}
        projected += row["total"] * steps
        rows.append(row)
        print(f"sds: {name} ({groups}x{vcfg.cameras.views} views): {row['total']:.3f} s/step "
              f"(render {row['render_fwd']:.3f}, guidance {row['guidance_fwd']:.3f} of which UNet "
              f"{row['unet']:.3f}, backward {row['backward']:.3f})", flush=True)
    out |= {"stages": rows, "projected_10k_steps_min": round(projected / 60, 1), "target_min": 20}
    print(f"sds: 10k reference steps projected at {out['projected_10k_steps_min']} min (target < 20)", flush=True)
    return out


# ----------------------------------------------------------------------------- part 4: Serve


def part_serve(folder: Path, device: torch.device, args, tmp: Path) -> dict:
    from ray import serve

    from mvdream_platform.cluster import ensure_ray
    from mvdream_platform.serve.app import build_app

    from bench_serve import load_run

    cuda = device.type == "cuda"
    load = argparse.Namespace(requests=args.requests, clients=args.clients, steps=args.serve_steps,
                              views=FRAMES)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ensure_ray(num_cpus=os.cpu_count(), log_to_driver=False)  # Ray finds the GPU itself
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = {}
    try:
        for batch in args.batches:
            serve.run(build_app({
                "model": model_values(folder, "bfloat16" if cuda else "float32"),
                "storage": str(tmp / "serve"), "auth_token_env": "MVDREAM_GPU_CHECK_NO_TOKEN",
                "generator": {"num_cpus": 1, "num_gpus": 1 if cuda else 0, "max_batch_size": batch,
                              "batch_wait_timeout_s": 0.05, "max_ongoing_requests": max(64, 4 * batch)},
                "worker": {"num_cpus": 1},
            }), name="gpu-check", route_prefix="/")
            rows[batch] = load_run(f"http://127.0.0.1:{port}", load)
            print(f"serve: max_batch_size={batch}: {rows[batch]['requests_per_s']} req/s, p50 "
                  f"{rows[batch]['latency_p50_s']} s, p95 {rows[batch]['latency_p95_s']} s, mean batch "
                  f"{rows[batch]['mean_batch_size']}", flush=True)
    finally:
        serve.shutdown()
    first, last = min(rows), max(rows)
    return {"steps": args.serve_steps, "views": FRAMES, "dtype": "bfloat16" if cuda else "float32",
            "runs": {str(b): r for b, r in rows.items()},
            f"throughput_{last}_over_{first}": round(rows[last]["requests_per_s"] / rows[first]["requests_per_s"], 3),
            "target": 3.0}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--smoke", action="store_true", help="CPU, a tenth of SD's width, 64 px: plumbing only")
    parser.add_argument("--model", type=Path, help="an SD-layout folder to reuse (default: written under --work)")
    parser.add_argument("--data", help="multi-view shards for ray_train (default: 16 objects prepared here)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--max-objects", type=int, default=64, help="train: largest batch tried (objects)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--train-json", type=Path,
                        help="ray_train: compare with this earlier run's train part instead of measuring it again")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak, if the GPU is not in the table")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--serve-steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.max_objects, args.warmup, args.iters = min(args.max_objects, 2), 1, 2
        args.batches, args.requests, args.clients, args.serve_steps = [1, 2], 4, 2, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        parser.error("no CUDA device: run with --smoke for the CPU plumbing check")
    shape = SMOKE if args.smoke else FULL
    from machine_info import describe

    record = {"benchmark": "gpu_check", "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke,
              "machine": describe(("torch", "diffusers")), "parts": {}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record["machine"] |= {"gpu_memory_gib": round(props.total_memory / 2**30, 1),
                              "multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda}

    def save(part: str, value: dict) -> None:
        record["parts"][part] = value
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")

    ray_was_up = None
    if {"ray_train", "serve"} & set(args.parts):
        import ray

        ray_was_up = ray.is_initialized()  # a caller's cluster (a test's) is left running
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        tmp = args.work or Path(scratch)
        folder = args.model
        if folder is None:
            began = time.perf_counter()
            folder = write_sd_folder(tmp / "sd21_random", shape)
            record["model_write_s"] = round(time.perf_counter() - began, 1)
        from mvdream_platform.pipelines.loading import ModelConfig, build_pipeline, cast_components

        plain = None
        if args.train_json is not None:  # an earlier call's plain-loop figures (the device's
            plain = json.loads(args.train_json.read_text())["parts"]["train"]  # first call)
        if {"train", "sds"} & set(args.parts) or ("ray_train" in args.parts and plain is None):
            pipe = build_pipeline(ModelConfig(**model_values(folder)), device=device)
            pipe.set_progress_bar_config(disable=True)
            if "train" in args.parts or ("ray_train" in args.parts and args.train_json is None):
                plain = part_train(pipe, device, args, shape)
                save("train", plain)
            if "sds" in args.parts:
                pipe.unet.eval()
                if device.type == "cuda":  # the prior in bf16, as Serve's model.dtype=bfloat16
                    cast_components(pipe, torch.bfloat16)
                save("sds", part_sds(pipe, device, args, shape))
            del pipe
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "ray_train" in args.parts:
            save("ray_train", part_ray_train(folder, device, args, shape, plain, tmp))
        if "serve" in args.parts:
            save("serve", part_serve(folder, device, args, tmp))
    if ray_was_up is False:
        import ray

        ray.shutdown()
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
