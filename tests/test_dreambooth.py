"""Multi-view DreamBooth: the preservation loss, the subject's data, the job on Ray Train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mvdream_platform.data.datasets import MultiViewDataset
from mvdream_platform.data.dreambooth import (
    PriorConfig,
    SubjectConfig,
    detect_kind,
    detect_prior_kind,
    mixture_settings,
    prepare_subject,
)
from mvdream_platform.pipelines import MVDreamPipeline
from mvdream_platform.training.losses import ParameterPreservation

from conftest import MESHES, shutdown_ray
from jobs_helpers import ROOT, compose, import_job

DUCK = MESHES / "Duck.glb"  # the checkout's copy: tests never reach outside it


def test_preservation_loss_is_the_papers_formula():
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    keep = ParameterPreservation(module, weight=2.0, distance="l1")
    assert keep().item() == 0.0 and keep.count == 3 * 4 + 4 + 4 * 2 + 2
    with torch.no_grad():
        module[0].weight.add_(0.5)  # 12 scalars moved by 0.5
        module[1].bias.sub_(1.0)  # 2 scalars moved by 1
    assert keep().item() == pytest.approx(2.0 * (12 * 0.5 + 2 * 1.0) / 26)
    squared = ParameterPreservation(module, weight=1.0, distance="l2")
    assert squared().item() == 0.0  # theta_0 is taken when the loss is built
    keep().backward()
    assert torch.allclose(module[1].bias.grad, torch.full((2,), -2.0 / 26))
    assert torch.all(module[0].bias.grad == 0)  # unmoved parameters: |0| has zero subgradient
    with pytest.raises(ValueError, match="'l1' or 'l2'"):
        ParameterPreservation(module, distance="cosine")


@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_preservation_gradient_added_in_place_equals_autograd(distance):
    """The loop adds the term's gradient after the DDP all-reduce; it must equal backward()."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Linear(6, 3))
    keep = ParameterPreservation(module, weight=7.0, distance=distance)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        module[1].bias[0] = keep.reference[3][0]  # one unmoved scalar: subgradient 0
    keep().backward()
    expected = [p.grad.clone() for p in module.parameters()]
    value = keep().item()
    existing = [torch.randn_like(p) for p in module.parameters()]
    for p, g in zip(module.parameters(), existing):
        p.grad = g.clone()
    assert keep.add_gradient() == pytest.approx(value, rel=1e-5)
    for p, g, e in zip(module.parameters(), existing, expected):
        assert torch.allclose(p.grad, g + e, atol=1e-7)  # added to what backward left there
    assert module[1].bias.grad[0] == existing[3][0]  # the unmoved scalar: nothing added


def test_preservation_holds_weights_near_the_start():
    """Same data, same steps: the regularised fine-tune ends closer to theta_0."""
    def finetune(weight: float) -> float:
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 1)
        start = [p.detach().clone() for p in model.parameters()]
        keep = ParameterPreservation(model, weight=weight)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        x, y = torch.randn(64, 8, generator=torch.Generator().manual_seed(1)), torch.ones(64, 1)
        for _ in range(100):
            opt.zero_grad()
            ((model(x) - y).pow(2).mean() + keep()).backward()
            opt.step()
        return sum((p - s).abs().sum().item() for p, s in zip(model.parameters(), start))

    assert finetune(50.0) < 0.5 * finetune(0.0)


