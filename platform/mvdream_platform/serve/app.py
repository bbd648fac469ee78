"""The Ray Serve application: HTTP ingress, batched multi-view generator, text-to-3D job queue
and workers.

    ingress (FastAPI) --multiview--> MultiViewGenerator (@serve.batch, N replicas)
            \\--text-to-3d--> JobQueue (1 replica) --one job per call--> TextTo3DWorker (N replicas)

* Accepted text-to-3D jobs are written to storage before their ids are returned
  (:class:`.store.JobStore`); the queue dispatches each one as one call to the worker
  deployment, whose ``max_ongoing_requests=1`` makes Serve hold the rest in its router queue and
  spread them over replicas (and lets autoscaling see the backlog).
* A worker replica that dies mid-job fails the queue's call; the queue retries it (up to
  ``worker.max_attempts``) and the new attempt resumes from the job's last field checkpoint.
* A restarted application's queue re-dispatches every job on storage that is not finished.

``build_app(args)`` is the import path of the Ray Serve config (``serve run conf/serve/local.yaml``);
``jobs/serve.py`` calls it too.
"""

# No `from __future__ import annotations`: FastAPI must see the route bodies' request models,
# which are local classes built from the configured limits, as objects rather than names.

import asyncio
import base64
import hashlib
import hmac
import logging
import mimetypes
import os
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import exceptions as ray_errors
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import storage
from .generator import SampleItem, SamplingKey, key_dict, sample_items
from .metrics import MetricsWindow
from .runner import public_error, run_job
from .schemas import (
    ErrorBody,
    JobLink,
    JobsAccepted,
    JobView,
    MultiViewResponse,
    MultiViewResult,
    request_models,
    validation_errors,
)
from .settings import ServeSettings
from .store import JOB_ID, TERMINAL, JobStore, UnknownAsset, UnknownJob, new_job_id

log = logging.getLogger(__name__)
API_VERSION = "v1"
# A downstream replica died or cannot be reached: the request may succeed if retried.
REPLICA_LOST = (ray_errors.RayActorError, ray_errors.ActorUnavailableError, ray_errors.WorkerCrashedError)
ASSET_TYPES = {".glb": "model/gltf-binary", ".obj": "model/obj", ".ply": "application/octet-stream",
               ".gif": "image/gif", ".mp4": "video/mp4", ".png": "image/png", ".json": "application/json"}


