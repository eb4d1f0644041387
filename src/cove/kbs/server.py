"""The HTTP face of the broker: a FastAPI application and ``serve``.

Protocol endpoints (the KBS attestation protocol):
``POST /kbs/v0/auth``, ``POST /kbs/v0/attest``,
``GET /kbs/v0/resource/{repository}/{type}/{tag}``; public helpers
``GET /kbs/v0/jwks`` (token keys), ``GET /kbs/v0/ca`` (the broker's CA),
``GET /healthz`` and ``GET /metrics`` (Prometheus). Admin endpoints live
under ``/kbs/v0/admin/`` and need a signed admin token. Every error is an RFC
7807 problem document (``application/problem+json``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ctypes
import json
import logging
import os
import queue
import re
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cove.decode import decode_json
from cove.errors import CoveError
from cove.kbs.broker import Broker, Settings
from cove.kbs.problems import Problem
from cove.kbs.store import Busy, Store

COOKIE = "kbs-session-id"
T = TypeVar("T")
PROBLEM_MEDIA = "application/problem+json"
log = logging.getLogger("cove.kbs")


# -- request and response bodies (they make the OpenAPI document) ----------------------------------
class AuthRequest(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="allow")
    version: str = Field(description="KBS protocol version, e.g. 0.1.1", max_length=32)
    tee: str = Field(description="cove, tpm, sgx, tdx, snp or sample", max_length=32)
    extra_params: dict[str, Any] | str | None = Field(default=None, alias="extra-params")


class Challenge(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    nonce: str
    extra_params: dict[str, Any] = Field(default_factory=dict, alias="extra-params")


class RuntimeData(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="allow")
    nonce: str = Field(max_length=256)
    tee_pubkey: dict[str, Any] = Field(alias="tee-pubkey", description="the TEE's public key as a JWK")


class Attestation(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="allow")
    runtime_data: RuntimeData = Field(alias="runtime-data")
    tee_evidence: Any = Field(alias="tee-evidence", description="evidence; format per tee type")
    init_data: dict[str, Any] | None = Field(default=None, alias="init-data")


class AttestationToken(BaseModel):
    token: str


class Jwe(BaseModel):
    protected: str
    encrypted_key: str
    iv: str
    ciphertext: str
    tag: str


class ProblemDocument(BaseModel):
    type: str
    title: str
    status: int
    detail: str


class SecretCreate(BaseModel):
    path: str = Field(description="repository/type/tag", max_length=400)
    kind: str = Field(
        description="data, aes-256, ec-p256, ec-p384, rsa-2048/3072/4096, cert or password", max_length=32
    )
    policy: str = Field(description="name of the release policy", max_length=64)
    exportable: bool = Field(default=True, description="false: never readable by admins")
    params: dict[str, Any] = Field(default_factory=dict)
    value: str | None = Field(default=None, description="base64 of an uploaded value; omit to generate")


class SecretRotate(BaseModel):
    value: str | None = Field(default=None, description="base64 of the new value; omit to generate")


class SecretPolicy(BaseModel):
    policy: str = Field(max_length=64)


class PolicyBody(BaseModel):
    body: str = Field(description="the policy text (TOML or JSON)", max_length=65536)


class AdminKey(BaseModel):
    name: str = Field(max_length=64)
    jwk: dict[str, Any]
    role: str = Field(default="admin", max_length=16)


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ProblemDocument, "content": {PROBLEM_MEDIA: {}}} for status in (400, 401, 403, 404)
}
# What the guard answers itself: (method, path) -> endpoint, and "resource" -> the resource endpoint.
Endpoint = Callable[..., Awaitable[Response]]
ProtocolTable = dict[tuple[str, str] | str, Endpoint]
Handlers = Mapping[Any, Callable[[Request, Any], Any]]  # FastAPI's exception handlers (all async here)


def _problem_response(problem: Problem, request: Request | None = None) -> JSONResponse:
    document = problem.document(request.url.path if request else None)  # its status depends on the path
    return JSONResponse(document, status_code=document["status"], media_type=PROBLEM_MEDIA)


def _b64decode(value: str | None, what: str) -> bytes | None:
    if value is None:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise Problem("InvalidRequest", f"{what} must be base64") from None


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.active = self.waiting = 0  # requests past the guard's bound, and waiting for it (event loop only)
        self.handed_off: Callable[[], int] = lambda: 0  # OffLoop.handed_off

    def add(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    def render(self) -> str:
        with self._lock:
            items = sorted(self.counts.items())
        lines = ["# TYPE cove_kbs_requests_total counter"]
        for name, count in items:
            lines.append(f'cove_kbs_requests_total{{outcome="{name}"}} {count}')
        lines += [
            "# TYPE cove_kbs_active_requests gauge",
            f"cove_kbs_active_requests {self.active}",
            "# TYPE cove_kbs_waiting_requests gauge",
            f"cove_kbs_waiting_requests {self.waiting}",
            "# TYPE cove_kbs_busy_handoffs_total counter",
            f"cove_kbs_busy_handoffs_total {self.handed_off()}",
        ]
        return "\n".join(lines) + "\n"


_PLAIN_COOKIE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # what secrets.token_urlsafe makes: no quoting needed
ADMIN_PREFIX = "/kbs/v0/admin/"
# Request body caps, enforced while reading (before parsing). /attest: hardware evidence with its
# collateral is ~100 KB. Admin uploads: a secret value is at most 1 MiB (base64 in JSON).
BODY_LIMITS = {
    ("POST", "/kbs/v0/auth"): 16 << 10,
    ("POST", "/kbs/v0/attest"): 1 << 20,
    ("POST", "/kbs/v0/admin/secrets"): 2 << 20,
}
ROTATE_LIMIT = 2 << 20
DEFAULT_BODY_LIMIT = 128 << 10
MAX_ACTIVE = 64  # requests past the guard at once (reading their bodies or being answered)
BODY_TIMEOUT = 10.0  # seconds a client may take to send each part of its body
_UNGUARDED = ("/healthz", "/metrics")
RESOURCE_PREFIX = "/kbs/v0/resource/"
MAX_VERSION = 1 << 30


def body_limit(method: str, path: str) -> int:
    """The largest body accepted for this request."""
    if method == "POST" and path.startswith(ADMIN_PREFIX + "secrets/") and path.endswith("/rotate"):
        return ROTATE_LIMIT
    return BODY_LIMITS.get((method, path), DEFAULT_BODY_LIMIT)


class _BodyTooLarge(Exception):
    """The body went past its cap while being read; the guard answers 413."""


def _guard_document(status: int, kind: str, title: str, detail: str, path: str) -> dict[str, Any]:
    return {"type": f"urn:cove:kbs:error:{kind}", "title": title, "status": status, "detail": detail, "instance": path}


class Guard:
    """What every request passes before FastAPI sees it (a pure ASGI middleware).

    Admin requests are authenticated from their headers alone, before a byte
    of their body is read; bodies are capped while they are read (a declared
    Content-Length over the cap is refused at once, and the connection is
    closed rather than drained); a client that stalls mid-body is cut off;
    and at most MAX_ACTIVE requests are past this point at once, so memory
    is bounded by MAX_ACTIVE times the largest cap, whatever the number of
    connections.
    """

    def __init__(
        self,
        app: ASGIApp,
        broker: Broker,
        metrics: Metrics,
        off_loop: OffLoop,
        protocol: ProtocolTable,
        handlers: Handlers,
        max_active: int | None = None,
        body_timeout: float | None = None,
    ):
        self.app, self.broker, self.metrics, self.off_loop = app, broker, metrics, off_loop
        self.protocol, self.handlers = protocol, handlers
        self.max_active, self.body_timeout = max_active or MAX_ACTIVE, body_timeout or BODY_TIMEOUT
        self._active: asyncio.Semaphore | None = None
        self._in_flight = self._served = 0
        self._trimmer: asyncio.Task[None] | None = None
        self._checkpointer: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _UNGUARDED:
            await self.app(scope, receive, send)
            return
        if self._trimmer is None:
            self._trimmer = asyncio.get_running_loop().create_task(self._trim_when_idle())
            if self.off_loop.inline:
                self._checkpointer = asyncio.get_running_loop().create_task(self._checkpoints())
        self._in_flight += 1
        try:
            await self._guarded(scope, receive, send)
        finally:
            self._in_flight -= 1
            self._served += 1

    async def _trim_when_idle(self) -> None:
        """After a burst, give the memory it freed back to the system once the broker is idle.

        A burst of thousands of TLS connections leaves glibc's heaps full of free but unreturned
        chunks; the next burst lands elsewhere, and resident memory ratchets up (it is not a leak:
        Python's own allocations stay flat). malloc_trim(0) returns them. Idle means no request
        in flight and none served during the last interval: requests answered on the loop leave
        none in flight between them, and a trim in the middle of a burst left the burst's memory
        held after it.
        """
        trimmed_at = last = 0
        while True:
            await asyncio.sleep(TRIM_INTERVAL)
            served = self._served
            quiet = served == last and self._in_flight == 0
            last = served
            if quiet and served - trimmed_at >= TRIM_AFTER:
                trimmed_at = served
                await self.off_loop(release_free_memory)

    async def _checkpoints(self) -> None:
        """SQLite's checkpoints in the pool, while requests are served: the loop's own connection
        leaves them to this (each is an fdatasync of several milliseconds, which on the loop stalled
        every connection)."""
        last = 0
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL)
            if self._served == last:
                continue
            last = self._served
            try:
                await self.off_loop(self.broker.store.checkpoint)
            except Exception as exc:  # the loop's connection checkpoints itself past its safety net
                log.warning("SQLite checkpoint failed: %s", exc)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if path.startswith(ADMIN_PREFIX):
            try:
                scope.setdefault("state", {})["admin"] = await self.off_loop(
                    self.broker.authenticate_admin, _bearer_from(scope)
                )
            except Problem as problem:
                self.metrics.add(problem.kind)
                document = problem.document(path)
                await _send_json(send, document, document["status"], close=True)
                return
        limit = body_limit(method, path)
        length = _content_length(scope)
        if length is None or length > limit:
            doc = (
                _guard_document(
                    413,
                    "PayloadTooLarge",
                    "The request body is too large",
                    f"the body may be at most {limit} bytes here",
                    path,
                )
                if length is not None
                else _guard_document(400, "InvalidRequest", "The request is malformed", "bad Content-Length", path)
            )
            await self._refuse(send, doc)
            return
        if self._active is None:
            self._active = asyncio.Semaphore(self.max_active)
        self.metrics.waiting += 1
        try:
            await self._active.acquire()
        finally:
            self.metrics.waiting -= 1
        self.metrics.active += 1
        try:
            await self._capped(scope, receive, send, limit, path)
        finally:
            self.metrics.active -= 1
            self._active.release()

    async def _capped(self, scope: Scope, receive: Receive, send: Send, limit: int, path: str) -> None:
        seen = 0
        refused: list[dict[str, Any]] = []
        started: list[bool] = []

        async def capped_receive() -> Message:
            nonlocal seen
            if refused:
                return {"type": "http.disconnect"}
            try:
                async with asyncio.timeout(self.body_timeout):
                    message = await receive()
            except TimeoutError:
                refused.append(
                    _guard_document(
                        408,
                        "InvalidRequest",
                        "The request is malformed",
                        f"the body did not arrive within {self.body_timeout:.0f} s",
                        path,
                    )
                )
                raise _BodyTooLarge() from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    refused.append(
                        _guard_document(
                            413,
                            "PayloadTooLarge",
                            "The request body is too large",
                            f"the body may be at most {limit} bytes here",
                            path,
                        )
                    )
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            if refused and not started:
                return  # the app's own answer to the cut-off body is replaced by the guard's
            started.append(True)
            await send(message)

        try:
            endpoint = self._protocol_endpoint(scope)
            if endpoint is None:
                await self.app(scope, capped_receive, guarded_send)
            else:
                await self._answer(endpoint, scope, capped_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if refused and not started:
            await self._refuse(send, refused[0])

    def _protocol_endpoint(self, scope: Scope) -> Callable[[Request], Awaitable[Response]] | None:
        """The endpoint of a protocol request (POST /auth, POST /attest, GET a resource), which the
        guard calls itself: FastAPI's routing, dependency solving and middleware were a quarter of a
        flow's CPU, and these endpoints need none of it. This is their only path; FastAPI's
        declarations of them make the OpenAPI document."""
        method, path = scope["method"], scope["path"]
        endpoint = self.protocol.get((method, path))
        if endpoint is None and method == "GET" and path.startswith(RESOURCE_PREFIX):
            parts = path[len(RESOURCE_PREFIX) :].split("/")
            if len(parts) == 3 and all(parts):
                resource = self.protocol["resource"]
                return lambda request: resource(parts[0], parts[1], parts[2], request)
        return endpoint

    async def _answer(
        self, endpoint: Callable[[Request], Awaitable[Response]], scope: Scope, receive: Receive, send: Send
    ) -> None:
        request = Request(scope, receive)
        try:
            response = await endpoint(request)
        except _BodyTooLarge:
            raise
        except Exception as exc:
            response = await self._handler_for(exc)(request, exc)
        await response(scope, receive, send)

    def _handler_for(self, exc: Exception) -> Callable[[Request, Exception], Awaitable[Response]]:
        for cls in type(exc).__mro__:
            if cls in self.handlers:
                return self.handlers[cls]
        raise exc

    async def _refuse(self, send: Send, document: dict[str, Any]) -> None:
        """Answer with one of the guard's own problems, count it and audit it (floods are counted)."""
        kind = document["type"].rsplit(":", 1)[1]
        self.metrics.add(kind)
        await _send_json(send, document, document["status"], close=True)
        await self.off_loop(
            self.broker.store.audit_refusal,
            "anonymous",
            "request",
            document["instance"][:400],
            f"{kind}: {document['detail']}",
        )


TRIM_INTERVAL = 0.5  # seconds between checks for an idle broker
TRIM_AFTER = 500  # requests served since the last trim
CHECKPOINT_INTERVAL = 0.5  # seconds between SQLite checkpoints while requests are served


def release_free_memory() -> bool:
    """glibc's malloc_trim(0): return free heap memory to the system; False where there is no glibc."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM is False:
        return False
    _MALLOC_TRIM(0)
    return True


_MALLOC_TRIM: Any = None


def _header(scope: Scope, wanted: bytes) -> bytes | None:
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == wanted:
            return value
    return None


def _bearer_from(scope: Scope) -> str | None:
    header = _header(scope, b"authorization")
    if not header:
        return None
    scheme, _, token = header.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _content_length(scope: Scope) -> int | None:
    """The declared body length (0 if none; chunked bodies are capped while read); None if malformed."""
    value = _header(scope, b"content-length")
    if value is None:
        return 0
    try:
        length = int(value)
    except ValueError:
        return None
    return length if length >= 0 else None


async def _send_json(send: Send, document: dict[str, Any], status: int, close: bool = False) -> None:
    body = json.dumps(document).encode()
    headers = [(b"content-type", PROBLEM_MEDIA.encode()), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(request: Request) -> bytes:
    """The request's body (the guard caps its size while it is read)."""
    chunks = [chunk async for chunk in request.stream()]
    return b"".join(chunks)


def _version(value: str | None) -> int | None:
    """?version=N of a resource request: 1 .. MAX_VERSION."""
    if value is None:
        return None
    if not (len(value) <= 10 and value.isascii() and value.isdigit() and 1 <= int(value) <= MAX_VERSION):
        raise Problem("InvalidRequest", f"version: an integer from 1 to {MAX_VERSION} is required")
    return int(value)


def _parse_json(raw: bytes) -> Any:
    """An attestation request's body (the guard capped its size); the broker reads its fields."""
    return decode_json(raw, _bad_body, "the request body", limit=max(BODY_LIMITS.values()))


def _bad_body(message: str) -> Problem:
    return Problem("InvalidRequest", f"body: {message}")


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra for an endpoint that reads its JSON body itself: the model documents it."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }


def _document_models(app: FastAPI, models: tuple[type[BaseModel], ...]) -> None:
    """Add request models that no route declares as a parameter to the OpenAPI document's schemas."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        document = generate()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            schema = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        return document

    app.openapi = openapi  # type: ignore[method-assign]


WORK_THREADS = 8  # threads running the broker's work (each holds a database connection while it does)


class GuardedApp(FastAPI):
    """FastAPI with the :class:`Guard` in front of everything, FastAPI's own middleware included.

    The protocol's requests, which the guard answers itself, never pass FastAPI's middleware stack
    (its error, telemetry and body-limit layers were 7 % of the event loop's samples under py-spy);
    every other request, and the lifespan, go through FastAPI as before.
    """

    guard: Guard | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.guard is None:
            await super().__call__(scope, receive, send)
        else:
            await self.guard(scope, receive, send)

    async def unguarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)


class OffLoop:
    """Runs the broker's blocking work (JSON parsing, database, crypto) in a thread pool.

    The pool is a queue and threads that hand each result back with one
    ``call_soon_threadsafe``: about 4 µs of CPU per hand-off, where
    loop.run_in_executor (a concurrent future chained to an asyncio one)
    took about 25 µs, and anyio's to_thread (what FastAPI uses for sync
    endpoints) about 0.25 ms more. On PostgreSQL every protocol request is
    one hand-off. ``inline``: the database is SQLite, whose statements cost
    less than a hand-off; :meth:`quick` then runs work on the loop (each
    hand-off also makes the thread and the loop queue for the interpreter
    lock: 0.5 ms of CPU per flow, measured).
    """

    def __init__(self, threads: int = WORK_THREADS, store: Store | None = None):
        self.max_threads = threads
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)  # released by each thread that waits for work
        self._threads: list[threading.Thread] = []
        self._spawn_lock = threading.Lock()
        self._closed = False
        self.store = store if store is not None and store.dialect == "sqlite" else None
        self.inline = self.store is not None
        self.handed_off = 0  # quick work that found the database busy and went to the pool

    def __call__(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """fn(*args) in a pool thread; await the answer. Work whose awaiting task was cancelled
        before a thread took it is not run (as an executor's cancelled futures are not)."""
        if self._closed:
            raise RuntimeError("the broker's work pool is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put((future, fn, args))
        if not self._idle.acquire(blocking=False):
            self._spawn()
        return future

    def _spawn(self) -> None:
        with self._spawn_lock:
            if len(self._threads) < self.max_threads and not self._closed:
                thread = threading.Thread(target=self._work, name=f"cove-kbs_{len(self._threads)}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._closed:
                return
            future, fn, args = job
            if not future.cancelled():  # a read of the future's state: atomic, and only ever set once
                try:
                    result, error = fn(*args), None
                except BaseException as exc:  # handed to the awaiting task, as an executor does
                    result, error = None, exc
                try:
                    future.get_loop().call_soon_threadsafe(_settle, future, result, error)
                except RuntimeError:  # the loop was closed meanwhile: nobody waits for the answer
                    pass
                del future, fn, args, result, error, job
            self._idle.release()

    async def quick(self, fn: Callable[..., T], *args: Any) -> T:
        """Work of bounded, sub-millisecond cost (at most one write that counts, its last): on the
        event loop if the database is SQLite, else in the pool.

        On the loop the store waits at most Store's NOWAIT_BUSY_MS (2 ms) for another writer
        (Store.without_waiting): a write that would wait longer raises Busy before it has any
        effect, and the whole call runs again in the pool, where it may wait. So a database held
        by another worker or process never stalls the loop for longer than that.
        """
        if self.store is not None:
            try:
                with self.store.without_waiting():
                    return fn(*args)
            except Busy:
                self.handed_off += 1
        return await self(fn, *args)

    def close(self) -> None:
        """Stop the threads once their current work is done; work still queued is dropped."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)


_Job = tuple["asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """On the loop: a pool thread's answer into the awaiting future (unless it was cancelled)."""
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    elif isinstance(error, StopIteration):  # a future refuses it (it would end a generator)
        future.set_exception(RuntimeError(f"the broker's work raised {error!r}"))
    else:
        future.set_exception(error)


def create_app(broker: Broker, https: bool = True, threads: int = WORK_THREADS) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        # a served process ends here (`cove kbs serve`; the embedded broker runs without lifespan)
        app.state.off_loop.close()
        broker.store.flush_refusals()  # counts of repeated refusals still in their window

    app = GuardedApp(
        title="Cove key broker",
        version="0.1.0",
        lifespan=lifespan,
        description="Attestation-gated secrets over the KBS protocol (docs/kbs.md).",
    )
    app.state.broker = broker
    metrics = Metrics()
    off_loop = OffLoop(threads, broker.store)
    metrics.handed_off = lambda: off_loop.handed_off
    app.state.off_loop = off_loop  # closed by whoever stops the server (runner.EmbeddedBroker)
    protocol: ProtocolTable = {}  # filled below: what the guard answers itself
    app.guard = Guard(
        app.unguarded,
        broker=broker,
        metrics=metrics,
        off_loop=off_loop,
        protocol=protocol,
        handlers=app.exception_handlers,
    )
    _document_models(app, (AuthRequest, Attestation))

    @app.exception_handler(_BodyTooLarge)
    async def on_too_large(request: Request, exc: _BodyTooLarge) -> Response:
        return Response(status_code=413)  # replaced by the guard's problem document

    @app.exception_handler(Problem)
    async def on_problem(request: Request, problem: Problem) -> Response:
        metrics.add(problem.kind)
        return _problem_response(problem, request)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        metrics.add("InvalidRequest")
        return _problem_response(
            Problem("InvalidRequest", f"{where or 'body'}: {first.get('msg', 'invalid')}"), request
        )

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "NotFound", 405: "InvalidRequest"}.get(exc.status_code, "InvalidRequest")
        problem = Problem(kind, str(exc.detail))
        doc = problem.document(request.url.path)
        doc["status"] = exc.status_code
        return JSONResponse(doc, status_code=exc.status_code, media_type=PROBLEM_MEDIA)

    @app.exception_handler(CoveError)
    async def on_cove_error(request: Request, exc: CoveError) -> Response:
        log.error("broker error on %s: %s", request.url.path, exc.line())
        metrics.add("Unavailable")
        return _problem_response(Problem("Unavailable", exc.line()), request)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s", request.url.path)
        metrics.add("Internal")
        doc = {
            "type": "urn:cove:kbs:error:Internal",
            "title": "Internal error",
            "status": 500,
            "detail": "the broker failed; see its log",
        }
        return JSONResponse(doc, status_code=500, media_type=PROBLEM_MEDIA)

    # -- the protocol ---------------------------------------------------------------------------
    # One code path per endpoint: the guard calls these functions for every protocol request
    # (Guard._protocol_endpoint); FastAPI's declarations below make the OpenAPI document. The body
    # is read on the event loop (capped by the guard). On PostgreSQL everything else (JSON
    # parsing, database, crypto) runs in the thread pool, one hand-off per request, so a database
    # round trip never stalls the other connections. On SQLite a request's statements take tens of
    # microseconds in this process, and the hand-offs cost more than the work (docs/kbs.md,
    # "Throughput"): auth, release and the Cove evidence's appraisal run on the loop, and only an
    # appraisal that may fetch or walk certificates (Claimed.quick) goes to the pool. Each body is
    # checked field by field by the broker; the models only document it.
    def _ok(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
        return {200: {"model": model}, **_ERRORS}

    def session_cookie(response: Response, session_id: str, lifetime: float) -> None:
        """Set-Cookie, written out directly for ids of the broker's own alphabet (SimpleCookie is slow)."""
        if not _PLAIN_COOKIE.match(session_id):
            response.set_cookie(
                COOKIE, session_id, max_age=int(lifetime), httponly=True, secure=https, samesite="strict", path="/kbs"
            )
            return
        value = (
            f"{COOKIE}={session_id}; HttpOnly; Max-Age={int(lifetime)}; Path=/kbs; SameSite=strict"
            f"{'; Secure' if https else ''}"
        )
        response.raw_headers.append((b"set-cookie", value.encode()))

    @app.post(
        "/kbs/v0/auth",
        response_class=JSONResponse,
        responses=_ok(Challenge),
        tags=["protocol"],
        openapi_extra=_json_body(AuthRequest),
    )
    async def auth(request: Request) -> JSONResponse:
        """Request: start a session; the answer is a challenge and a kbs-session-id cookie."""
        raw = await _read_body(request)
        session_id, challenge = await off_loop.quick(lambda: broker.auth(_parse_json(raw)))
        response = JSONResponse(challenge)
        session_cookie(response, session_id, broker.settings.challenge_lifetime)
        metrics.add("auth")
        return response

    @app.post(
        "/kbs/v0/attest",
        response_class=JSONResponse,
        responses=_ok(AttestationToken),
        tags=["protocol"],
        openapi_extra=_json_body(Attestation),
    )
    async def attest(request: Request) -> JSONResponse:
        """Attestation: evidence bound to runtime-data; the answer is an attestation token."""
        raw = await _read_body(request)
        session_id = request.cookies.get(COOKIE)
        if off_loop.inline:  # two halves, each its own retry: the nonce is spent once; a slow appraisal in the pool
            claimed = await off_loop.quick(broker.begin_attest, session_id, _parse_json(raw))
            finish = off_loop.quick if claimed.quick else off_loop
            token = await finish(broker.finish_attest, claimed)
        else:  # one hand-off for the whole request
            token = await off_loop(lambda: broker.attest(session_id, _parse_json(raw)))
        response = JSONResponse({"token": token})
        session_cookie(response, session_id or "", broker.settings.session_lifetime)
        metrics.add("attest")
        return response

    async def release(repository: str, kind: str, tag: str, request: Request) -> JSONResponse:
        version = _version(request.query_params.get("version"))
        step = await off_loop.quick(
            broker.begin_release, request.cookies.get(COOKIE), _bearer(request), f"{repository}/{kind}/{tag}", version
        )
        # a cert's issuing (a signature, a key parse at first) goes to the pool, where no Busy runs it twice
        document = step if isinstance(step, dict) else await off_loop(broker.finish_release, step)
        metrics.add("release")
        return JSONResponse(document)

    @app.get(
        "/kbs/v0/resource/{repository}/{kind}/{tag}", response_class=JSONResponse, responses=_ok(Jwe), tags=["protocol"]
    )
    async def resource(
        repository: str,
        kind: str,
        tag: str,
        request: Request,
        version: int | None = Query(default=None, ge=1, le=MAX_VERSION),
    ) -> JSONResponse:
        """Response: the resource as a JWE to the attested TEE key (cookie or bearer token)."""
        return await release(repository, kind, tag, request)

    protocol.update({("POST", "/kbs/v0/auth"): auth, ("POST", "/kbs/v0/attest"): attest, "resource": release})

    @app.get("/kbs/v0/jwks", tags=["public"])
    def jwks() -> dict[str, Any]:
        """The keys that sign this broker's attestation tokens."""
        return broker.jwks()

    @app.get("/kbs/v0/ca", response_class=PlainTextResponse, tags=["public"])
    def ca() -> str:
        """The broker's CA certificate (PEM): issuer of `cert` secrets."""
        return broker.ca_pem()

    @app.get("/healthz", tags=["public"])
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "schema": broker.store.schema_version()}

    @app.get("/metrics", response_class=PlainTextResponse, tags=["public"])
    def metrics_endpoint() -> str:
        return metrics.render()

    # -- administration -------------------------------------------------------------------------
    def admin(request: Request, action: str) -> str:
        """The admin key behind the request (the guard authenticated it), if its role may do action."""
        return broker.authorize_admin(request.state.admin, action)

    @app.get("/kbs/v0/admin/secrets", responses=_ERRORS, tags=["admin"])
    def list_secrets(request: Request) -> list[dict[str, Any]]:
        admin(request, "secret.list")
        return broker.list_secrets()

    @app.post("/kbs/v0/admin/secrets", status_code=201, responses=_ERRORS, tags=["admin"])
    def create_secret(body: SecretCreate, request: Request) -> dict[str, Any]:
        actor = admin(request, "secret.create")
        return broker.create_secret(
            actor, body.path, body.kind, body.policy, body.exportable, body.params, _b64decode(body.value, "value")
        )

    @app.get("/kbs/v0/admin/secrets/{repository}/{kind}/{tag}", responses=_ERRORS, tags=["admin"])
    def get_secret(repository: str, kind: str, tag: str, request: Request) -> dict[str, Any]:
        admin(request, "secret.read")
        return broker.describe(f"{repository}/{kind}/{tag}")

    @app.delete("/kbs/v0/admin/secrets/{repository}/{kind}/{tag}", status_code=204, responses=_ERRORS, tags=["admin"])
    def delete_secret(repository: str, kind: str, tag: str, request: Request) -> Response:
        actor = admin(request, "secret.delete")
        broker.delete_secret(actor, f"{repository}/{kind}/{tag}")
        return Response(status_code=204)

    @app.post("/kbs/v0/admin/secrets/{repository}/{kind}/{tag}/rotate", responses=_ERRORS, tags=["admin"])
    def rotate_secret(
        repository: str, kind: str, tag: str, request: Request, body: SecretRotate = Body(default_factory=SecretRotate)
    ) -> dict[str, Any]:
        actor = admin(request, "secret.rotate")
        return broker.rotate_secret(actor, f"{repository}/{kind}/{tag}", _b64decode(body.value, "value"))

    @app.put("/kbs/v0/admin/secrets/{repository}/{kind}/{tag}/policy", responses=_ERRORS, tags=["admin"])
    def secret_policy(repository: str, kind: str, tag: str, body: SecretPolicy, request: Request) -> dict[str, Any]:
        actor = admin(request, "secret.policy")
        return broker.set_secret_policy(actor, f"{repository}/{kind}/{tag}", body.policy)

    @app.get("/kbs/v0/admin/secrets/{repository}/{kind}/{tag}/value", responses=_ERRORS, tags=["admin"])
    def export_secret(
        repository: str,
        kind: str,
        tag: str,
        request: Request,
        version: int | None = Query(default=None, ge=1, le=1 << 30),
    ) -> dict[str, Any]:
        actor = admin(request, "secret.export")
        value = broker.export_secret(actor, f"{repository}/{kind}/{tag}", version)
        return {"value": base64.b64encode(value).decode()}

    @app.get("/kbs/v0/admin/policies", responses=_ERRORS, tags=["admin"])
    def list_policies(request: Request) -> list[dict[str, Any]]:
        admin(request, "policy.list")
        return broker.store.policies()

    @app.get("/kbs/v0/admin/policies/{name}", responses=_ERRORS, tags=["admin"])
    def get_policy(name: str, request: Request) -> dict[str, Any]:
        admin(request, "policy.read")
        return broker.get_policy(name)

    @app.put("/kbs/v0/admin/policies/{name}", responses=_ERRORS, tags=["admin"])
    def put_policy(name: str, body: PolicyBody, request: Request) -> dict[str, Any]:
        actor = admin(request, "policy.put")
        return {"name": name, "version": broker.put_policy(actor, name, body.body)}

    @app.delete("/kbs/v0/admin/policies/{name}", status_code=204, responses=_ERRORS, tags=["admin"])
    def delete_policy(name: str, request: Request) -> Response:
        actor = admin(request, "policy.delete")
        broker.delete_policy(actor, name)
        return Response(status_code=204)

    @app.get("/kbs/v0/admin/audit", responses=_ERRORS, tags=["admin"])
    def audit(
        request: Request,
        after: int = Query(default=0, ge=0, le=1 << 62),
        limit: int = Query(default=100, ge=1, le=1000),
        action: str | None = Query(default=None, max_length=32),
    ) -> list[dict[str, Any]]:
        admin(request, "audit.read")
        return broker.store.audit_log(after, limit, action)

    @app.get("/kbs/v0/admin/keys", responses=_ERRORS, tags=["admin"])
    def list_keys(request: Request) -> list[dict[str, Any]]:
        admin(request, "key.list")
        return broker.store.admin_keys()

    @app.post("/kbs/v0/admin/keys", status_code=201, responses=_ERRORS, tags=["admin"])
    def add_key(body: AdminKey, request: Request) -> dict[str, Any]:
        actor = admin(request, "key.add")
        broker.add_admin_key(actor, body.name, body.jwk, body.role)
        return {"name": body.name, "role": body.role}

    @app.delete("/kbs/v0/admin/keys/{name}", status_code=204, responses=_ERRORS, tags=["admin"])
    def delete_key(name: str, request: Request) -> Response:
        actor = admin(request, "key.delete")
        broker.delete_admin_key(actor, name)
        return Response(status_code=204)

    return app


# -- serving ------------------------------------------------------------------------------------------
ENV_CONFIG = "COVE_KBS_SERVE_CONFIG"


def settings_from_options(options: dict[str, Any]) -> Settings:
    """Settings from `cove kbs serve` options (JSON-able, so worker processes can rebuild them)."""
    from pathlib import Path

    from cove.kbs import evidence_appraisal, vault

    master = vault.load_master_key(
        Path(options["master_key_file"]) if options.get("master_key_file") else None,
        Path(options["master_key_sealed"]) if options.get("master_key_sealed") else None,
    )
    policy_text = None
    if options.get("policy"):  # read up to the policy size cap, as `cove verify --policy` reads it
        from cove.attest.policy import read_policy_text

        policy_text = read_policy_text(options["policy"])
    anchors = evidence_appraisal.TrustAnchors.from_files(
        Path(options["sgx_root_ca"]) if options.get("sgx_root_ca") else None,
        [Path(p) for p in options.get("snp_ask_ark", [])],
        [Path(p) for p in options.get("tpm_ak", [])],
    )
    return Settings(
        db_url=options["db"],
        master_key=master,
        issuer=options.get("issuer"),
        session_lifetime=float(options.get("session_lifetime", 300)),
        challenge_lifetime=float(options.get("challenge_lifetime", 300)),
        token_lifetime=float(options.get("token_lifetime", 3600)),
        attestation_policy=policy_text,
        anchors=anchors,
        collateral_dir=options.get("collateral_dir"),
        pccs_url=options.get("pccs"),
        pool_size=int(options.get("pool_size", 16)),
    )


def app_from_env() -> FastAPI:
    """uvicorn factory for worker processes: the options come through the environment."""
    options = json.loads(os.environ[ENV_CONFIG])
    return create_app(Broker(settings_from_options(options)), https=bool(options.get("certfile")))
