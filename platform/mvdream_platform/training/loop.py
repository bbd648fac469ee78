"""The per-worker training loop: joint multi-view (70%) + text-image (30%) fine-tuning.

Runs inside every Ray Train worker (or in-process): build the model from its description,
restore the latest checkpoint if the run has one, then step through the mixture. Read top to
bottom, it is the whole algorithm:

1. a batch of one kind: B objects x 4 views with cameras (num_frames=4, 3D attention and the
   camera MLP on), or 2D images (num_frames=1, camera None);
2. drop 10% of captions (per object) so classifier-free guidance works at sampling time;
3. encode captions (frozen text encoder) and images (frozen codec: identity or SD's VAE);
4. the LDM loss (eps or v) at one timestep per object; backward, clip, AdamW, lr schedule, EMA;
5. every ``checkpoint_every`` steps rank 0 writes the full training state and every worker
   reports to Ray Train (a barrier), so a restarted worker group resumes at the exact step;
6. every ``samples.every`` steps rank 0 logs a multi-view sample grid for held-out captions.

Each logged window carries the step-time breakdown: data, forward, backward (which contains
the part of DDP's overlapped gradient all-reduce that was not hidden), optimizer (clip, AdamW,
EMA) and, with more than one worker, the summed wall time of the bucket all-reduces themselves
(:mod:`.comm_timing`). On CUDA the timers synchronise the device; ``loss.item()`` already does
once per micro-step, so this adds no new stall.

``cluster.parallel_strategy`` picks DDP (the default) or FSDP (:mod:`.parallel`). DDP's
``find_unused_parameters`` is on: on 2D steps the camera MLP takes no part in the loss, and every
rank runs the same kind of step (the mixture guarantees it), so those parameters simply get no
gradient anywhere and AdamW leaves them untouched. Under FSDP, gathering weights is a collective:
checkpoints, sample grids and the final pipeline are gathered by every rank and written by rank
0, and the all-reduce is not timed (FSDP reduce-scatters inside its own hooks).
``trainer.compile`` compiles the UNet in place (``nn.Module.compile``: parameter names, and so
checkpoints, stay those of the plain module).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import time
import zlib
from typing import Any

import torch

from .. import storage
from ..diffusion import NoiseSchedule, check_terminal_snr
from ..pipelines.loading import build_pipeline
from .checkpointing import load_training_state, restore_newest_good, write_training_state
from .comm_timing import attach_allreduce_timer
from .config import TrainJobConfig
from .losses import ParameterPreservation, diffusion_loss, drop_text, timestep_weights
from .optim import EMA, build_lr_scheduler, build_optimizer, clip_grad_norm, unwrap_model
from .parallel import (
    drop_unused_gradients,
    exported_weights,
    is_fsdp,
    parameter_ndims,
    training_snapshot,
    wrap_model,
)
from .samples import sample_grid

log = logging.getLogger(__name__)

PIPELINE_DIR = "pipeline"


def run_dir(cfg: TrainJobConfig) -> str:
    """Where this run's checkpoints, final pipeline and records live."""
    return storage.join(cfg.run.storage_path, cfg.run.name)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """Noise/timestep/dropout randomness of one (rank, step): identical after a resume."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{rank}:{step}".encode()))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (also callable in-process with ``ray.train`` unavailable)."""
    import ray.train

    cfg = TrainJobConfig.from_dict(config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, cfg.cluster.torch_threads))
    device = _device(cfg)

    # Every rank builds the same initial weights (seeded); a checkpoint then overrides them.
    pipe = build_pipeline(cfg.model, device="cpu", seed=cfg.trainer.seed)
    # The sampler must denoise with the parameterisation the model is trained for; unset, that is
    # the model's own (a saved v model is fine-tuned as a v model).
    prediction_type = cfg.trainer.prediction_type or pipe.scheduler.config.prediction_type
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config,
                                                      prediction_type=prediction_type)
    unet, text_encoder, codec = pipe.unet.to(device), pipe.text_encoder.to(device), pipe.codec.to(device)
    pipe.set_progress_bar_config(disable=True)  # sample grids log one line, not a bar
    unet.train()
    if cfg.trainer.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.trainer.compile:
        unet.compile()
    check_terminal_snr(pipe.scheduler.config, prediction_type)
    schedule = NoiseSchedule.from_scheduler_config(dict(pipe.scheduler.config)).to(device)
    t_weights = timestep_weights(schedule.num_train_timesteps, cfg.trainer.timestep_bias_range,
                                 cfg.trainer.timestep_bias_multiplier)
    # theta_0 for DreamBooth's preservation loss: the starting weights, copied before any
    # checkpoint is restored.
    preservation = (ParameterPreservation(unet, cfg.trainer.preservation_weight, cfg.trainer.preservation_distance)
                    if cfg.trainer.preservation_weight > 0 else None)

    # Wrap before the optimizer and EMA: FSDP replaces the parameters by views of its shards.
    ndims = parameter_ndims(unet)
    model = wrap_model(unet, cfg.cluster.parallel_strategy, world, device)
    comm_timer = attach_allreduce_timer(model) if world > 1 and not is_fsdp(model) else None
    optimizer = build_optimizer(model, lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay, ndims=ndims)
    lr_scheduler = build_lr_scheduler(optimizer, warmup_steps=cfg.trainer.warmup_steps,
                                      total_steps=cfg.trainer.max_steps,
                                      schedule=cfg.trainer.lr_schedule,
                                      min_lr_ratio=cfg.trainer.min_lr_ratio)
    ema = EMA(model, decay=cfg.trainer.ema_decay) if cfg.trainer.ema_decay > 0 else None

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a damaged newest checkpoint falls back to the newest intact one
        state, _ = restore_newest_good(
            checkpoint, lambda: run_checkpoints(cfg),
            lambda folder: load_training_state(folder, model=model, optimizer=optimizer,
                                               lr_scheduler=lr_scheduler, ema=ema))
        start_step = state["step"]
        log.info("rank %d resumed from step %d", rank, start_step)

    loader = make_loader(cfg, rank, world, start_micro_step=start_step * cfg.trainer.grad_accumulation)
    batches = iter(loader)
    tracker = _start_tracker(cfg, rank) if rank == 0 else None
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                              enabled=cfg.trainer.mixed_precision == "bf16")
    clock = _Clock(device)

    window = _Window()
    for step in range(start_step, cfg.trainer.max_steps):
        _maybe_crash(cfg, step, rank, world)
        generator = step_generator(cfg.trainer.seed, rank, step)
        optimizer.zero_grad(set_to_none=True)
        for micro in range(cfg.trainer.grad_accumulation):
            t0 = clock()
            batch = next(batches)
            t1 = clock()
            last = micro == cfg.trainer.grad_accumulation - 1
            sync = contextlib.nullcontext() if (last or world == 1) else model.no_sync()
            with sync:
                loss, info = _micro_step(model, text_encoder, codec, schedule, batch, cfg, generator,
                                         device, autocast, prediction_type, t_weights)
                t2 = clock()
                (loss / cfg.trainer.grad_accumulation).backward()
            window.add(loss.item(), batch, data_s=t1 - t0, forward_s=t2 - t1, backward_s=clock() - t2)
        # DreamBooth's preservation term: its gradient goes straight into .grad after the
        # all-reduce (see ParameterPreservation.add_gradient for why not through autograd).
        if preservation is not None:
            window.add_preservation(preservation.add_gradient())
        t3 = clock()
        drop_unused_gradients(model)  # FSDP: as DDP, no gradient for what a step did not use
        grad_norm = clip_grad_norm(model, cfg.trainer.grad_clip)
        optimizer.step()
        lr_scheduler.step()
        if ema is not None:
            ema.update(model)
        # the all-reduce: timed under DDP, none with one worker, not timed under FSDP
        allreduce_s = comm_timer.take()[0] if comm_timer is not None else (None if is_fsdp(model) else 0.0)
        window.add_step(optimizer_s=clock() - t3, allreduce_s=allreduce_s)

        done = step + 1
        is_checkpoint = done % cfg.trainer.checkpoint_every == 0 or done == cfg.trainer.max_steps
        if _sample_due(cfg, done) and (rank == 0 or is_fsdp(model)):
            # Sampling time is not training time: keep it out of this window's images/s.
            window.start += _log_samples(cfg, pipe, model, ema, tracker, done, autocast, device)
        if done % cfg.trainer.log_every == 0 or is_checkpoint:
            metrics = window.flush(done, lr_scheduler.get_last_lr()[0], grad_norm, world)
            if tracker is not None:
                tracker.log(metrics, step=done)
                log.info("step %d/%d loss %.4f lr %.2e %.1f img/s", done, cfg.trainer.max_steps,
                         metrics["loss"], metrics["lr"], metrics["images_per_s"])
            _report(metrics, done, is_checkpoint, rank, model, optimizer, lr_scheduler, ema, loader, device)

    final = _exported_unet(pipe.unet, model, ema, device)  # a collective under FSDP
    if rank == 0:
        _write_final_pipeline(cfg, pipe, final)
        if tracker is not None:
            tracker.finish()


