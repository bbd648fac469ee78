"""Multi-view DreamBooth (paper §3.3): the subject's training data and the run's description.

The fine-tuning itself is the ordinary training loop (:mod:`mvdream_platform.training.loop`) with the
parameter-preservation loss on (``TrainerConfig.preservation_weight``) and the subject's data
in place of the procedural set. This module turns what a user has into that data:

* mesh files of the subject (``kind="meshes"``): rendered into a multi-view set with cameras,
  ``renders`` times with different elevation, field of view, distance and light, so that every
  Ray Train rank has records and the model sees the subject under varied conditions;
* plain images (``kind="images"``): text-image shards, trained as 2D steps (no camera);
* a multi-view folder with cameras (``kind="multiview"``, the layout of
  :mod:`mvdream_platform.data.layout`, e.g. posed photos of the subject converted to it):
  copied view for view, re-captioned;

every record captioned with the identifier prompt (``"a sks toy"``).

Beside the parameter-preservation loss, DreamBooth's other remedy against forgetting is
available too: **prior data** (:class:`PriorConfig`), data of the class or of the model's
original training set with its own captions, trained on a share of the steps. The loop's
3D/2D mixture carries it, so the prior must be of the other kind than the subject (text-image
shards beside a mesh subject, multi-view renders beside an image subject).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, replace
from typing import Any

from .. import storage
from . import layout
from .datasets import BadRecord, read_multiview_manifest, read_object_record
from .prepare import (
    IMAGE_SUFFIXES,
    MESH_SUFFIXES,
    RenderSettings,
    folder_pairs,
    glob_files,
    plan_meshes,
    prepare_multiview,
    prepare_text_images,
    write_manifest,
)

log = logging.getLogger(__name__)
KINDS = ("auto", "meshes", "images", "multiview")
MULTIVIEW_KINDS = ("meshes", "multiview")  # subjects trained as multi-view steps (with cameras)


@dataclass
class SubjectConfig:
    """The subject and how to prompt it."""

    uri: str = ""  # folder, glob or fsspec URI of the subject's mesh files, images or multi-view set
    kind: str = "auto"  # auto | meshes | images | multiview
    identifier: str = "sks"  # a rare token that becomes the subject's name
    class_noun: str = "toy"
    prompt_template: str = "a {identifier} {class_noun}"
    renders: int = 8  # meshes: rendered sets, each its own elevation / fov / distance / light
    views: int = 32  # meshes: azimuths per rendered set
    up_axis: str = "auto"
    seed: int = 0

    @property
    def prompt(self) -> str:
        return self.prompt_template.format(identifier=self.identifier, class_noun=self.class_noun)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not self.uri:
            raise ValueError("subject.uri is required: a folder, glob or URI of the subject's meshes or images")
        if self.kind not in KINDS:
            raise ValueError(f"subject.kind must be one of {KINDS}, got {self.kind!r}")
        if "{identifier}" not in self.prompt_template:
            raise ValueError(f"subject.prompt_template must contain {{identifier}}, got {self.prompt_template!r}")
        if not self.identifier.strip() or self.renders < 1 or self.views < 1:
            raise ValueError("subject.identifier must be non-empty, renders and views >= 1")


@dataclass
class PriorConfig:
    """Prior data trained beside the subject (DreamBooth's prior preservation)."""

    uri: str | None = None  # multi-view renders or text-image shards, with their own captions
    fraction: float = 0.5  # share of training steps on the prior

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.uri and not 0.0 < self.fraction < 1.0:
            raise ValueError(f"prior.fraction must lie in (0, 1) when prior.uri is set, got {self.fraction}")


def detect_prior_kind(uri: str) -> str:
    """``multiview`` (a ``jobs/prepare_data.py source=shapes|meshes`` folder) or ``images``
    (text-image shards); an error says what a prior folder must hold."""
    if is_multiview_folder(uri):
        return "multiview"
    if storage.exists(storage.join(uri, layout.IMAGES_MANIFEST)) or any(
            name.endswith((".parquet", ".tar")) for name in storage.listdir(uri)):
        return "images"
    raise ValueError(f"prior.uri={uri!r} is neither multi-view renders ({layout.MANIFEST} or "
                     f"{layout.OBJECTS_DIR}/) nor text-image shards ({layout.IMAGES_MANIFEST}, *.parquet, *.tar)")


def check_prior(subject_kind: str, prior: PriorConfig) -> str | None:
    """The prior's kind (None without a prior), after checking that it can share the 3D/2D
    mixture with a subject of ``subject_kind``: it must be the other kind. Cheap, so the job
    calls it before rendering the subject."""
    if not prior.uri:
        return None
    prior_kind = detect_prior_kind(prior.uri)
    if (prior_kind == "multiview") == (subject_kind in MULTIVIEW_KINDS):
        raise ValueError(f"prior.uri={prior.uri!r} holds {prior_kind} data like the subject ({subject_kind}); "
                         "the 3D/2D mixture needs the other kind: text-image shards beside meshes, "
                         "multi-view renders beside images")
    return prior_kind


def mixture_settings(subject_kind: str, subject_uri: str, prior: PriorConfig) -> dict[str, Any]:
    """The training data fields (``uri``, ``image_uri``, ``p_multiview``) for the subject and
    its optional prior: the subject's kind takes ``1 - prior.fraction`` of the steps."""
    prior_kind = check_prior(subject_kind, prior)
    if subject_kind in MULTIVIEW_KINDS:
        if prior_kind is None:
            return {"uri": subject_uri, "image_uri": None, "p_multiview": 1.0}
        return {"uri": subject_uri, "image_uri": prior.uri, "p_multiview": 1.0 - prior.fraction}
    if prior_kind is None:
        return {"uri": None, "image_uri": subject_uri, "p_multiview": 0.0}
    return {"uri": prior.uri, "image_uri": subject_uri, "p_multiview": prior.fraction}


def subject_files(uri: str) -> list[str]:
    """The mesh and image files ``uri`` names (a folder's direct children, a glob, one file)."""
    return sorted(p for p in glob_files(uri) if p.lower().endswith(MESH_SUFFIXES + IMAGE_SUFFIXES))


def is_multiview_folder(uri: str) -> bool:
    """True for a folder in the multi-view layout (``manifest.jsonl`` or ``objects/``)."""
    return storage.exists(storage.join(uri, layout.MANIFEST)) or storage.exists(storage.join(uri, layout.OBJECTS_DIR))


def detect_kind(subject: SubjectConfig) -> tuple[str, list[str]]:
    """(``meshes`` | ``images`` | ``multiview``, the files or object ids) for the subject; an
    error names what was found."""
    if subject.kind == "multiview" or (subject.kind == "auto" and is_multiview_folder(subject.uri)):
        objects = [entry["object_id"] for entry in read_multiview_manifest(subject.uri)[0]]
        if not objects:
            raise ValueError(f"subject.uri={subject.uri!r} holds no finished multi-view objects "
                             f"({layout.OBJECTS_DIR}/<id>/{layout.CAMERAS_FILE})")
        return "multiview", objects
    files = subject_files(subject.uri)
    meshes = [f for f in files if f.lower().endswith(MESH_SUFFIXES)]
    images = [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    kind = subject.kind
    if kind == "auto":
        kind = "meshes" if meshes else "images"
    chosen = meshes if kind == "meshes" else images
    if not chosen:
        raise ValueError(f"subject.uri={subject.uri!r} holds no {kind} "
                         f"({', '.join(MESH_SUFFIXES if kind == 'meshes' else IMAGE_SUFFIXES)}); "
                         f"found {len(files)} files")
    return kind, chosen


def recaption_multiview(source: str, out_uri: str, caption: str) -> int:
    """Copy every finished object of the multi-view folder ``source`` into ``out_uri`` with its
    caption replaced by ``caption``: views byte for byte, ``cameras.json`` last (it marks an
    object complete, so an interrupted copy resumes), then the manifest. Returns the count."""
    for entry in read_multiview_manifest(source)[0]:
        target = storage.join(out_uri, layout.OBJECTS_DIR, entry["object_id"])
        if storage.exists(storage.join(target, layout.CAMERAS_FILE)):
            continue
        origin = storage.join(source, entry["path"])
        try:
            record = read_object_record(origin)
            views = {layout.view_name(v): storage.read_bytes(storage.join(origin, layout.view_name(v)))
                     for v in range(record.num_views)}
        except (BadRecord, FileNotFoundError) as error:
            raise ValueError(f"subject object {origin!r} is unreadable: {error}") from error
        for name, data in views.items():
            storage.write_bytes(storage.join(target, name), data)
        record.caption = caption
        storage.write_json(storage.join(target, layout.CAMERAS_FILE), record.to_json())
    return write_manifest(out_uri)


def prepare_subject(subject: SubjectConfig, out_uri: str, resolution: int, workers: int = 0) -> dict[str, Any]:
    """Write the subject's training data under ``out_uri``; returns ``{"kind", "uri",
    "prompt", "records", "files"}``. A finished preparation with the same inputs is reused
    (its folder name hashes them), so a resumed run trains on identical data."""
    kind, files = detect_kind(subject)
    key = json.dumps({"files": files, **asdict(subject), "resolution": resolution}, sort_keys=True)
    folder = storage.join(out_uri, f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:12]}")
    prompt = subject.prompt
    if kind == "meshes":
        base = plan_meshes(subject.uri, captions={f.rsplit("/", 1)[-1]: prompt for f in files},
                           up_axis=subject.up_axis)
        specs = [replace(spec, object_id=f"{spec.object_id}-r{k:02d}", caption=prompt)
                 for spec in base for k in range(subject.renders)]
        settings = RenderSettings(views=subject.views, resolution=resolution, seed=subject.seed)
        summary = prepare_multiview(specs, folder, settings, backend="process" if len(specs) > 1 else "serial",
                                    workers=workers, progress=False)
        if summary.failed:
            raise ValueError(f"{summary.failed} subject renders failed: {summary.failures[:3]}")
        records = len(specs)
    elif kind == "multiview":
        records = recaption_multiview(subject.uri, folder, prompt)
    else:
        if not storage.exists(storage.join(folder, layout.IMAGES_MANIFEST)):
            captions = {f.rsplit("/", 1)[-1]: prompt for f in files}
            prepare_text_images(folder_pairs(subject.uri, captions), folder, source=f"dreambooth:{subject.uri}",
                                progress=False)
        records = storage.read_json(storage.join(folder, layout.IMAGES_MANIFEST))["rows"]
    log.info("subject %s: %d %s records captioned %r in %s", subject.uri, records, kind, prompt, folder)
    return {"kind": kind, "uri": folder, "prompt": prompt, "records": records, "files": files}
