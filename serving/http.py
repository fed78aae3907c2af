"""HTTP/JSON front of the server: the KServe Open Inference Protocol v2 routes and its generate
extension, the session and glimpse calls, and the playground page, on aiohttp in the server's
own event loop, over the same engine as gRPC. This module owns the server's side of it: the
route table, its lifecycle (start, drain and stop), admission and the mapping of errors to HTTP;
the handlers behind the routes are serving/http_routes.py's.

One domain path: every handler builds the request protobuf the gRPC call would get (from JSON,
through google.protobuf.json_format where the names match; serving/http_json.py) and calls the
same InferenceServicer method, so validation, limits, sessions and their ownership are the
engine's; its errors carry a gRPC code, mapped here to an HTTP status (`HTTP_STATUS`) with a
body `{"error": "..."}`. Callers are admitted as serving.auth's Gate admits gRPC calls: the
same API keys (`Authorization: Bearer KEY`), the same per-client rate limiter (one bucket per
client across both protocols), the same Caller for session ownership; the request body counts
in the same in-flight byte budget and is bounded by the same receive limit (413 past it).
Health and the playground page need no key, as gRPC's health service does not.

Routes (docs/http.md has the bodies and curl examples):

    GET  /                                      the playground page (serving/static)
    GET  /v2/health/live, /v2/health/ready      200, or 503 while not SERVING (a drain)
    GET  /v2                                    server metadata
    GET  /v2/models                             every model's metadata (ListModels)
    GET  /v2/models/{name}, .../ready           one model's metadata; ready or not
    POST /v2/models/{name}/generate             Generate, the whole text in one answer
    POST /v2/models/{name}/generate_stream      Generate as server-sent events
    POST /v2/models/{name}/score                Score
    POST /v2/models/{name}/classify             ClassifyGlimpses, every answer at once
    POST /v2/models/{name}/classify_stream      the same as server-sent events, glimpse by glimpse
    POST /v2/models/{name}/sessions             CreateSession
    GET  /v2/sessions/{id}, DELETE ...          GetSession, CloseSession
    POST /v2/sessions/{id}/snapshot, .../fork   SnapshotSession, ForkSession
    POST /v2/sessions/restore                   RestoreSession

Never imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from pathlib import Path

from aiohttp import web

from serving.auth import Caller, rate_refusal, run_as
from serving.errors import ServingError
from serving.http_json import HTTP_STATUS, HttpError, json_object
from serving.http_routes import HttpRoutes
from serving.limits import OverBudget

log = logging.getLogger("nlstm.serving")


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# --------------------------------------------------------------------------------- the app
class HttpFront:
    """The HTTP server: `await start(host, port)`, `await stop(grace)`."""

    def __init__(
        self,
        servicer,
        health,
        metrics,
        *,
        keys=None,
        rate=None,
        budget=None,
        max_body: int = 1 << 20,
        max_concurrent: int = 4096,
    ) -> None:
        self.routes, self.metrics = HttpRoutes(servicer, health), metrics
        self.keys, self.rate, self.budget = keys, rate, budget
        self.max_body, self.max_concurrent = max_body, max_concurrent
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.runner: web.AppRunner | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body, middlewares=[self._errors])
        r, h = app.router, self.routes
        r.add_get("/", h.playground)
        r.add_get("/v2/health/live", h.live)
        r.add_get("/v2/health/ready", h.ready)
        r.add_get("/v2", self.call("ServerMetadata", h.server_metadata, body=False))
        r.add_get("/v2/models", self.call("ListModels", h.list_models, body=False))
        r.add_get("/v2/models/{name}", self.call("ListModels", h.model_metadata, body=False))
        r.add_get("/v2/models/{name}/ready", self.call("ListModels", h.model_ready, body=False))
        r.add_post("/v2/models/{name}/generate", self.call("Generate", h.generate))
        r.add_post("/v2/models/{name}/generate_stream", self.call("Generate", h.generate_stream))
        r.add_post("/v2/models/{name}/score", self.call("Score", h.score))
        r.add_post("/v2/models/{name}/classify", self.call("ClassifyGlimpses", h.classify))
        r.add_post(
            "/v2/models/{name}/classify_stream", self.call("ClassifyGlimpses", h.classify_stream)
        )
        r.add_post("/v2/models/{name}/sessions", self.call("CreateSession", h.create_session))
        r.add_post("/v2/sessions/restore", self.call("RestoreSession", h.restore_session))
        r.add_get("/v2/sessions/{sid}", self.call("GetSession", h.get_session, body=False))
        r.add_delete("/v2/sessions/{sid}", self.call("CloseSession", h.close_session, body=False))
        r.add_post("/v2/sessions/{sid}/snapshot", self.call("SnapshotSession", h.snapshot_session))
        r.add_post("/v2/sessions/{sid}/fork", self.call("ForkSession", h.fork_session))
        return app

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        # handler_cancellation: a client that goes away cancels its call, as in gRPC (a
        # Generate stops sampling, its session keeps what was sent)
        # shutdown_timeout: stop() has already given calls their grace; what still runs then
        # is cancelled, as gRPC's stop(grace) cancels its calls
        self.runner = web.AppRunner(
            self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, host.strip("[]") or None, port, ssl_context=ssl_context)
        await site.start()
        self.port = self.runner.addresses[0][1]  # (host, port[, ...]) of the one site
        return self.port

    async def stop(self, grace: float) -> None:
        """Let calls in flight finish within `grace` seconds (new ones are refused by the
        draining engine meanwhile: 503), then close; calls still running are cancelled."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        if self.runner is not None:
            await self.runner.cleanup()

    # ------------------------------------------------------------------ plumbing
    @web.middleware
    async def _errors(self, request, handler):
        """Every error as {"error": ...}: aiohttp's own (no route 404, 405, 413) too."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = (
                exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
            )
            if isinstance(exc, web.HTTPRequestEntityTooLarge):
                message = (
                    f"the request body is larger than this server's limit of {self.max_body} bytes "
                    "(sized from --max-text and the stop-string limits, or --max-request-bytes)"
                )
            elif exc.status == 404:
                message = (
                    f"no route {request.method} {request.path}; see docs/http.md for the routes"
                )
            elif exc.status == 405:
                message = f"{request.method} is not allowed on {request.path}"
            return error_response(exc.status, message)

    def _admit(self, request: web.Request) -> None:
        """The call's Caller, as serving.auth.Gate admits gRPC calls; raises 401 or 429."""
        client = None
        if self.keys is not None:
            auth = request.headers.get("Authorization")
            client, why = self.keys.client_of([("authorization", auth)] if auth is not None else [])
            if client is None:
                raise HttpError(401, why.replace("the metadata", "the header"), "UNAUTHENTICATED")
        caller = Caller(client or f"peer:{peer_of(request)}", private=client is not None)
        if self.rate is not None and (wait := self.rate.allow(caller.client)):
            raise HttpError(429, rate_refusal(self.rate, wait), "RESOURCE_EXHAUSTED")
        run_as(caller)  # set by each call before anything reads it (the session store does)

    def call(self, method: str, handler, body: bool = True):
        """An aiohttp handler running handler(request, json_body) as the call `method`: admitted
        (key, rate, concurrency) before its body is read, the body held in the in-flight byte
        budget while the call runs, errors mapped to HTTP, counted in the gRPC call metrics."""
        metrics = self.metrics

        async def run(request: web.Request) -> web.StreamResponse:
            start, code, held = time.perf_counter(), "OK", None
            self.inflight += 1
            self._idle.clear()
            try:
                if self.inflight > self.max_concurrent:
                    raise HttpError(
                        429,
                        f"the server is running its maximum of {self.max_concurrent} calls; "
                        "retry later",
                        "RESOURCE_EXHAUSTED",
                    )
                self._admit(request)
                data = None
                if body:
                    raw = await request.read()  # bounded by client_max_size: 413 past it
                    if self.budget is not None:
                        held = self.budget.hold(len(raw))
                        if isinstance(held, OverBudget):
                            raise HttpError(429, held.message(), "RESOURCE_EXHAUSTED")
                    data = json_object(raw)
                return await handler(request, data)
            except HttpError as exc:
                code = exc.code
                return error_response(exc.status, str(exc))
            except ServingError as exc:
                code = exc.code
                return error_response(HTTP_STATUS.get(exc.code, 500), str(exc))
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except web.HTTPException as exc:
                code = "RESOURCE_EXHAUSTED" if exc.status == 413 else "INVALID_ARGUMENT"
                raise
            except ConnectionResetError:  # the client went away while a stream was written
                code = "CANCELLED"
                raise
            except Exception:
                code = "INTERNAL"
                log.exception("unexpected error in HTTP %s", method)
                return error_response(500, f"internal error in {method}; see the server log")
            finally:
                del held  # gives its bytes back to the budget
                self.inflight -= 1
                if not self.inflight:
                    self._idle.set()
                metrics.requests.labels(method, code).inc()
                metrics.latency.labels(method).observe(time.perf_counter() - start)

        return run


def ssl_context(
    cert_file: str | Path, key_file: str | Path, client_ca_file: str | Path | None = None
) -> ssl.SSLContext:
    """HTTPS with the certificate and key gRPC's TLS uses (serving.auth.server_credentials);
    with client_ca_file, mutual TLS: every client must present a certificate it signed."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert_file), str(key_file))
    if client_ca_file is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(client_ca_file))
    return ctx


def peer_of(request: web.Request) -> str:
    """The client's address as serving.auth.peer_host names a gRPC peer ('ipv4:127.0.0.1',
    'ipv6:[::1]'), so that a client's quota is one across both protocols."""
    host = request.remote or ""
    return f"ipv6:[{host}]" if ":" in host else f"ipv4:{host}"
