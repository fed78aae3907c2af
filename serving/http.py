"""HTTP/JSON front of the server: the KServe Open Inference Protocol v2 routes and its generate
extension, the session and glimpse calls, and the playground page, on aiohttp in the server's
own event loop, over the same engine as gRPC.

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
import base64
import contextlib
import logging
import ssl
import time
from pathlib import Path

from aiohttp import web
from grpc_health.v1 import health_pb2

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.auth import Caller, rate_refusal, run_as
from serving.errors import ServingError
from serving.http_json import (
    FINISH,
    GENERATE_NAMES,
    HTTP_STATUS,
    HttpError,
    check_fields,
    from_serving,
    generate_request,
    glimpse_json,
    glimpse_requests,
    json_object,
    model_json,
    parse_message,
    score_json,
    session_json,
    sse,
)
from serving.limits import OverBudget

log = logging.getLogger("nlstm.serving")

STATIC = Path(__file__).with_name("static")
PLAYGROUND = STATIC / "playground.html"


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
        self.servicer, self.health, self.metrics = servicer, health, metrics
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
        r = app.router
        r.add_get("/", self.playground)
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_get("/v2", self.call("ServerMetadata", self.server_metadata, body=False))
        r.add_get("/v2/models", self.call("ListModels", self.list_models, body=False))
        r.add_get("/v2/models/{name}", self.call("ListModels", self.model_metadata, body=False))
        r.add_get("/v2/models/{name}/ready", self.call("ListModels", self.model_ready, body=False))
        r.add_post("/v2/models/{name}/generate", self.call("Generate", self.generate))
        r.add_post("/v2/models/{name}/generate_stream", self.call("Generate", self.generate_stream))
        r.add_post("/v2/models/{name}/score", self.call("Score", self.score))
        r.add_post("/v2/models/{name}/classify", self.call("ClassifyGlimpses", self.classify))
        r.add_post(
            "/v2/models/{name}/classify_stream", self.call("ClassifyGlimpses", self.classify_stream)
        )
        r.add_post("/v2/models/{name}/sessions", self.call("CreateSession", self.create_session))
        r.add_post("/v2/sessions/restore", self.call("RestoreSession", self.restore_session))
        r.add_get("/v2/sessions/{sid}", self.call("GetSession", self.get_session, body=False))
        r.add_delete(
            "/v2/sessions/{sid}", self.call("CloseSession", self.close_session, body=False)
        )
        r.add_post(
            "/v2/sessions/{sid}/snapshot", self.call("SnapshotSession", self.snapshot_session)
        )
        r.add_post("/v2/sessions/{sid}/fork", self.call("ForkSession", self.fork_session))
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

    # ------------------------------------------------------------------ open routes
    async def playground(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(
            PLAYGROUND,
            headers={"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-cache"},
        )

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        """Ready while gRPC health says SERVING for the whole server (NOT_SERVING in a drain)."""
        status = await self.health.Check(health_pb2.HealthCheckRequest(service=""), _NoContext())
        ready = status.status == health_pb2.HealthCheckResponse.SERVING
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    # ------------------------------------------------------------------ metadata
    async def _models(self) -> dict[str, pb.ModelInfo]:
        r = await self.servicer.ListModels(pb.ListModelsRequest(), None)
        return {m.name: m for m in r.models}

    async def server_metadata(self, request, _body) -> web.Response:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("nlstm")
        except PackageNotFoundError:
            v = ""
        return web.json_response(
            {
                "name": "nlstm",
                "version": v,
                "extensions": ["generate", "score", "sessions", "classify"],
            }
        )

    async def list_models(self, request, _body) -> web.Response:
        return web.json_response(
            {"models": [model_json(m) for m in (await self._models()).values()]}
        )

    async def _model(self, request) -> pb.ModelInfo:
        name = request.match_info["name"]
        models = await self._models()
        if name not in models:
            raise HttpError(
                404, f"no model {name!r}; this server runs {', '.join(sorted(models))}", "NOT_FOUND"
            )
        return models[name]

    async def model_metadata(self, request, _body) -> web.Response:
        return web.json_response(model_json(await self._model(request)))

    async def model_ready(self, request, _body) -> web.Response:
        await self._model(request)
        return await self.ready(request)

    # ------------------------------------------------------------------ generate
    async def generate(self, request, body) -> web.Response:
        name = request.match_info["name"]
        req = generate_request(name, body)
        text, bits, finish, position = [], [], pb.FINISH_REASON_UNSPECIFIED, 0
        responses = self.servicer.Generate(req, None)
        try:
            async with contextlib.aclosing(responses):
                async for r in responses:
                    text.append(r.text)
                    bits.extend(r.bits)
                    finish, position = r.finish_reason, r.position
        except ServingError as exc:
            raise from_serving(exc, GENERATE_NAMES) from None
        out = {
            "model_name": name,
            "model_version": "",
            "text_output": "".join(text),
            "finish_reason": FINISH[finish],
            "position": position,
        }
        if req.logprobs:
            out["bits"] = bits
        return web.json_response(out)

    async def generate_stream(self, request, body) -> web.StreamResponse:
        """Server-sent events: `data: {"model_name", "text_output", "position"[, "bits"]}` per
        message, the last with its "finish_reason". An error before the first message is an
        HTTP error; one after it (the stream has begun: 200 was sent) is an `event: error`
        with {"error", "status"}."""
        name = request.match_info["name"]
        req = generate_request(name, body)
        responses = self.servicer.Generate(req, None)
        async with contextlib.aclosing(responses):
            try:
                first = await anext(responses, None)
            except ServingError as exc:
                raise from_serving(exc, GENERATE_NAMES) from None
            stream = await _event_stream(request)
            r = first
            try:
                while r is not None:
                    msg = {"model_name": name, "text_output": r.text, "position": r.position}
                    if req.logprobs:
                        msg["bits"] = list(r.bits)
                    if r.finish_reason:
                        msg["finish_reason"] = FINISH[r.finish_reason]
                    await stream.write(sse(msg))
                    r = await anext(responses, None)
            except ServingError as exc:
                err = from_serving(exc, GENERATE_NAMES)
                await stream.write(sse({"error": str(err), "status": err.status}, event="error"))
            await stream.write_eof()
            return stream

    # ------------------------------------------------------------------ score
    async def score(self, request, body) -> web.Response:
        name = request.match_info["name"]
        check_fields(body, {"text", "per_char", "session_id"}, "the body")
        req = parse_message({**body, "model": name}, pb.ScoreRequest(), "score")
        return web.json_response(score_json(name, await self.servicer.Score(req, None)))

    # ------------------------------------------------------------------ glimpses
    async def _glimpses(self, name: str, body: dict):
        requests = glimpse_requests(name, body)

        async def each():
            for r in requests:
                yield r

        return self.servicer.ClassifyGlimpses(each(), None)

    async def classify(self, request, body) -> web.Response:
        name = request.match_info["name"]
        answers = []
        async with contextlib.aclosing(await self._glimpses(name, body)) as responses:
            async for r in responses:
                answers.append(glimpse_json(r))
        last = answers[-1]
        return web.json_response(
            {
                "model_name": name,
                "predicted_class": last["predicted_class"],
                "probabilities": last["probabilities"],
                "position": last["position"],
                "steps": answers,
            }
        )

    async def classify_stream(self, request, body) -> web.StreamResponse:
        """Server-sent events, one `data: {"step", "probabilities", "predicted_class",
        "position"}` per glimpse as the model reads it."""
        name = request.match_info["name"]
        async with contextlib.aclosing(await self._glimpses(name, body)) as responses:
            try:
                first = await anext(responses, None)
            except ServingError as exc:
                raise from_serving(exc) from None
            stream = await _event_stream(request)
            r = first
            try:
                while r is not None:
                    await stream.write(sse({"model_name": name, **glimpse_json(r)}))
                    r = await anext(responses, None)
            except ServingError as exc:
                err = from_serving(exc)
                await stream.write(sse({"error": str(err), "status": err.status}, event="error"))
            await stream.write_eof()
            return stream

    # ------------------------------------------------------------------ sessions
    async def create_session(self, request, body) -> web.Response:
        check_fields(body, set(), "the body")
        s = await self.servicer.CreateSession(
            pb.CreateSessionRequest(model=request.match_info["name"]), None
        )
        return web.json_response(session_json(s))

    async def get_session(self, request, _body) -> web.Response:
        s = await self.servicer.GetSession(
            pb.GetSessionRequest(session_id=request.match_info["sid"]), None
        )
        return web.json_response(session_json(s))

    async def close_session(self, request, _body) -> web.Response:
        await self.servicer.CloseSession(
            pb.CloseSessionRequest(session_id=request.match_info["sid"]), None
        )
        return web.json_response({})

    async def snapshot_session(self, request, body) -> web.Response:
        check_fields(body, set(), "the body")
        snap = await self.servicer.SnapshotSession(
            pb.SnapshotSessionRequest(session_id=request.match_info["sid"]), None
        )
        return web.json_response(
            {
                "data": base64.b64encode(snap.data).decode(),
                "model": snap.model,
                "position": snap.position,
            }
        )

    async def restore_session(self, request, body) -> web.Response:
        # "model" and "position" too, so that snapshot's answer can be sent back as it is
        # (the data holds both; these copies are not read)
        check_fields(body, {"data", "model", "position"}, "the body")
        if not isinstance(body.get("data"), str):
            raise HttpError(
                400,
                'restore takes {"data": "..."}: a snapshot\'s data, base64-encoded as '
                "snapshot returns it",
            )
        try:
            data = base64.b64decode(body["data"], validate=True)
        except ValueError:
            raise HttpError(
                400, "data is not valid base64 (the standard alphabet, with padding)"
            ) from None
        s = await self.servicer.RestoreSession(pb.RestoreSessionRequest(data=data), None)
        return web.json_response(session_json(s))

    async def fork_session(self, request, body) -> web.Response:
        check_fields(body, set(), "the body")
        s = await self.servicer.ForkSession(
            pb.ForkSessionRequest(session_id=request.match_info["sid"]), None
        )
        return web.json_response(session_json(s))


async def _event_stream(request: web.Request) -> web.StreamResponse:
    stream = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )  # proxies: pass each event on
    await stream.prepare(request)
    return stream


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


class _NoContext:
    """The context HealthServicer.Check gets from the readiness route: it aborts only for a
    service it does not know, and the server's "" is set before the HTTP port opens."""

    async def abort(self, code, details=""):
        raise HttpError(503, f"health: {details or code}", "UNAVAILABLE")
