"""The admission webhook's HTTPS server: POST /mutate and /validate, GET /healthz and /metrics.

The API server sends AdmissionReview v1 documents; admission.py decides. A
body that is not a well-formed review is a 400 with one line, a body over
MAX_BODY a 413, both before any decision. The key-broker settings file (a
ConfigMap mounted into the pod) is read again whenever it changes, so a new
broker URL needs no restart.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from cove.k8s import admission

MAX_BODY = 3 * 2**20  # a Pod is at most ~1.5 MiB in etcd; twice that for the review around it

log = logging.getLogger("cove.k8s.webhook")


class SettingsFile:
    """The key-broker settings, reloaded when the file's mtime or size changes."""

    def __init__(self, path: Path | None, default_memory_mib: int):
        self.path = path
        self.default_memory_mib = default_memory_mib
        self._stamp: tuple[int, int, int] | None = None
        self._settings = admission.Settings(default_memory_mib=default_memory_mib)

    def get(self) -> admission.Settings:
        if self.path is None:
            return self._settings
        info = self.path.stat()
        stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        if stamp != self._stamp:
            self._settings = admission.Settings.from_json(self.path.read_text(), self.default_memory_mib)
            self._stamp = stamp
        return self._settings


def create_app(settings: SettingsFile) -> FastAPI:
    registry = CollectorRegistry()
    reviews = Counter(
        "cove_webhook_reviews",
        "AdmissionReviews answered, by endpoint and decision",
        ["endpoint", "decision"],
        registry=registry,
    )
    app = FastAPI(title="Cove admission webhook", docs_url=None, redoc_url=None, openapi_url=None)

    async def _body(request: Request) -> bytes | None:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _handle(request: Request, endpoint: str, mutate: bool) -> JSONResponse:
        body = await _body(request)
        if body is None:
            reviews.labels(endpoint, "too-large").inc()
            return JSONResponse({"error": f"the review is larger than {MAX_BODY} bytes"}, status_code=413)
        try:
            current = settings.get()
        except (OSError, ValueError) as exc:  # the mounted ConfigMap went bad: fail closed, say why
            log.error("key-broker settings %s unusable: %s", settings.path, exc)
            reviews.labels(endpoint, "settings-error").inc()
            return JSONResponse({"error": f"the webhook's key-broker settings are unusable: {exc}"}, status_code=500)
        try:
            answer = admission.review(admission.decode_review(body), current, mutate)
        except ValueError as exc:  # BadReview, also for a body that is not one JSON value
            reviews.labels(endpoint, "malformed").inc()
            line = str(exc) if isinstance(exc, admission.BadReview) else "the body is not JSON"
            return JSONResponse({"error": line}, status_code=400)
        response = answer["response"]
        decision = "refused" if not response["allowed"] else "patched" if "patch" in response else "allowed"
        reviews.labels(endpoint, decision).inc()
        if decision == "refused":
            log.info("refused pod uid=%s: %s", response["uid"], response["status"]["message"])
        return JSONResponse(answer)

    @app.post("/mutate")
    async def mutate(request: Request) -> JSONResponse:
        return await _handle(request, "mutate", True)

    @app.post("/validate")
    async def validate(request: Request) -> JSONResponse:
        return await _handle(request, "validate", False)

    @app.get("/healthz")
    async def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(listen: str, certfile: str, keyfile: str, settings: SettingsFile) -> None:
    import uvicorn

    host, _, port = listen.rpartition(":")
    uvicorn.run(
        create_app(settings),
        host=host.strip("[]") or "0.0.0.0",
        port=int(port),
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
        log_level="warning",
        access_log=False,
        h11_max_incomplete_event_size=MAX_BODY,
    )


def check_files(*paths: str) -> str | None:
    """The first of PATHS that cannot be read, for a one-line refusal before serving."""
    for path in paths:
        if not os.access(path, os.R_OK):
            return path
    return None