def test_subject_meshes_become_captioned_multiview_records(tmp_path):
    subject = SubjectConfig(uri=str(DUCK), identifier="sks", class_noun="toy", renders=3, views=4)
    assert detect_kind(subject)[0] == "meshes"
    out = prepare_subject(subject, str(tmp_path / "subject"), resolution=16)
    assert out["kind"] == "meshes" and out["records"] == 3 and out["prompt"] == "a sks toy"
    dataset = MultiViewDataset(out["uri"], resolution=16, num_views=4)
    assert len(dataset) == 3
    items = [dataset[i] for i in range(3)]
    assert {it["caption"] for it in items} == {"a sks toy"}
    assert items[0]["images"].shape == (4, 3, 16, 16) and items[0]["cameras"].shape == (4, 16)
    # each rendered set has its own camera elevation (varied conditions, one subject)
    assert len({round(float(it["cameras"][0, 11]), 4) for it in items}) == 3
    again = prepare_subject(subject, str(tmp_path / "subject"), resolution=16)
    assert again["uri"] == out["uri"]  # reused, not re-rendered


def test_posed_multiview_subject_is_copied_and_recaptioned(tmp_path):
    """A subject already in the multi-view layout (e.g. posed photos): views byte for byte,
    cameras kept, captions replaced by the identifier prompt; a broken object is named."""
    from mvdream_platform.data.prepare import RenderSettings, plan_shapes, prepare_multiview

    source = str(tmp_path / "posed")
    prepare_multiview(plan_shapes(2, seed=3), source, RenderSettings(views=4, resolution=16), backend="serial",
                      progress=False)
    subject = SubjectConfig(uri=source, identifier="zwx", class_noun="vase")
    assert detect_kind(subject)[0] == "multiview"
    out = prepare_subject(subject, str(tmp_path / "subject"), resolution=16)
    assert out["kind"] == "multiview" and out["records"] == 2 and out["prompt"] == "a zwx vase"
    copied, original = MultiViewDataset(out["uri"], num_views=4), MultiViewDataset(source, num_views=4)
    for i in range(2):
        a, b = copied.load(i, epoch=0), original.load(i, epoch=0)
        assert a["caption"] == "a zwx vase" and b["caption"] != a["caption"]
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["cameras"], b["cameras"])
    assert mixture_settings("multiview", out["uri"], PriorConfig()) == {"uri": out["uri"], "image_uri": None,
                                                                        "p_multiview": 1.0}
    broken = tmp_path / "broken"
    prepare_multiview(plan_shapes(1, seed=4), str(broken), RenderSettings(views=4, resolution=16),
                      backend="serial", progress=False)
    next(broken.glob("objects/*/view_002.png")).unlink()
    with pytest.raises(ValueError, match=r"shape-000000.* is unreadable: .*view_002.png"):
        prepare_subject(SubjectConfig(uri=str(broken)), str(tmp_path / "subject2"), resolution=16)
    with pytest.raises(ValueError, match="no finished multi-view objects"):
        detect_kind(SubjectConfig(uri=str(tmp_path / "photos_missing"), kind="multiview"))


def test_subject_images_become_text_image_shards(tmp_path):
    import PIL.Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        PIL.Image.new("RGB", (20, 20), (200, 40 * i, 0)).save(folder / f"p{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = prepare_subject(SubjectConfig(uri=str(folder), identifier="zxq", class_noun="dog"),
                          str(tmp_path / "subject"), resolution=16)
    assert out["kind"] == "images" and out["records"] == 3 and out["prompt"] == "a zxq dog"


def test_subject_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="subject.uri is required"):
        SubjectConfig().validate()
    with pytest.raises(ValueError, match="holds no meshes"):
        detect_kind(SubjectConfig(uri=str(tmp_path), kind="meshes"))
    with pytest.raises(ValueError, match=r"must contain \{identifier\}"):
        SubjectConfig(uri="x", prompt_template="a toy").validate()


def write_prior_shards(folder: Path) -> str:
    """A tiny text-image prior: 6 coloured squares with their own captions."""
    import PIL.Image

    from mvdream_platform.data.prepare import folder_pairs, prepare_text_images

    images = folder / "prior_images"
    images.mkdir()
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    captions = {}
    for i, (name, rgb) in enumerate(list(colours.items()) * 2):
        PIL.Image.new("RGB", (32, 32), rgb).save(images / f"c{i}.png")
        captions[f"c{i}.png"] = f"a {name} cube"
    out = str(folder / "prior")
    prepare_text_images(folder_pairs(str(images), captions), out, source="test-prior", progress=False)
    return out


