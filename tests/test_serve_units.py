"""The Serve application's parts without a cluster: settings, job store, leases, request
validation, batch-invariant sampling, the exported config files."""

# No `from __future__ import annotations`: the echo routes' body models are local classes.

import json
import time

import numpy as np
import pytest
import torch
import yaml
from fastapi.testclient import TestClient

from mvdream_platform.serve.app import build_api, openapi_document
from mvdream_platform.serve.generator import SampleItem, SamplingKey, sample_items
from mvdream_platform.serve.runner import job_sds_config, lease_is_live
from mvdream_platform.serve.settings import Limits, ServeSettings
from mvdream_platform.serve.store import JobStore, UnknownAsset, UnknownJob

from jobs_helpers import ROOT, compose, import_job

TINY_MODEL = yaml.safe_load((ROOT / "conf" / "model" / "tiny.yaml").read_text())


def test_settings_name_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match=r"unknown serve.limits keys \['max_promts'\]"):
        ServeSettings.from_dict({"model": TINY_MODEL, "limits": {"max_promts": 3}})
    with pytest.raises(ValueError, match="lease_timeout_s > heartbeat_s"):
        ServeSettings.from_dict({"model": TINY_MODEL, "worker": {"heartbeat_s": 10, "lease_timeout_s": 5}})
    with pytest.raises(ValueError, match="default_sds_steps"):
        ServeSettings.from_dict({"model": TINY_MODEL, "default_sds_steps": 5000})
    s = ServeSettings.from_dict({"model": TINY_MODEL, "limits": {"view_choices": [1, 4]},
                                 "generator": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}}})
    assert s.limits.view_choices == (1, 4)
    opts = s.generator.options()
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3} and "num_replicas" not in opts
    assert s.worker.options()["max_ongoing_requests"] == 1


def test_job_store_lifecycle_and_asset_names(tmp_path):
    store = JobStore(str(tmp_path))
    a = store.create("a red cube", {"steps": 10})
    time.sleep(1.1)  # ids sort by creation second
    b = store.create("a blue cone", {"steps": 10})
    assert store.job_ids() == [a, b] and store.unfinished() == [a, b]
    assert store.view(a)["status"] == "queued"
    store.set_state(a, "succeeded", attempts=1)
    store.write_result(a, {"assets": ["mesh.glb"], "metrics": {}})
    (tmp_path / "jobs" / a / "out").mkdir()
    (tmp_path / "jobs" / a / "out" / "mesh.glb").write_bytes(b"glb")
    assert store.unfinished() == [b]
    view = store.view(a)
    assert view["status"] == "succeeded" and view["assets"] == ["mesh.glb"] and view["finished"]
    assert store.asset_uri(a, "mesh.glb").endswith(f"{a}/out/mesh.glb")
    for bad in ("../request.json", "..", "checkpoints/latest.json", "/etc/passwd", "metrics.json"):
        with pytest.raises(UnknownAsset):
            store.asset_uri(a, bad)
    for bad in ("..", "../jobs", "x" * 10, a + "/.."):
        with pytest.raises(UnknownJob):
            store.view(bad)
    # a result written before the queue could record it (the queue died) counts as success
    store.write_result(b, {"assets": [], "metrics": {}})
    assert store.view(b)["status"] == "succeeded" and store.unfinished() == [b]
    (tmp_path / "jobs" / b / "result.json").unlink()
    store.request_cancel(b)
    assert store.view(b)["status"] == "cancelled"  # no worker holds it: nothing to wait for
    with pytest.raises(ValueError, match="unknown job status"):
        store.set_state(b, "exploded")


def test_store_works_on_fsspec_memory():
    store = JobStore("memory://serve-test")
    job = store.create("a cube", {})
    assert store.unfinished() == [job] and store.request(job)["prompt"] == "a cube"


def test_lease_liveness():
    now = time.time()
    assert not lease_is_live(None, 30)
    assert lease_is_live({"heartbeat": now, "owner": "w1", "phase": "optimising"}, 30)
    assert not lease_is_live({"heartbeat": now - 60, "owner": "w1"}, 30)  # stale
    assert not lease_is_live({"heartbeat": now, "owner": "w1", "phase": "done"}, 30)
    assert not lease_is_live({"heartbeat": now, "owner": "w1"}, 30, owner_alive=lambda o: False)  # dead owner
    assert lease_is_live({"heartbeat": now, "owner": "w1"}, 30, owner_alive=lambda o: True)
    # a live owner keeps its job through a late heartbeat: a slow step is not a death
    assert lease_is_live({"heartbeat": now - 60, "owner": "w1"}, 30, owner_alive=lambda o: True)


