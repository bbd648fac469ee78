"""A small Python client of the Serve HTTP API (``jobs/serve.py``).

    from mvdream_platform.client import MVDreamClient
    client = MVDreamClient("http://127.0.0.1:8000", token=None)   # token: $MVDREAM_SERVE_TOKEN
    views = client.multiview_images(["a red cube"], steps=20)      # [prompt][view] -> (H, W, 3) uint8
    ids = client.submit(["a red cube", "a blue cone"], steps=400)
    view = client.wait(ids[0])                                     # raises JobFailed unless it succeeds
    paths = client.download(ids[0], "outputs/assets")              # {"mesh.glb": Path, ...}
"""

from __future__ import annotations

import base64
import io
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests

TERMINAL = ("succeeded", "failed", "cancelled")


class ServeError(RuntimeError):
    """An HTTP error from the server, with its status and JSON body."""

    def __init__(self, status: int, body: Any, url: str):
        self.status, self.body, self.url = status, body, url
        detail = body
        if isinstance(body, dict):
            fields = [f"{e.get('field')}: {e.get('message')} (allowed: {e.get('allowed')})"
                      for e in body.get("errors", [])]
            detail = "; ".join([str(body.get("error", ""))] + fields)
        super().__init__(f"HTTP {status} from {url}: {detail}")


class JobFailed(RuntimeError):
    """The job ended failed or cancelled (its status view is ``.view``)."""

    def __init__(self, view: dict[str, Any]):
        self.view = view
        super().__init__(f"job {view['id']} {view['status']}: {view.get('error')}")


class MVDreamClient:
    """``retries``: how many times a 503 (a server replica was lost, or the server's deadline
    passed) is retried, waiting the server's ``Retry-After`` seconds, doubled on each try. Only
    requests that are safe to repeat are retried: GET, DELETE and POST /v1/multiview (a
    text-to-3D submission is never sent twice)."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 60.0,
                 token_env: str = "MVDREAM_SERVE_TOKEN", retries: int = 3):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.session = requests.Session()
        token = token if token is not None else os.environ.get(token_env)
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    # ------------------------------------------------------------ plumbing
    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        url = self.base_url + path
        timeout = kwargs.pop("timeout", self.timeout)
        repeatable = method in ("GET", "DELETE") or path == "/v1/multiview"
        for attempt in range(self.retries + 1):
            response = self.session.request(method, url, timeout=timeout, **kwargs)
            if response.status_code != 503 or not repeatable or attempt == self.retries:
                break
            try:
                wait = float(response.headers.get("Retry-After", 1.0))
            except ValueError:
                wait = 1.0
            time.sleep(wait * 2 ** attempt)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = response.text
            raise ServeError(response.status_code, body, url)
        return response

    def get_bytes(self, path: str) -> bytes:
        """Any server path (an asset or a URL from a ``response_format="url"`` reply)."""
        return self._request("GET", path).content

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz").json()

    # ------------------------------------------------------------ multi-view
    def multiview(self, prompts: list[str], **options: Any) -> dict[str, Any]:
        """POST /v1/multiview: the JSON reply (options: num_views, elevation, steps,
        guidance_scale, seed, resolution, negative_prompt, response_format, ...)."""
        return self._request("POST", "/v1/multiview", json={"prompts": list(prompts), **options}).json()

    def multiview_images(self, prompts: list[str], **options: Any) -> list[list[np.ndarray]]:
        """Decoded views: ``[prompt][view]`` -> (H, W, 3) uint8."""
        import PIL.Image

        reply = self.multiview(prompts, **options)
        out = []
        for result in reply["results"]:
            blobs = [self.get_bytes(u) if options.get("response_format") == "url" else base64.b64decode(u)
                     for u in result["images"]]
            out.append([np.asarray(PIL.Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
        return out

    # ------------------------------------------------------------ text-to-3D jobs
    def submit(self, prompts: list[str], **options: Any) -> list[str]:
        """POST /v1/text-to-3d: one job id per prompt (options: steps, seed, guidance,
        guidance_scale, negative_prompt, cfg_rescale)."""
        reply = self._request("POST", "/v1/text-to-3d", json={"prompts": list(prompts), **options}).json()
        return [job["id"] for job in reply["jobs"]]

    def status(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/v1/jobs/{job_id}").json()

    def wait(self, job_id: str, timeout: float = 3600.0, poll_s: float = 2.0, on_progress=None) -> dict[str, Any]:
        """Poll until the job finishes; returns its view, raises :class:`JobFailed` unless it
        succeeded and TimeoutError after ``timeout`` seconds. ``on_progress(view)`` per poll."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.status(job_id)
            if on_progress is not None:
                on_progress(view)
            if view["status"] in TERMINAL:
                if view["status"] != "succeeded":
                    raise JobFailed(view)
                return view
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {view['status']} after {timeout:.0f} s")
            time.sleep(poll_s)

    def download(self, job_id: str, dest: str | os.PathLike, names: list[str] | None = None) -> dict[str, Path]:
        """Save the job's assets (all, or ``names``) into ``dest/<job_id>/``; returns name -> path."""
        view = self.status(job_id)
        wanted = view["assets"] if names is None else names
        missing = sorted(set(wanted) - set(view["assets"]))
        if missing:
            raise ValueError(f"job {job_id} has no assets {missing}; it has {view['assets']}")
        folder = Path(dest) / job_id
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name in wanted:
            data = self.get_bytes(f"/v1/jobs/{job_id}/assets/{name}")
            tmp = folder / f".{name}.part"
            tmp.write_bytes(data)
            tmp.replace(folder / name)  # never a half-written asset under its real name
            paths[name] = folder / name
        return paths