def _device(cfg: TrainJobConfig) -> torch.device:
    import ray.train.torch

    return ray.train.torch.get_device() if cfg.cluster.use_gpu else torch.device("cpu")


def _micro_step(model, text_encoder, codec, schedule, batch, cfg, generator, device, autocast,
                prediction_type, t_weights=None):
    """One micro-batch: returns (loss, info)."""
    frames = batch.num_frames
    captions = drop_text(batch.captions, cfg.trainer.text_dropout, generator, num_frames=frames)
    with torch.no_grad():
        context = text_encoder.encode(captions).to(device)
        x0 = codec.encode(batch.images.to(device))
    camera = batch.cameras.to(device) if batch.cameras is not None else None
    with autocast:
        return diffusion_loss(model, x0, context, camera, frames, schedule,
                              prediction_type=prediction_type, generator=generator,
                              t_weights=t_weights)


def run_checkpoints(cfg: TrainJobConfig) -> list:
    """Every checkpoint folder Ray Train wrote for this run, newest first (its folder names
    carry the time they were written)."""
    import ray.train

    names = [n for n in storage.listdir(run_dir(cfg))  # (not Ray's checkpoint_manager_snapshot.json)
             if n.startswith("checkpoint_") and storage.is_dir(storage.join(run_dir(cfg), n))]
    return [ray.train.Checkpoint(storage.join(run_dir(cfg), n)) for n in sorted(names, reverse=True)]