def test_job_options_override_server_sds_config():
    settings = ServeSettings.from_dict({"model": TINY_MODEL, "sds": {"guidance": {"guidance_scale": 7.5}},
                                        "default_sds_steps": 123})
    cfg = job_sds_config(settings, {"guidance_scale": None, "guidance": "mvdream"})
    assert cfg.steps == 123 and cfg.guidance.guidance_scale == 7.5
    cfg = job_sds_config(settings, {"steps": 9, "guidance": "dreamfusion", "guidance_scale": 3.0,
                                    "negative_prompt": "blurry", "cfg_rescale": 0.2})
    assert (cfg.steps, cfg.guidance_kind, cfg.guidance.guidance_scale) == (9, "dreamfusion", 3.0)
    assert cfg.guidance.negative_prompt == "blurry" and cfg.guidance.recon_std_rescale == 0.2
    assert settings.sds["guidance"] == {"guidance_scale": 7.5}  # the server's config is untouched


def _validation_client(limits: Limits) -> TestClient:
    """The real FastAPI app, error handlers and body limit, with one echo route per model."""
    settings = ServeSettings(model=TINY_MODEL, limits=limits)
    api, multiview, t23d = build_api(settings)

    @api.post("/mv")
    def mv(body: multiview):  # type: ignore[valid-type]
        return body.model_dump()

    @api.post("/t3d")
    def t3d(body: t23d):  # type: ignore[valid-type]
        return body.model_dump()

    return TestClient(api)