def test_prior_data_joins_the_mixture_as_the_other_kind(tmp_path):
    prior = write_prior_shards(tmp_path)
    assert detect_prior_kind(prior) == "images"
    fields = mixture_settings("meshes", "subject/", PriorConfig(uri=prior, fraction=0.3))
    assert fields == {"uri": "subject/", "image_uri": prior, "p_multiview": pytest.approx(0.7)}
    assert mixture_settings("meshes", "subject/", PriorConfig()) == {"uri": "subject/", "image_uri": None,
                                                                      "p_multiview": 1.0}
    subject = prepare_subject(SubjectConfig(uri=str(DUCK), renders=1, views=4), str(tmp_path / "s"), 16)
    assert detect_prior_kind(subject["uri"]) == "multiview"
    assert mixture_settings("images", "photos/", PriorConfig(uri=subject["uri"], fraction=0.4)) == {
        "uri": subject["uri"], "image_uri": "photos/", "p_multiview": 0.4}
    with pytest.raises(ValueError, match="holds images data like the subject"):
        mixture_settings("images", "photos/", PriorConfig(uri=prior))
    with pytest.raises(ValueError, match="neither multi-view renders"):
        detect_prior_kind(str(tmp_path / "prior_images"))
    with pytest.raises(ValueError, match=r"prior.fraction must lie in \(0, 1\)"):
        mixture_settings("meshes", "subject/", PriorConfig(uri=prior, fraction=1.0))


@pytest.mark.slow
def test_dreambooth_job_on_two_ray_workers(tmp_path):
    """Mesh subject + 2D prior + preservation under DDP: 2D steps leave the camera MLP unused,
    which once made the preservation term's autograd hook fire twice."""
    import ray

    prior = write_prior_shards(tmp_path)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        job = import_job("dreambooth")
        record = job.run(compose("dreambooth", [
            f"subject.uri={DUCK}", "subject.renders=2", "subject.views=4", "model=tiny",
            "cluster=local_cpu", "logger=disabled", "trainer.max_steps=6", "trainer.checkpoint_every=3",
            "trainer.log_every=1", "trainer.lr=1e-3", "samples.every=0", "preservation.weight=1000",
            f"prior.uri={prior}", "prior.fraction=0.5", "data.multiview_batch=2", "data.image_batch=2",
            f"run.storage_path={tmp_path}", "run.name=db"]))
    finally:
        shutdown_ray()
    run = Path(tmp_path) / "db"
    assert record["prompt"] == "a sks toy" and record["subject_records"] == 2
    saved = json.loads((run / "dreambooth.json").read_text())
    assert saved["preservation"] == {"weight": 1000, "distance": "l1"}
    assert saved["prior"] == {"uri": prior, "fraction": 0.5}
    lines = [json.loads(x) for x in (run / "tracking" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    # subject (multi-view) steps and prior (2D) steps both ran
    assert {m["multiview_fraction"] for m in lines} == {0.0, 1.0}
    # the preservation term is logged: 0 before the first update (warm-up starts at lr 0), then
    # positive once the weights have left theta_0
    kept = [m["preservation_loss"] for m in lines]
    assert kept[0] == 0 and all(k > 0 for k in kept[2:])
    pipe = MVDreamPipeline.from_pretrained(run / "pipeline")
    base = MVDreamPipeline.from_pretrained(ROOT / "checkpoints" / "tiny")
    moved = sum((a - b).abs().sum().item() for a, b in zip(pipe.unet.parameters(), base.unet.parameters()))
    assert moved > 0  # fine-tuned from the shipped model, not from scratch
    images = pipe("a sks toy", num_views=4, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 4, 32, 32, 3)