def make_loader(cfg: TrainJobConfig, rank: int, world: int, start_micro_step: int):
    from ..data.mixture import MixtureLoader

    data = cfg.data
    if data.loader == "ray_data":  # in a Ray Train worker: this rank's splits of the datasets
        import ray.train

        from ..data.ray_ingest import RayDataMixture

        kinds = [k for k, uri in (("multiview", data.uri), ("image", data.image_uri)) if uri]
        return RayDataMixture({k: ray.train.get_dataset_shard(k) for k in kinds},
                              {"multiview": data.multiview_batch, "image": data.image_batch},
                              p_multiview=data.p_multiview, seed=cfg.trainer.seed,
                              start_step=start_micro_step)
    return MixtureLoader.from_uris(
        data.uri, data.image_uri, resolution=data.resolution, num_views=data.num_views,
        background=data.background, seed=cfg.trainer.seed, multiview_batch=data.multiview_batch,
        image_batch=data.image_batch,
        p_multiview=data.p_multiview, rank=rank, world_size=world, num_workers=data.num_workers,
        start_step=start_micro_step,
    )


def _sample_due(cfg: TrainJobConfig, step: int) -> bool:
    every = cfg.samples.every
    return every > 0 and (step % every == 0 or step == cfg.trainer.max_steps)


