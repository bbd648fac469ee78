"""The Serve application on a real local Ray cluster, over real HTTP, with the embedded model.

One application for the module (startup costs seconds): multi-view requests, batching under
load, text-to-3D jobs end to end (glb loaded with trimesh), cancel, a killed worker replica,
an application restart, authentication and the bad-input matrix.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import requests
import torch
import trimesh
import yaml

from mvdream_platform.client import MVDreamClient, ServeError
from mvdream_platform.pipelines import MVDreamPipeline
from mvdream_platform.serve.app import actor_alive
from mvdream_platform.serve.store import JobStore

from conftest import shutdown_ray
from jobs_helpers import ROOT

pytestmark = pytest.mark.slow
TOKEN_ENV = "MVDREAM_TEST_SERVE_TOKEN"
TOKEN = "test-token-7f3a"
APP = "mvdream-test"
# Text-to-3D at test size: 32 px renders, a coarse mesh, 4 turntable frames.
FAST_SDS = {
    "checkpoint_every": 5, "log_every": 5, "render_every": 1000,
    "shading": {"ambient_only_steps": 1000},
    "export": {"mesh_resolution": 32, "turntable_frames": 4, "turntable_resolution": 32,
               "quality_views": 2, "mesh_formats": ["glb", "obj"]},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_args(storage: Path) -> dict:
    sds = yaml.safe_load((ROOT / "conf" / "sds" / "tiny.yaml").read_text())
    for key, value in FAST_SDS.items():
        sds[key] = {**sds.get(key, {}), **value} if isinstance(value, dict) else value
    return {
        "model": yaml.safe_load((ROOT / "conf" / "model" / "tiny.yaml").read_text()),
        "logger": "disabled", "metrics_every_s": 1.0,
        "sds": sds, "storage": str(storage), "auth_token_env": TOKEN_ENV, "default_sds_steps": 20,
        "limits": {"max_prompts_per_request": 4, "max_prompt_chars": 80, "max_body_bytes": 2048,
                   "max_sampling_steps": 20, "max_sds_steps": 200, "max_multiview_work": 160},
        "generator": {"num_cpus": 1, "max_batch_size": 16, "batch_wait_timeout_s": 0.25,
                      "max_ongoing_requests": 64},
        # two worker replicas: jobs are spread over them
        "worker": {"num_replicas": 2, "num_cpus": 1, "heartbeat_s": 0.5, "lease_timeout_s": 30.0,
                   "max_attempts": 3},
    }


def deploy(args: dict) -> None:
    from ray import serve

    from mvdream_platform.serve.app import build_app

    serve.run(build_app(args), name=APP, route_prefix="/")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import ray
    from ray import serve

    os.environ[TOKEN_ENV] = TOKEN
    storage = tmp_path_factory.mktemp("serve")
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = app_args(storage)
    deploy(args)
    url = f"http://127.0.0.1:{port}"
    yield {"url": url, "storage": storage, "args": args,
           "client": MVDreamClient(url, token=TOKEN, timeout=120)}
    serve.shutdown()
    shutdown_ray()
    os.environ.pop(TOKEN_ENV, None)


def auth() -> dict:
    return {"Authorization": f"Bearer {TOKEN}"}


def decode(b64: str) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def wait_for(predicate, timeout: float, what: str, every: float = 0.3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_health_and_docs_are_public(server):
    r = requests.get(server["url"] + "/healthz", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok", "model": "tiny", "api": "v1",
                                                 "quarantined_records": 0}
    assert requests.get(server["url"] + "/openapi.json", timeout=30).json()["info"]["title"] == "mvdream-platform"
    # build_app checks the token against the host Serve really listens on (serve run/deploy too)
    from mvdream_platform.serve.app import _serving_host, build_app

    assert _serving_host() == "127.0.0.1"
    build_app(server["args"] | {"storage": str(server["storage"])})  # loopback: no token needed


def test_multiview_over_http_matches_the_pipeline(server):
    r = requests.post(server["url"] + "/v1/multiview", headers=auth(), timeout=120,
                      json={"prompts": ["a red cube", "a blue sphere"], "steps": 4, "seed": 11})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny" and [x["seed"] for x in body["results"]] == [11, 12]
    first = body["results"][0]
    assert len(first["images"]) == 4 and np.array(first["cameras"]).shape == (4, 16)
    views = [decode(b) for b in first["images"]]
    assert all(v.shape == (32, 32, 3) for v in views)
    pipe = MVDreamPipeline.from_pretrained(ROOT / "checkpoints" / "tiny")
    direct = pipe("a red cube", num_views=4, num_inference_steps=4, guidance_scale=2.0,
                  generator=torch.Generator().manual_seed(11), output_type="np").images[0]
    assert np.abs(views[2].astype(float) - direct[2] * 255).max() <= 1.0


def test_multiview_url_images_download(server):
    body = server["client"].multiview(["a green torus"], steps=2, num_views=2, response_format="url")
    urls = body["results"][0]["images"]
    assert len(urls) == 2 and all(u.startswith("/v1/multiview/") for u in urls)
    image = server["client"].get_bytes(urls[1])
    assert PIL.Image.open(io.BytesIO(image)).size == (32, 32)
    assert requests.get(server["url"] + urls[1], timeout=30).status_code == 401  # needs the token


def test_fifty_concurrent_requests_are_batched(server):
    def one(i: int) -> requests.Response:
        return requests.post(server["url"] + "/v1/multiview", headers=auth(), timeout=300,
                             json={"prompts": [f"a red cube {i}"], "steps": 2, "num_views": 4, "seed": i})

    with ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(one, range(50)))
    assert [r.status_code for r in responses] == [200] * 50
    sizes = [r.json()["results"][0]["batch_size"] for r in responses]
    assert max(sizes) > 1, sizes
    # ... and the serving metrics (the dashboards' source) saw the same batching
    from mvdream_platform.tracking import read_metrics

    def logged():
        rows = [m for d in (server["storage"] / "tracking").glob("ingress-*") for m in read_metrics(d)]
        return rows if sum(m["requests"] for m in rows) >= 50 else None

    rows = wait_for(logged, 30, "the serving metrics")
    assert max(m.get("max_batch_size", 0) for m in rows) == max(sizes)
    assert all(m["latency_p95_s"] >= m["latency_p50_s"] > 0 for m in rows if m["requests"])


def test_authentication(server):
    url = server["url"] + "/v1/multiview"
    body = {"prompts": ["a cube"], "steps": 1}
    assert requests.post(url, json=body, timeout=30).status_code == 401
    r = requests.post(url, json=body, headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    # no hints about the body before authentication
    assert requests.post(url, json={"prompts": []}, timeout=30).status_code == 401
    assert requests.get(server["url"] + "/v1/jobs/20260101T000000-00000000", timeout=30).status_code == 401


BAD_REQUESTS = [
    ("/v1/multiview", {"prompts": []}, 422, "prompts"),
    ("/v1/multiview", {"prompts": ["a"] * 5}, 422, "prompts"),
    ("/v1/multiview", {"prompts": ["x" * 81]}, 422, "prompts.0"),
    ("/v1/multiview", {"prompts": ["a"], "steps": 21}, 422, "steps"),
    ("/v1/multiview", {"prompts": ["a"], "num_views": 8}, 422, "num_views"),
    ("/v1/multiview", {"prompts": ["a"], "resolution": 256}, 422, "resolution"),
    ("/v1/multiview", {"prompts": ["a"], "guidance_scale": 1000}, 422, "guidance_scale"),
    ("/v1/multiview", {"prompts": ["a"], "colour": "red"}, 422, "colour"),
    ("/v1/text-to-3d", {"prompts": ["a"], "steps": 201}, 422, "steps"),
    ("/v1/text-to-3d", {"prompts": ["a"], "guidance": "magic"}, 422, "guidance"),
    ("/v1/text-to-3d", {"prompts": ["  "]}, 422, "prompts.0"),
    ("/v1/text-to-3d", {"prompts": ["x" * 60] * 40}, 413, "body"),  # > max_body_bytes
    # each value within its limit, the product over the work budget (4 x 4 x 20 > 160)
    ("/v1/multiview", {"prompts": ["a"] * 4, "steps": 20}, 422, "prompts"),
    ("/v1/text-to-3d", {"prompts": ["a"], "steps": "5"}, 422, "steps"),
    ("/v1/text-to-3d", {"prompts": ["a"], "steps": True}, 422, "steps"),
]


def test_bad_input_gets_4xx_naming_the_field(server):
    url = server["url"]
    for path, body, status, field in BAD_REQUESTS:
        r = requests.post(url + path, json=body, headers=auth(), timeout=30)
        assert r.status_code == status, (path, body, r.text)
        assert any(e["field"] == field for e in r.json()["errors"]), (body, r.json())
    r = requests.post(url + "/v1/multiview", data=b'{"prompts": [', timeout=30,
                      headers=auth() | {"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "malformed JSON body"
    for path in ("/v1/jobs/not-a-job", "/v1/jobs/20260101T000000-00000000",
                 "/v1/jobs/20260101T000000-00000000/assets/mesh.glb", "/v1/multiview/x/../../secret.png"):
        assert requests.get(url + path, headers=auth(), timeout=30).status_code == 404, path
    assert requests.get(url + "/healthz", timeout=30).status_code == 200  # still up


def test_text_to_3d_job_end_to_end(server, tmp_path):
    client = server["client"]
    store = JobStore(str(server["storage"]))
    job, other = client.submit(["a red cube", "a blue cone"], steps=20, seed=3)

    def finished(j):
        view = client.status(j)
        return view if view["status"] in ("succeeded", "failed", "cancelled") else None

    view = wait_for(lambda: finished(job), 300, "the text-to-3D job")
    assert view["status"] == "succeeded", view
    assert wait_for(lambda: finished(other), 300, "the second job")["status"] == "succeeded"
    # the batch was spread over both worker replicas
    assert store.result(job)["owner"] != store.result(other)["owner"]
    assert {"mesh.glb", "mesh.obj", "turntable.gif", "turntable.mp4", "multiview.png", "metrics.json"} <= set(view["assets"])
    assert view["progress"]["step"] == 20 and view["attempts"] == 1 and view["metrics"]["steps"] == 20
    assert "quality" not in view["metrics"]  # Serve scores nothing, "a red cube" included
    paths = client.download(job, tmp_path, names=["mesh.glb", "turntable.gif"])
    mesh = trimesh.load(paths["mesh.glb"], force="mesh")
    assert len(mesh.vertices) > 100 and len(mesh.faces) > 100
    assert PIL.Image.open(paths["turntable.gif"]).n_frames == 4
    r = requests.get(f"{server['url']}/v1/jobs/{job}/assets/checkpoints", headers=auth(), timeout=30)
    assert r.status_code == 404
    r = requests.delete(f"{server['url']}/v1/jobs/{job}", headers=auth(), timeout=30)
    assert r.status_code == 409 and "already succeeded" in r.json()["error"]


def test_cancel_a_running_job(server):
    client = server["client"]
    [job] = client.submit(["a blue cone"], steps=200)
    wait_for(lambda: (client.status(job).get("progress") or {}).get("step", 0) >= 5, 120, "the job to start")
    assert client.cancel(job)["status"] == "cancelling"
    view = wait_for(lambda: (v := client.status(job))["status"] == "cancelled" and v, 120, "cancellation")
    assert view["progress"]["step"] < 200 and view["assets"] == []


def test_killed_worker_replica_job_resumes_from_checkpoint(server):
    client = server["client"]
    store = JobStore(str(server["storage"]))
    [job] = client.submit(["a green sphere"], steps=40, seed=1)
    lease = wait_for(lambda: (x := store.lease(job)) and (x.get("step") or 0) >= 10 and x, 180, "step 10")
    assert lease["owner"].startswith("SERVE_REPLICA::") and actor_alive(lease["owner"])
    os.kill(int(lease["pid"]), signal.SIGKILL)  # the worker replica process, mid-job
    # the next attempt can take over at once (not after lease_timeout_s): the owner is seen dead
    wait_for(lambda: not actor_alive(lease["owner"]), 30, "the killed replica to be seen dead")
    view = wait_for(lambda: (v := client.status(job))["status"] in ("succeeded", "failed") and v, 300,
                    "the retried job")
    assert view["status"] == "succeeded", view
    assert view["attempts"] == 2 and view["metrics"]["resumed_from"] >= 10, view


def test_restarted_application_resumes_running_and_queued_jobs(server):
    from ray import serve

    client = server["client"]
    store = JobStore(str(server["storage"]))
    finished = [j for j in store.job_ids() if store.view(j)["status"] == "succeeded"]
    before = {j: {a: client.get_bytes(f"/v1/jobs/{j}/assets/{a}") for a in store.view(j)["assets"]}
              for j in finished}
    assert finished and all(before.values())
    [running] = client.submit(["a yellow cylinder"], steps=60, seed=2)
    wait_for(lambda: ((store.lease(running) or {}).get("step") or 0) >= 10, 180, "step 10")
    serve.delete(APP)  # the whole application goes away mid-job
    # accepted while the application was down (e.g. the queue's submit call was lost)
    queued = store.create("a red torus", {"steps": 10, "seed": 0, "guidance": "mvdream"})
    deploy(server["args"])
    for job in (running, queued):
        view = wait_for(lambda j=job: (v := client.status(j))["status"] in ("succeeded", "failed") and v, 300,
                        f"job {job} after the restart")
        assert view["status"] == "succeeded", view
    assert client.status(running)["metrics"]["resumed_from"] >= 10
    assert client.status(running)["attempts"] == 2  # the restart killed the worker running it
    for job, assets in before.items():  # finished assets are untouched by the restart
        assert {a: client.get_bytes(f"/v1/jobs/{job}/assets/{a}") for a in assets} == assets


def test_client_errors_are_raised_with_the_servers_message(server):
    with pytest.raises(ServeError, match="401"):
        MVDreamClient(server["url"]).submit(["a cube"])
    with pytest.raises(ServeError, match="steps"):
        server["client"].submit(["a cube"], steps=10_000)


# ---------------------------------------------------------------------------- chaos
# Each test injects faults into the live application and checks that no accepted job is lost,
# attempts are exact and every answer is JSON. CHAOS adds up what they did (printed at the end).
CHAOS = {"faults": 0, "jobs_accepted": 0, "jobs_lost": 0, "requests": 0, "answered_json": 0}


def _finish(client, jobs, timeout=300):
    views = {}
    for job in jobs:
        views[job] = wait_for(lambda j=job: (v := client.status(j))["status"] in ("succeeded", "failed", "cancelled")
                              and v, timeout, f"job {job}")
    CHAOS["jobs_accepted"] += len(jobs)
    CHAOS["jobs_lost"] += sum(v["status"] != "succeeded" for v in views.values())
    return views


def test_chaos_unreadable_records_are_quarantined_and_every_other_job_resumes(server):
    from ray import serve

    client = server["client"]
    store = JobStore(str(server["storage"]))
    serve.delete(APP)
    options = {"steps": 10, "seed": 0, "guidance": "mvdream"}
    broken_state, fine, broken_request = (store.create(p, options) for p in ("a red cube", "a blue cone", "a torus"))
    root = Path(server["storage"]) / "jobs"
    (root / broken_state / "state.json").write_bytes(b"")  # 0 bytes
    (root / broken_request / "request.json").write_text('{"id": "x", "pro')  # truncated
    CHAOS["faults"] += 3  # two corrupt records and the restart
    deploy(server["args"])
    views = _finish(client, [broken_state, fine])
    assert all(v["status"] == "succeeded" and v["attempts"] == 1 for v in views.values()), views
    failed = client.status(broken_request)
    assert failed["status"] == "failed" and "could not be read" in failed["error"]
    assert requests.get(server["url"] + "/healthz", timeout=30).json()["quarantined_records"] >= 2


def test_chaos_killing_the_job_queue_adds_no_attempt(server):
    from ray import serve

    client = server["client"]
    store = JobStore(str(server["storage"]))
    [job] = client.submit(["a purple capsule"], steps=40, seed=4)
    wait_for(lambda: ((store.lease(job) or {}).get("step") or 0) >= 5, 180, "step 5")
    queue = serve.get_deployment_handle("JobQueue", app_name=APP)
    os.kill(queue.stats.remote().result(timeout_s=30)["pid"], signal.SIGKILL)  # the queue, not the worker
    CHAOS["faults"] += 1
    view = _finish(client, [job])[job]
    assert view["status"] == "succeeded" and view["attempts"] == 1, view
    assert view["metrics"]["resumed_from"] == 0  # the worker never stopped


def test_chaos_cancelling_a_queued_job_is_immediate(server):
    client = server["client"]
    store = JobStore(str(server["storage"]))
    busy = client.submit(["a red cube", "a blue cone"], steps=60, seed=5)  # both workers busy
    wait_for(lambda: all(((store.lease(j) or {}).get("step") or 0) >= 1 for j in busy), 180, "both workers")
    [queued] = client.submit(["a green torus"], steps=10)
    view = client.cancel(queued)
    assert view["status"] == "cancelled", view  # at once: no worker ever had it
    for job in busy:
        client.cancel(job)
    wait_for(lambda: all(client.status(j)["status"] == "cancelled" for j in busy), 120, "the busy jobs to stop")
    time.sleep(1.0)
    assert store.lease(queued) is None and client.status(queued)["status"] == "cancelled"


def test_chaos_a_killed_generator_gives_json_503s_and_the_client_retries(server):
    from ray import serve

    url = server["url"] + "/v1/multiview"
    generator = serve.get_deployment_handle("MultiViewGenerator", app_name=APP)

    def one(i: int) -> requests.Response:
        return requests.post(url, headers=auth(), timeout=300,
                             json={"prompts": [f"a cube {i}", f"a cone {i}"], "steps": 20, "seed": i})

    codes = []
    for _ in range(3):  # a round whose requests all finished before the kill shows no 503: again
        pid = generator.pid.remote().result(timeout_s=180)  # (a restarted replica, after round 1)
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(one, i) for i in range(6)]
            time.sleep(1.5)  # requests are in flight
            os.kill(pid, signal.SIGKILL)
            CHAOS["faults"] += 1
            responses = [f.result() for f in futures]
        CHAOS["requests"] += len(responses)
        for r in responses:
            body = r.json()  # JSON, never plain text
            CHAOS["answered_json"] += 1
            assert r.status_code in (200, 503), (r.status_code, body)
            if r.status_code == 503:
                assert set(body) == {"error", "errors"} and int(r.headers["Retry-After"]) >= 1
        codes += [r.status_code for r in responses]
        if 503 in codes:
            break
    assert 503 in codes, codes
    # the client waits Retry-After and tries again until the generator is back
    images = MVDreamClient(server["url"], token=TOKEN, timeout=120, retries=6).multiview_images(["a cube"], steps=2)
    assert images[0][0].shape == (32, 32, 3)


def test_chaos_a_listed_asset_missing_from_storage_is_a_json_404(server):
    client = server["client"]
    store = JobStore(str(server["storage"]))
    job = next(j for j in store.job_ids() if store.view(j)["status"] == "succeeded"
               and "turntable.gif" in store.view(j)["assets"])
    (Path(server["storage"]) / "jobs" / job / "out" / "turntable.gif").unlink()
    CHAOS["faults"] += 1
    r = requests.get(f"{server['url']}/v1/jobs/{job}/assets/turntable.gif", headers=auth(), timeout=30)
    assert r.status_code == 404 and "missing from storage" in r.json()["error"]
    assert str(server["storage"]) not in r.text
    metrics = client.get_bytes(f"/v1/jobs/{job}/assets/metrics.json").decode()
    assert str(server["storage"]) not in metrics  # no server paths in what clients download
    print(f"\nchaos: {CHAOS}")
    assert CHAOS["jobs_lost"] == 0

