"""Prepare training data: multi-view renders (shapes, meshes) or text-image shards (images).

    python jobs/prepare_data.py source=shapes num_objects=200 views=32 resolution=64 out=URI
    python jobs/prepare_data.py source=meshes input='meshes/*.glb' out=URI
    python jobs/prepare_data.py source=images input=builtin num_objects=200 out=URI
    python jobs/prepare_data.py source=shapes layout=shards out=URI     # parquet shards
    python jobs/prepare_data.py mode=shard input=FOLDER_LAYOUT out=URI   # convert to shards
    python jobs/prepare_data.py mode=validate source=shapes out=URI

Rerunning with the same `out` skips finished objects. On a Ray cluster:
    ray job submit --working-dir . -- python jobs/prepare_data.py backend=ray ...
"""

from __future__ import annotations

import _starting  # noqa: F401  (its first line, before the heavy imports below)

# isort: split
import logging

import hydra
from omegaconf import DictConfig

from mvdream_platform import storage
from mvdream_platform.data import datasets, prepare

from _common import save_resolved_config

log = logging.getLogger("prepare_data")
SOURCES = ("shapes", "meshes", "images")
MODES = ("prepare", "validate", "shard")
LAYOUTS = ("folders", "shards")


def run(cfg: DictConfig) -> dict:
    """Prepare or validate; returns the summary / validation report."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {cfg.source!r}")
    if cfg.layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {cfg.layout!r}")
    if cfg.mode == "shard":
        if not cfg.input:
            raise ValueError("input is required for mode=shard: a multi-view folder layout to convert")
        manifest = prepare.shard_folders(cfg.input, cfg.out, objects_per_shard=cfg.objects_per_shard)
        log.info("%d objects in %d shards at %s", manifest["rows"], len(manifest["shards"]), cfg.out)
        return manifest
    if cfg.mode == "validate":
        report = (datasets.validate_text_images(cfg.out) if cfg.source == "images"
                  else datasets.validate_multiview(cfg.out))
        storage.write_json(storage.join(cfg.out, "validation.json"), report)
        log.info("validation of %s: %s", cfg.out, {k: v for k, v in report.items() if not isinstance(v, (list, dict))})
        return report
    save_resolved_config(cfg, cfg.out)
    captions = prepare.load_captions(cfg.captions)
    if cfg.source == "images":
        if not cfg.input:
            raise ValueError("input is required for source=images: a folder/URI of images or 'builtin'")
        pairs = (prepare.builtin_pairs(cfg.num_objects, seed=cfg.seed, resolution=cfg.resolution,
                                         front_share=cfg.front_share,
                                         composite_share=cfg.composite_share,
                                         open_share=cfg.open_share,
                                         closed_fronts=cfg.closed_fronts)
                 if cfg.input == "builtin" else prepare.folder_pairs(cfg.input, captions))
        manifest = prepare.prepare_text_images(pairs, cfg.out, rows_per_shard=cfg.rows_per_shard,
                                               source=str(cfg.input))
        log.info("wrote %d image-caption rows in %d shards to %s (%d skipped)", manifest["rows"],
                 len(manifest["shards"]), cfg.out, manifest["skipped"])
        return manifest
    settings = prepare.RenderSettings(
        views=cfg.views, resolution=cfg.resolution, elevation_deg=tuple(cfg.elevation_deg),
        fovy_deg=tuple(cfg.fovy_deg), fill=tuple(cfg.fill), random_light=cfg.random_light,
        antialias=cfg.antialias, seed=cfg.seed, front_share=cfg.front_share,
        composite_share=cfg.composite_share, open_share=cfg.open_share,
        closed_fronts=cfg.closed_fronts,
    )
    if cfg.source == "shapes":
        specs = prepare.plan_shapes(cfg.num_objects, seed=cfg.seed)
    else:
        if not cfg.input:
            raise ValueError("input is required for source=meshes: a glob, folder or URI of mesh files")
        specs = prepare.plan_meshes(cfg.input, captions, up_axis=cfg.up_axis)
    summary = prepare.prepare_multiview(
        specs, cfg.out, settings, backend=cfg.backend, workers=cfg.workers,
        objects_per_shard=cfg.objects_per_shard if cfg.layout == "shards" else None)
    log.info("%s -> %s", summary.line(), cfg.out)
    for failure in summary.failures[:10]:
        log.warning("failed: %s: %s", failure["object_id"], failure["error"])
    return summary.__dict__


@hydra.main(config_path="../conf", config_name="prepare_data", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