def test_request_validation_names_field_and_allowed_range():
    client = _validation_client(Limits(max_prompts_per_request=2, max_prompt_chars=20, max_body_bytes=400))
    ok = client.post("/mv", json={"prompts": [" a red cube "]})
    assert ok.status_code == 200 and ok.json()["prompts"] == ["a red cube"] and ok.json()["num_views"] == 4
    cases = [
        ("/mv", {"prompts": []}, "prompts", "length >= 1"),
        ("/mv", {"prompts": ["a", "b", "c"]}, "prompts", "length <= 2"),
        ("/mv", {"prompts": ["x" * 21]}, "prompts.0", "length <= 20"),
        ("/mv", {"prompts": ["a"], "steps": 0}, "steps", ">= 1"),
        ("/mv", {"prompts": ["a"], "steps": 101}, "steps", "<= 100"),
        ("/mv", {"prompts": ["a"], "num_views": 3}, "num_views", "one of 1, 2 or 4"),
        ("/mv", {"prompts": ["a"], "resolution": 64}, "resolution", "32"),
        ("/mv", {"prompts": ["a"], "elevation": 90}, "elevation", "<= 60"),
        ("/mv", {"prompts": ["a"], "stepz": 5}, "stepz", None),
        ("/t3d", {"prompts": ["a"], "steps": 5000}, "steps", "<= 2000"),
        ("/t3d", {"prompts": ["a"], "guidance": "magic"}, "guidance", "'mvdream' or 'dreamfusion'"),
        ("/t3d", {"prompts": ["a"], "seed": -1}, "seed", ">= 0"),
        ("/t3d", {"prompts": "a cube"}, "prompts", None),
        # numbers are JSON numbers: no strings, no booleans, no 4.0 for a choice of integers
        ("/t3d", {"prompts": ["a"], "steps": "5"}, "steps", None),
        ("/t3d", {"prompts": ["a"], "steps": True}, "steps", None),
        ("/t3d", {"prompts": ["a"], "seed": 1.5}, "seed", None),
        ("/mv", {"prompts": ["a"], "num_views": True}, "num_views", None),
        ("/mv", {"prompts": ["a"], "num_views": 4.0}, "num_views", None),
        ("/mv", {"prompts": ["a"], "guidance_scale": "3"}, "guidance_scale", None),
        ("/mv", {"prompts": ["a"], "elevation": False}, "elevation", None),
    ]
    for path, body, field, allowed in cases:
        r = client.post(path, json=body)
        assert r.status_code == 422, (body, r.text)
        errors = r.json()["errors"]
        assert any(e["field"] == field for e in errors), (body, errors)
        if allowed:
            assert any(allowed in (e["allowed"] or "") for e in errors if e["field"] == field), (body, errors)
    r = client.post("/mv", content=b'{"prompts": ["a"', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "malformed JSON body"
    r = client.post("/mv", json={"prompts": ["a" * 10] * 50})
    assert r.status_code == 413 and r.json()["errors"][0]["allowed"] == "<= 400 bytes"
    # an integer where a float is asked for is a number all the same
    assert client.post("/mv", json={"prompts": ["a"], "guidance_scale": 3, "elevation": 0}).status_code == 200

    def chunks(total: int):  # no Content-Length: the body arrives chunked
        for _ in range(total // 100):
            yield b" " * 100

    r = client.post("/mv", content=chunks(1000), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "request body too large"
    r = client.post("/mv", content=(b for b in [b'{"prompts": ', b'["a"]}']), headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["prompts"] == ["a"]  # a small chunked body is replayed whole


def test_every_error_has_one_shape_and_no_token_is_a_401_before_anything_else(monkeypatch):
    from mvdream_platform.serve.app import make_ingress

    monkeypatch.setenv("MVDREAM_SERVE_TOKEN", "s3cret")
    _, api = make_ingress(ServeSettings(model=TINY_MODEL))
    client = TestClient(api)
    for method, path, kwargs in [("post", "/v1/text-to-3d", {"content": b"{broken"}),
                                 ("post", "/v1/multiview", {"json": {"prompts": []}}),
                                 ("get", "/v1/jobs/nope", {}), ("delete", "/v1/jobs/x", {}),
                                 ("get", "/v1/no-such-route", {})]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                        {"Authorization": "Bearer "}):
            r = getattr(client, method)(path, headers=headers, **kwargs)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.json() == {"error": "missing or invalid bearer token", "errors": []}
            assert r.headers["www-authenticate"] == "Bearer"
    r = client.get("/no-such-route")  # outside /v1: Starlette's own 404, in our shape
    assert r.status_code == 404 and r.json() == {"error": "Not Found", "errors": []}
    r = client.put("/healthz")
    assert r.status_code == 405 and set(r.json()) == {"error", "errors"}


def test_a_blank_token_is_no_token(monkeypatch):
    from mvdream_platform.serve.app import _token_digest, check_exposure

    monkeypatch.setenv("MVDREAM_SERVE_TOKEN", "   ")
    assert _token_digest("MVDREAM_SERVE_TOKEN") is None
    with pytest.raises(ValueError, match="set but blank"):
        check_exposure("0.0.0.0", "MVDREAM_SERVE_TOKEN")
    check_exposure("127.0.0.1", "MVDREAM_SERVE_TOKEN")
    check_exposure("0.0.0.0", "MVDREAM_SERVE_TOKEN", allow_anonymous_remote=True)


def test_batched_sampling_equals_solo_and_direct_pipeline(tiny_pipeline):
    key = SamplingKey(num_views=4, elevation=15.0, azimuth_start=0.0, steps=3, guidance_scale=2.0,
                      guidance_rescale=0.0, resolution=None, negative_prompt="")
    other = SamplingKey(**{**key.__dict__, "num_views": 2})
    items = [SampleItem("a red cube", 5, key), SampleItem("a blue cone", 6, other), SampleItem("a torus", 7, key)]
    batched = sample_items(tiny_pipeline, items)
    assert [r["batch_size"] for r in batched] == [3, 3, 3] and [r["group_size"] for r in batched] == [2, 1, 2]
    assert [len(r["pngs"]) for r in batched] == [4, 2, 4]
    solo = sample_items(tiny_pipeline, [items[2]])[0]
    decode = _decode
    assert np.abs(decode(batched[2]["pngs"][1]) - decode(solo["pngs"][1])).max() <= 1
    # ... and the same as a plain pipeline call with that prompt and seed (jobs/generate.py)
    direct = tiny_pipeline("a torus", num_views=4, num_inference_steps=3, guidance_scale=2.0,
                           generator=torch.Generator().manual_seed(7), output_type="np").images[0]
    assert np.abs(decode(solo["pngs"][3]).astype(float) - direct[3] * 255).max() <= 1.0


def _decode(png: bytes) -> np.ndarray:
    import io

    import PIL.Image

    return np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def test_exported_serve_config_and_openapi_are_current():
    """conf/serve/local.yaml and docs/openapi.json are what jobs/serve.py exports today."""
    job = import_job("serve")
    cfg = compose("serve", [])
    args = job.app_args(cfg)
    committed = yaml.safe_load((ROOT / "conf" / "serve" / "local.yaml").read_text())
    assert committed == json.loads(json.dumps(job.serve_config(cfg, args))), \
        "conf/serve/local.yaml is stale: python jobs/serve.py export_config=conf/serve/local.yaml"
    assert committed["applications"][0]["import_path"] == "mvdream_platform.serve.app:build_app"
    document = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert document == json.loads(json.dumps(openapi_document(args))), \
        "docs/openapi.json is stale: python jobs/serve.py export_openapi=docs/openapi.json"
    assert {"/v1/multiview", "/v1/text-to-3d", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/assets/{name}",
            "/healthz"} <= set(document["paths"])
    assert "delete" in document["paths"]["/v1/jobs/{job_id}"]


def test_remote_bind_without_token_is_refused(monkeypatch):
    job = import_job("serve")
    monkeypatch.delenv("MVDREAM_SERVE_TOKEN", raising=False)
    with pytest.raises(SystemExit, match="MVDREAM_SERVE_TOKEN"):
        job.check_exposure(compose("serve", ["http.host=0.0.0.0"]))
    job.check_exposure(compose("serve", ["http.host=0.0.0.0", "allow_anonymous_remote=true"]))
    monkeypatch.setenv("MVDREAM_SERVE_TOKEN", "s3cret")
    job.check_exposure(compose("serve", ["http.host=0.0.0.0"]))