def _load_pipeline(settings: ServeSettings, num_cpus: float):
    """The model, with torch using the replica's CPU share (not every core of the node)."""
    from ..pipelines.loading import ModelConfig, build_pipeline, pick_device
    from ..threads import set_torch_threads

    set_torch_threads(max(1, int(num_cpus)))
    device = pick_device(settings.device)
    pipe = build_pipeline(ModelConfig(**settings.model), device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, device


def actor_alive(name: str) -> bool:
    """Whether the named (Serve replica) actor still exists, so a dead worker's lease can be
    taken over at once instead of after the lease timeout."""
    import ray

    try:
        ray.get_actor(name, namespace="serve")
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------- deployments
@serve.deployment
class MultiViewGenerator:
    """Samples multi-view images; concurrent requests are merged into batches."""

    def __init__(self, args: dict[str, Any]):
        self.settings = ServeSettings.from_dict(args)
        self.pipe, _ = _load_pipeline(self.settings, self.settings.generator.num_cpus)
        self.sample.set_max_batch_size(self.settings.generator.max_batch_size)
        self.sample.set_batch_wait_timeout_s(self.settings.generator.batch_wait_timeout_s)

    async def pid(self) -> int:
        """This replica's process (for operators and the chaos tests)."""
        return os.getpid()

    async def generate(self, item: dict[str, Any]) -> dict[str, Any]:
        """One prompt: ``{"prompt", "seed", "key": SamplingKey fields}`` -> PNGs and cameras."""
        return await self.sample(SampleItem.from_dict(item))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def sample(self, items: list[SampleItem]) -> list[dict[str, Any]]:
        # In a thread: the replica's event loop keeps answering health checks and gathering
        # the next batch while torch works.
        return await asyncio.to_thread(sample_items, self.pipe, items)


@serve.deployment
class TextTo3DWorker:
    """Runs one text-to-3D job per call (``max_ongoing_requests=1``)."""

    def __init__(self, args: dict[str, Any]):
        import ray

        self.settings = ServeSettings.from_dict(args)
        self.store = store_for(self.settings)
        self.pipe, self.device = _load_pipeline(self.settings, self.settings.worker.num_cpus)
        self.owner = ray.get_runtime_context().get_actor_name() or f"pid-{os.getpid()}"
        self.running: dict[str, asyncio.Future] = {}

    async def run(self, job_id: str) -> dict[str, Any]:
        # A call whose caller went away (a killed queue) is cancelled, but its thread runs on:
        # a re-sent call for the same job joins that run instead of starting a second one.
        task = self.running.get(job_id)
        if task is None or task.done():
            task = asyncio.ensure_future(asyncio.to_thread(
                run_job, self.store, job_id, self.pipe, self.settings, owner=self.owner,
                device=self.device, owner_alive=actor_alive))
            self.running[job_id] = task
            task.add_done_callback(lambda _t, j=job_id: self.running.pop(j, None))
        return await asyncio.shield(task)


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class JobQueue:
    """Dispatches stored jobs to the workers, sends a job again when its worker died, and on
    start re-dispatches every unfinished job on storage in submission order (a restarted
    application loses none).

    The queue counts nothing itself: a worker numbers the run it starts in the job's lease
    (:func:`.runner.run_job`), so a queue that dies and re-sends a running job adds no attempt.
    A call that fails before any worker took the job (a replica dying while it loads) is
    re-sent up to ``worker.max_attempts`` times.
    """

    def __init__(self, args: dict[str, Any], worker):
        self.settings = ServeSettings.from_dict(args)
        self.store = store_for(self.settings)
        self.worker = worker
        self.tasks: dict[str, asyncio.Task] = {}
        self.recovered = asyncio.get_event_loop().create_task(self._recover())
        self.recovered.add_done_callback(_log_failure("recovering unfinished jobs"))
        if self.settings.retention_days is not None:
            self.cleaner = asyncio.get_event_loop().create_task(self._clean_up())
            self.cleaner.add_done_callback(_log_failure("retention clean-up"))

    async def _clean_up(self, every_s: float = 3600.0) -> None:
        """Now and every hour: delete what finished more than ``retention_days`` ago."""
        while True:
            try:
                before = time.time() - self.settings.retention_days * 86400.0
                await asyncio.to_thread(self.store.remove_finished, before)
            except Exception:  # a storage hiccup: try again next time
                log.exception("retention clean-up failed")
            await asyncio.sleep(every_s)

    async def _recover(self) -> None:
        pending = await asyncio.to_thread(self.store.unfinished)  # one bad record skips only itself
        if pending:
            log.info("re-dispatching %d unfinished jobs", len(pending))
        for job_id in pending:
            self._dispatch(job_id)

    async def submit(self, job_ids: list[str]) -> int:
        for job_id in job_ids:
            self._dispatch(job_id)
        return len(job_ids)

    async def cancel(self, job_id: str) -> None:
        """A client cancelled: a job no worker has started is cancelled now (its pending call is
        withdrawn); a running one stops at its next step (the worker sees the cancel file)."""
        lease = await asyncio.to_thread(self.store.lease, job_id)
        if lease is None or lease.get("phase") == "done":
            task = self.tasks.get(job_id)
            if task is not None and not task.done():
                task.cancel()
            state = await asyncio.to_thread(self.store.state, job_id)
            if state["status"] not in TERMINAL:
                await asyncio.to_thread(self.store.set_state, job_id, "cancelled",
                                        attempts=int((lease or {}).get("attempt", 0)))

    async def stats(self) -> dict[str, Any]:
        """Jobs being driven now and since this replica started, and which process it is."""
        active = [t for t in self.tasks.values() if not t.done()]
        return {"active_jobs": len(active), "dispatched_since_start": len(self.tasks), "pid": os.getpid()}

    def _dispatch(self, job_id: str) -> None:
        task = self.tasks.get(job_id)
        if task is None or task.done():
            self.tasks[job_id] = task = asyncio.get_event_loop().create_task(self._drive(job_id))
            task.add_done_callback(_log_failure(f"job {job_id}"))

    async def _drive(self, job_id: str) -> None:
        import ray.exceptions as rex

        store, limit = self.store, self.settings.worker.max_attempts
        lost_before_start = 0
        while True:
            if await asyncio.to_thread(store.cancel_requested, job_id):
                lease = await asyncio.to_thread(store.lease, job_id)
                if lease is None or lease.get("phase") == "done":
                    await asyncio.to_thread(store.set_state, job_id, "cancelled",
                                            attempts=int((lease or {}).get("attempt", 0)))
                    return
            before = await asyncio.to_thread(store.lease, job_id)
            try:
                outcome = await self.worker.run.remote(job_id)
            except (rex.RayActorError, rex.ActorUnavailableError, rex.WorkerCrashedError) as error:
                # The replica died (killed, OOM, node lost). If it had started a run, the worker
                # that gets the job next counts one more attempt (or fails it at the limit);
                # if not, nothing ran: re-send, a bounded number of times.
                lease = await asyncio.to_thread(store.lease, job_id)
                # a lease written during this call (new run or heartbeat): a worker held the job
                started = lease is not None and (before is None or lease.get("heartbeat") != before.get("heartbeat"))
                attempt = int((lease or {}).get("attempt", 0))
                if not started:
                    lost_before_start += 1
                    if lost_before_start >= limit:
                        await asyncio.to_thread(store.set_state, job_id, "failed", attempts=attempt,
                                                error=f"no worker could start the job ({lost_before_start} "
                                                      f"calls lost: {type(error).__name__})")
                        return
                reason = (f"worker died during attempt {attempt} ({type(error).__name__}); resuming from "
                          f"its last checkpoint" if started else
                          f"worker lost before starting the job ({type(error).__name__}); sending it again")
                log.warning("job %s: %s", job_id, reason)
                await asyncio.to_thread(store.set_state, job_id, "retrying", attempts=attempt,
                                        retry_of=attempt, error=reason)
                continue
            except Exception as error:  # a bug, not a lost worker: retrying would repeat it
                log.exception("job %s failed", job_id)
                await asyncio.to_thread(store.set_state, job_id, "failed", error=public_error(error, store.root))
                return
            await asyncio.to_thread(store.set_state, job_id, outcome["status"],
                                    attempts=int(outcome.get("attempt", 0)), error=outcome.get("error"))
            return


def store_for(settings: ServeSettings) -> JobStore:
    return JobStore(settings.storage, lease_timeout_s=settings.worker.lease_timeout_s)


def _log_failure(what: str):
    """A done-callback that logs a background task's exception (asyncio would keep it silent)."""

    def callback(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", what, exc_info=task.exception())

    return callback


# ---------------------------------------------------------------------------- HTTP ingress
async def gather_bounded(send, items: list[Any], in_flight: int, deadline_s: float) -> list[Any]:
    """``[await send(item) for item in items]`` with at most ``in_flight`` sent and unanswered
    at a time, all within ``deadline_s`` (``asyncio.TimeoutError`` after it).

    ``send(item)`` returns an awaitable with ``cancel()`` (a Serve ``DeploymentResponse``). On
    the deadline, an error or the caller's own cancellation (a client that went away), items not
    yet sent are never sent and every sent one is cancelled: a request that large waits its turn
    behind at most ``in_flight`` of its own items, and leaves nothing running when it ends.
    """
    gate = asyncio.Semaphore(in_flight)
    sent = []

    async def one(item):
        async with gate:
            response = send(item)
            sent.append(response)
            return await response

    tasks = [asyncio.ensure_future(one(item)) for item in items]
    try:
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=deadline_s)
    finally:
        for task in tasks:
            task.cancel()
        for response in sent:
            response.cancel()


def _serving_tracker(settings: ServeSettings):
    """This ingress replica's tracker: W&B run ``serve-<replica>`` + <tracking>/<replica>/metrics.jsonl."""
    from ..tracking import start_tracking

    try:
        context = serve.get_replica_context()
        replica = getattr(getattr(context, "replica_id", None), "unique_id", None) or context.replica_tag
        app = getattr(context, "app_name", "") or "mvdream"
    except Exception:  # outside a replica (tests building the class directly)
        replica, app = f"pid{os.getpid()}", "mvdream"
    return start_tracking(mode=settings.logger, project=settings.wandb_project, run_name=f"serve-{replica}",
                          group=f"serve-{app}", config=settings.to_dict(),
                          dir=storage.join(settings.tracking_folder(), f"ingress-{replica}"), job_type="serve")


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def configured_token(env_name: str) -> str | None:
    """The server's token from ``env_name``; None when unset or blank (whitespace is no secret)."""
    token = os.environ.get(env_name, "").strip()
    return token or None


def _token_digest(env_name: str) -> str | None:
    token = configured_token(env_name)
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def check_exposure(host: str, token_env: str, allow_anonymous_remote: bool = False) -> None:
    """Refuse to serve beyond this machine without a token unless explicitly allowed.

    Raises:
        ValueError: ``host`` is not a loopback address, ``token_env`` holds no token (unset or
            blank) and ``allow_anonymous_remote`` is false.
    """
    if host in LOCAL_HOSTS or configured_token(token_env) or allow_anonymous_remote:
        return
    blank = " (it is set but blank)" if os.environ.get(token_env) is not None else ""
    raise ValueError(f"http host {host} exposes the API beyond this machine: set {token_env} to a secret "
                     f"token{blank} (clients send 'Authorization: Bearer <token>'), or set "
                     f"allow_anonymous_remote=true")


def _serving_host() -> str | None:
    """The HTTP host of the running Serve instance, or None when it cannot be told."""
    try:
        # Private: Ray Serve has no public getter for the HTTP options an instance started with.
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        return None if client is None else client.http_config.host
    except Exception:
        return None


def error_response(status: int, message: str, errors: list[dict[str, Any]] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """Every error of the API has this one shape: ``{"error": str, "errors": [...]}``."""
    return JSONResponse(status_code=status, content={"error": message, "errors": errors or []},
                        headers=headers)


async def _send_response(send, response: JSONResponse) -> None:
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over ``max_bytes``, before any handler parses them.

    A declared length is checked at once; a body without one (chunked) is read here, up to the
    limit, and replayed to the app, so an oversized chunked body is a 413 too (FastAPI would
    turn an error raised while it reads the body into a 400)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                return await self._reject(send)
            return await self.app(scope, receive, send)
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                return await self._reject(send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    async def _reject(self, send):
        await _send_response(send, error_response(413, "request body too large", [
            {"field": "body", "message": "request body too large", "allowed": f"<= {self.max_bytes} bytes"}]))


class BearerGate:
    """ASGI middleware: every /v1 route needs the bearer token, checked before the request is
    routed or its body read (so a request without a token is a 401 whatever else is wrong)."""

    def __init__(self, app, digest):
        self.app, self.digest = app, digest  # digest: () -> SHA-256 hex of the token, or None

    async def __call__(self, scope, receive, send):
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # served under a route prefix
            path = path[len(root):]
        if scope["type"] == "http" and path.startswith(f"/{API_VERSION}/"):
            digest = self.digest()
            if digest is not None:
                header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
                scheme, _, presented = header.partition(" ")
                presented = presented.strip() if scheme.lower() == "bearer" else ""
                if not hmac.compare_digest(hashlib.sha256(presented.encode()).hexdigest(), digest):
                    response = error_response(401, "missing or invalid bearer token",
                                              headers={"WWW-Authenticate": "Bearer"})
                    return await _send_response(send, response)
        return await self.app(scope, receive, send)


def build_api(settings: ServeSettings) -> tuple[FastAPI, type, type]:
    """The FastAPI app (middleware, error handlers) and the request models for these limits."""
    multiview_model, t23d_model = request_models(settings.limits)
    api = FastAPI(
        title="mvdream-platform",
        version=API_VERSION,
        description="Text-to-multi-view and text-to-3D with MVDream models. Bearer-token "
                    "authentication when the server's token variable is set.",
    )
    api.add_middleware(BodySizeLimit, max_bytes=settings.limits.max_body_bytes)

    @api.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        errors = validation_errors(exc.errors())
        malformed = any(e["type"] == "json_invalid" for e in errors)
        return JSONResponse(status_code=400 if malformed else 422, content={
            "error": "malformed JSON body" if malformed else "invalid request", "errors": errors})

    @api.exception_handler(StarletteHTTPException)  # FastAPI's and Starlette's own (404, 405)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, dict) else {"error": str(exc.detail)}
        return JSONResponse(status_code=exc.status_code, content={"errors": [], **detail},
                            headers=exc.headers)

    return api, multiview_model, t23d_model


def make_ingress(settings: ServeSettings, token_digest: str | None = None) -> tuple[Any, FastAPI]:
    """(the ingress deployment, its FastAPI app) for these settings: routes typed by the
    configured limits, bearer authentication when a token is configured.

    ``token_digest`` is the SHA-256 of the token as the builder process saw it; without one the
    replica reads ``settings.auth_token_env`` itself (a cluster-wide variable). Only the digest
    ever travels in the application's config.
    """
    api, MultiViewRequest, TextTo3DRequest = build_api(settings)
    bearer = HTTPBearer(auto_error=False, description="the value of the server's token variable")
    errors = {401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 413: {"model": ErrorBody},
              422: {"model": ErrorBody}}

    def authorised(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        # A dependency, so it runs before the body is validated: no token, no 422 hints either.
        digest = token_digest or _token_digest(settings.auth_token_env)
        if digest is None:
            return
        presented = credentials.credentials if credentials else ""
        if not hmac.compare_digest(hashlib.sha256(presented.encode()).hexdigest(), digest):
            raise HTTPException(401, {"error": "missing or invalid bearer token"},
                                headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorised)]
    # The current metrics window, shared by the error-counting middleware and the routes.
    stats = {"window": MetricsWindow()}

    # Inside the error middleware below, so its 401s are counted too.
    api.add_middleware(BearerGate, digest=lambda: token_digest or _token_digest(settings.auth_token_env))
    retry_after = {"Retry-After": str(settings.limits.retry_after_s)}

    @api.middleware("http")
    async def errors_as_json(request: Request, call_next):
        """No plain-text 500 and no traceback ever reaches a client: a lost replica is a 503
        with Retry-After, anything else a JSON 500; the details go to the server log."""
        try:
            response = await call_next(request)
        except REPLICA_LOST as error:
            log.warning("%s %s: a replica was lost (%s)", request.method, request.url.path, type(error).__name__)
            response = error_response(503, "a server replica was lost while answering; retry after the "
                                           "Retry-After seconds", headers=retry_after)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            response = error_response(500, "internal server error (the server log has the details)")
        if response.status_code >= 400:
            stats["window"].errors += 1
        return response

    @serve.deployment
    @serve.ingress(api)
    class Ingress:
        def __init__(self, args: dict[str, Any], generator, queue):
            self.settings = ServeSettings.from_dict(args)
            self.store = store_for(self.settings)
            self.generator, self.queue = generator, queue
            self.model_name = str(self.settings.model.get("name", "model"))
            self.tracker = _serving_tracker(self.settings)
            self.flusher = asyncio.get_event_loop().create_task(self._log_metrics())

        async def _log_metrics(self) -> None:
            """Every ``metrics_every_s``: one window of latency / batch / queue metrics."""
            step = 0
            while True:
                await asyncio.sleep(self.settings.metrics_every_s)
                window, stats["window"] = stats["window"], MetricsWindow()
                try:
                    active = (await self.queue.stats.remote())["active_jobs"]
                except Exception:  # the queue restarting must not stop the metrics
                    active = None
                summary = window.summary(active)
                if summary["requests"] or summary["jobs_submitted"] or summary["errors"] or active:
                    step += 1
                    self.tracker.log(summary, step=step)

        @api.get("/healthz")
        async def healthz(self) -> dict[str, Any]:
            """Liveness, and the job records quarantined because they could not be read."""
            quarantined = len(await asyncio.to_thread(self.store.quarantined))
            return {"status": "ok", "model": self.model_name, "api": API_VERSION,
                    "quarantined_records": quarantined}

        @api.post(f"/{API_VERSION}/multiview", response_model=MultiViewResponse, responses=errors, dependencies=auth)
        async def multiview(self, body: MultiViewRequest):  # type: ignore[valid-type]
            """Prompts -> multi-view images, synchronously (batched with other clients' requests)."""
            began = time.perf_counter()
            model = self.settings.model
            key = SamplingKey(
                num_views=body.num_views, elevation=body.elevation, azimuth_start=body.azimuth_start,
                steps=body.steps or self.settings.default_sampling_steps or int(model.get("steps", 50)),
                guidance_scale=body.guidance_scale if body.guidance_scale is not None
                else float(model.get("guidance_scale", 7.5)),
                guidance_rescale=body.guidance_rescale, resolution=body.resolution,
                negative_prompt=body.negative_prompt)
            limits = self.settings.limits
            work = len(body.prompts) * key.num_views * key.steps
            if work > limits.max_multiview_work:
                raise HTTPException(422, {"error": "invalid request", "errors": [{
                    "field": "prompts", "type": "work_budget",
                    "message": f"{len(body.prompts)} prompts x {key.num_views} views x {key.steps} steps "
                               f"= {work} is over this server's budget for one request",
                    "allowed": f"prompts x num_views x steps <= {limits.max_multiview_work}"}]})
            items = [{"prompt": p, "seed": body.seed + i, "key": key_dict(key)} for i, p in enumerate(body.prompts)]
            outputs = await self._sample(items)
            request_id = new_job_id()
            results = []
            for i, (item, out) in enumerate(zip(items, outputs)):
                if body.response_format == "url":
                    images = []
                    for j, png in enumerate(out["pngs"]):
                        name = f"prompt_{i:03d}_view_{j:02d}.png"
                        await asyncio.to_thread(storage.write_bytes,
                                                storage.join(self.settings.storage, "multiview", request_id, name), png)
                        images.append(f"/{API_VERSION}/multiview/{request_id}/{name}")
                else:
                    images = [base64.b64encode(png).decode() for png in out["pngs"]]
                results.append(MultiViewResult(prompt=item["prompt"], seed=item["seed"], images=images,
                                               cameras=out["cameras"], batch_size=out["batch_size"],
                                               seconds=round(out["seconds"], 4)))
            seconds = time.perf_counter() - began
            stats["window"].request(seconds, [o["batch_size"] for o in outputs],
                                    sum(len(o["pngs"]) for o in outputs))
            return MultiViewResponse(id=request_id, model=self.model_name, results=results,
                                     seconds=round(seconds, 4))

        async def _sample(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            limits = self.settings.limits
            try:
                return await gather_bounded(self.generator.generate.remote, items,
                                            limits.max_prompts_in_flight, limits.multiview_deadline_s)
            except asyncio.TimeoutError:
                raise HTTPException(503, {"error": f"not answered within the server's deadline of "
                                                   f"{limits.multiview_deadline_s:g} s; retry later or ask "
                                                   f"for fewer prompts, views or steps"},
                                    headers=retry_after) from None

        @api.get(f"/{API_VERSION}/multiview/{{request_id}}/{{name}}", responses=errors, dependencies=auth)
        async def multiview_image(self, request_id: str, name: str):
            """A PNG of a multiview request made with response_format=url."""
            if not JOB_ID.match(request_id) or not name.endswith(".png") or "/" in name or name.startswith("."):
                raise HTTPException(404, {"error": f"no image {name!r} in request {request_id!r}"})
            uri = storage.join(self.settings.storage, "multiview", request_id, name)
            try:
                data = await asyncio.to_thread(storage.read_bytes, uri)
            except FileNotFoundError:
                raise HTTPException(404, {"error": f"no image {name!r} in request {request_id!r}"}) from None
            return Response(content=data, media_type="image/png")

        @api.post(f"/{API_VERSION}/text-to-3d", response_model=JobsAccepted, status_code=202, responses=errors, dependencies=auth)
        async def text_to_3d(self, body: TextTo3DRequest):  # type: ignore[valid-type]
            """A batch of prompts -> one queued job per prompt (poll GET /v1/jobs/{id})."""
            options = body.model_dump(exclude={"prompts"})
            ids = []
            for prompt in body.prompts:
                ids.append(await asyncio.to_thread(self.store.create, prompt, options))
            stats["window"].jobs_submitted += len(ids)
            try:  # the jobs are on storage already: if the queue is down, its restart finds them
                await self.queue.submit.remote(ids)
            except Exception:
                log.exception("queue unavailable; %d jobs wait on storage for its restart", len(ids))
            return JobsAccepted(jobs=[JobLink(id=j, prompt=p, status_url=f"/{API_VERSION}/jobs/{j}")
                                      for j, p in zip(ids, body.prompts)])

        @api.get(f"/{API_VERSION}/jobs/{{job_id}}", response_model=JobView, responses=errors, dependencies=auth)
        async def job(self, job_id: str):
            """Status, progress (step, ETA), error and asset links of one job."""
            view = await self._view(job_id)
            view["asset_urls"] = [f"/{API_VERSION}/jobs/{job_id}/assets/{a}" for a in view["assets"]]
            return JobView(**view)

        @api.get(f"/{API_VERSION}/jobs/{{job_id}}/assets/{{name}}", responses=errors, dependencies=auth)
        async def asset(self, job_id: str, name: str):
            """One finished asset: mesh.glb / .obj / .ply, turntable.gif / .mp4, multiview.png, ..."""
            try:
                uri = await asyncio.to_thread(self.store.asset_uri, job_id, name)
            except UnknownJob:
                raise HTTPException(404, {"error": f"no job {job_id!r}"}) from None
            except UnknownAsset:
                raise HTTPException(404, {"error": f"job {job_id} has no asset {name!r}"}) from None
            try:
                data = await asyncio.to_thread(storage.read_bytes, uri)
            except FileNotFoundError:  # listed in result.json but gone from storage
                log.error("job %s lists asset %s but storage has no %s", job_id, name, uri)
                raise HTTPException(404, {"error": f"job {job_id}'s asset {name!r} is missing from storage"}) from None
            media = ASSET_TYPES.get(Path(name).suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
            return Response(content=data, media_type=media,
                            headers={"Content-Disposition": f'attachment; filename="{name}"'})

        @api.delete(f"/{API_VERSION}/jobs/{{job_id}}", response_model=JobView, status_code=202, responses=errors, dependencies=auth)
        async def cancel(self, job_id: str):
            """Cancel a queued or running job (409 when it has already finished)."""
            view = await self._view(job_id)
            if view["status"] in TERMINAL:
                raise HTTPException(409, {"error": f"job {job_id} already {view['status']}"})
            await asyncio.to_thread(self.store.request_cancel, job_id)
            try:  # a job no worker has started is cancelled now, not when a worker reaches it
                await self.queue.cancel.remote(job_id)
            except Exception:  # the queue restarting: the cancel file alone still stops the job
                log.exception("queue unavailable while cancelling %s", job_id)
            view = await self._view(job_id)
            return JobView(**view)

        async def _view(self, job_id: str) -> dict[str, Any]:
            try:
                return await asyncio.to_thread(self.store.view, job_id)
            except UnknownJob:
                raise HTTPException(404, {"error": f"no job {job_id!r}"}) from None

    return Ingress, api


# ---------------------------------------------------------------------------- assembly
def resolve_paths(args: dict[str, Any]) -> dict[str, Any]:
    """Local relative storage paths resolved against this process's working directory (replicas
    run elsewhere); model paths already resolve against the source checkout too."""
    args = dict(args)
    store = args.get("storage", ServeSettings.__dataclass_fields__["storage"].default)
    if storage.is_local(store):
        args["storage"] = str(Path(storage.absolute(store)).resolve())
    return args


def build_app(args: dict[str, Any]):
    """The Serve application for ``args`` (ServeSettings fields): the config file's import path."""
    args = resolve_paths(args)
    settings = ServeSettings.from_dict(args)
    host = _serving_host()  # `serve run` / `serve deploy` of a config file come here too
    if host is None:
        log.warning("cannot tell the HTTP host Serve listens on; the token check was skipped")
    else:
        check_exposure(host, settings.auth_token_env, settings.allow_anonymous_remote)
    values = settings.to_dict()
    worker = TextTo3DWorker.options(**settings.worker.options()).bind(values)
    generator = MultiViewGenerator.options(**settings.generator.options()).bind(values)
    queue = JobQueue.bind(values, worker)
    ingress, _ = make_ingress(settings, _token_digest(settings.auth_token_env))
    return ingress.options(**settings.ingress.options()).bind(values, generator, queue)


def openapi_document(args: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document of the API for ``args`` (no Ray cluster needed)."""
    _, api = make_ingress(ServeSettings.from_dict(args))
    return api.openapi()