def _log_samples(cfg: TrainJobConfig, pipe, model, ema, tracker, step: int, autocast, device) -> float:
    """Rank 0: the sample grid for the held-out captions, to W&B and tracking/media; seconds.
    Under FSDP every rank calls it (gathering the weights is a collective)."""
    start = time.perf_counter()
    if is_fsdp(model):
        plain = _exported_unet(pipe.unet, model, ema, device)
        sampler, ema = _PlainUNet(pipe, plain), None
    else:
        sampler = contextlib.nullcontext(model)
    if tracker is None:
        return time.perf_counter() - start
    captions = cfg.samples.resolved_captions()
    guidance = cfg.samples.guidance_scale or cfg.model.guidance_scale or 7.5
    with sampler as sampled:
        grid = sample_grid(pipe, sampled, ema, cfg.samples, captions, guidance,
                           resolution=cfg.data.resolution, autocast=autocast)
    tracker.log_images("samples", grid, captions=[" | ".join(captions)], step=step)
    seconds = time.perf_counter() - start
    log.info("step %d: sample grid for %d held-out captions in %.1f s", step, len(captions), seconds)
    return seconds


class _Clock:
    """perf_counter that first waits for queued CUDA work, so GPU phases are timed, not queued."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class _Window:
    """Running sums between two reports: loss, images, and the step-time breakdown."""

    PHASES = ("data", "forward", "backward", "optimizer", "allreduce")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.losses, self.images, self.samples, self.steps = [], 0, 0, 0
        self.preservation: list[float] = []
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self.kinds = {"multiview": 0, "image": 0}
        self.skipped = 0
        self.start = time.perf_counter()

    def add(self, loss: float, batch: dict, data_s: float, forward_s: float, backward_s: float) -> None:
        """One micro-batch (``loss`` is the diffusion loss)."""
        self.losses.append(loss)
        self.images += batch.images.shape[0]
        # A sample is one object (its 4 views) on multi-view steps, one image on 2D steps.
        self.samples += batch.images.shape[0] // batch.num_frames
        self.seconds["data"] += data_s
        self.seconds["forward"] += forward_s
        self.seconds["backward"] += backward_s
        self.kinds[batch.kind] += 1
        self.skipped += int(batch.skipped["count"])

    def add_preservation(self, value: float) -> None:
        """DreamBooth's preservation term of one optimizer step."""
        self.preservation.append(value)

    def add_step(self, optimizer_s: float, allreduce_s: float | None) -> None:
        """One optimizer step (after its micro-batches); ``allreduce_s`` None: not timed."""
        self.steps += 1
        self.seconds["optimizer"] += optimizer_s
        if allreduce_s is None:
            self.seconds["allreduce"] = None
        elif self.seconds["allreduce"] is not None:
            self.seconds["allreduce"] += allreduce_s

    def flush(self, step: int, lr: float, grad_norm: float, world: int) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        loss = torch.tensor(sum(self.losses) / max(len(self.losses), 1))
        if world > 1:  # the logged loss is the mean over ranks (SUM: gloo lacks AVG on older torch)
            torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.SUM)
            loss /= world
        metrics = {
            "step": step, "loss": float(loss), "lr": float(lr), "grad_norm": float(grad_norm),
            "images_per_s": self.images * world / seconds,
            "samples_per_s": self.samples * world / seconds,
            "step_time_s": seconds / max(self.steps, 1),
            "multiview_fraction": self.kinds["multiview"] / max(sum(self.kinds.values()), 1),
            "skipped_records": self.skipped,
            "max_rss_mb": _max_rss_mb(),
        }
        if self.preservation:  # identical on every rank (same weights): no reduction needed
            metrics["preservation_loss"] = sum(self.preservation) / len(self.preservation)
        # Per optimizer step, this rank's view; sampling and reporting time is not in any phase.
        for phase, total in self.seconds.items():
            if total is not None:
                metrics[f"{phase}_time_s"] = total / max(self.steps, 1)
        if torch.cuda.is_available():
            metrics["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        self.reset()
        return metrics


def _report(metrics, step, is_checkpoint, rank, model, optimizer, lr_scheduler, ema, loader, device) -> None:
    """Every worker reports (Ray Train's barrier); rank 0 attaches the checkpoint."""
    import ray.train

    snapshot = None
    if is_checkpoint and (rank == 0 or is_fsdp(model)):  # gathering is a collective under FSDP
        snapshot = training_snapshot(model, optimizer, ema, device)
    with tempfile.TemporaryDirectory(prefix="mvdream-ckpt-") as folder:
        checkpoint = None
        if snapshot is not None and rank == 0:
            write_training_state(folder, snapshot, lr_scheduler=lr_scheduler, step=step,
                                 loader_state=_loader_state(loader))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def _loader_state(loader) -> dict:
    try:
        return loader.state_dict()
    except Exception:  # informational only: the loader position is a function of the step
        return {}


def _exported_unet(unet, model, ema, device):
    """The UNet the run exports, with the EMA weights when EMA is on. Plain / DDP: ``unet``
    itself, the average copied in (the end of training). FSDP: every rank gathers the full
    weights; rank 0 gets them in a fresh copy of ``unet`` (the others get None)."""
    if not is_fsdp(model):
        final = unwrap_model(model)
        if ema is not None:
            ema.copy_to(final)
        return final
    import torch.distributed as dist

    weights = exported_weights(model, ema, device)
    if dist.get_rank() != 0:
        return None
    final = type(unet).from_config(unet.config)
    final.load_state_dict(weights)
    return final.to(device)


class _PlainUNet:
    """``with _PlainUNet(pipe, unet) as unet:`` the pipeline samples with ``unet``, then gets
    its own back (FSDP's module cannot run a forward on one rank alone)."""

    def __init__(self, pipe, unet):
        self.pipe, self.unet, self.kept = pipe, unet, None

    def __enter__(self):
        self.kept, self.pipe.unet = self.pipe.unet, self.unet
        return self.unet

    def __exit__(self, *exc) -> None:
        self.pipe.unet = self.kept


def _write_final_pipeline(cfg: TrainJobConfig, pipe, final) -> None:
    """The trained model as an MVDreamPipeline folder at ``<run>/pipeline``."""
    pipe.unet = final.eval()
    with tempfile.TemporaryDirectory(prefix="mvdream-final-") as folder:
        pipe.save_pretrained(folder)
        storage.put_dir(folder, storage.join(run_dir(cfg), PIPELINE_DIR))
    log.info("wrote the trained pipeline to %s", storage.join(run_dir(cfg), PIPELINE_DIR))


def _start_tracker(cfg: TrainJobConfig, rank: int):
    from ..tracking import start_tracking, tracking_dir

    return start_tracking(mode=cfg.logger.mode, project=cfg.logger.project, run_name=cfg.run.name,
                          group=None, config=cfg.to_dict(), dir=tracking_dir(run_dir(cfg), cfg.run.name),
                          rank=rank, job_type="train", resume_id=f"train-{cfg.run.name}")


def _maybe_crash(cfg: TrainJobConfig, step: int, rank: int, world: int) -> None:
    """Test hook: SIGKILL the last worker at ``crash_at_step`` once per run (marker file)."""
    if cfg.crash_at_step is None or step != cfg.crash_at_step or rank != world - 1:
        return
    marker = storage.join(run_dir(cfg), ".crash_injected")
    if storage.exists(marker):
        return
    storage.write_text(marker, str(step))
    log.warning("crash_at_step=%d: killing worker rank %d (pid %d)", step, rank, os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


def _max_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
