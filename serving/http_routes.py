"""The HTTP/JSON front's route handlers (serving/http.py wires them, admits the caller and maps
errors): each takes the aiohttp request and its parsed JSON body, builds the request protobuf
the gRPC call would get (serving/http_json.py), calls the same InferenceServicer method and
answers its result as JSON or as server-sent events. Also the open routes: the playground page
and the health checks. Never imports torch.
"""

from __future__ import annotations

import base64
import contextlib
from pathlib import Path

from aiohttp import web
from grpc_health.v1 import health_pb2

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.errors import ServingError
from serving.http_json import (
    FINISH,
    GENERATE_NAMES,
    HttpError,
    check_fields,
    from_serving,
    generate_request,
    glimpse_json,
    glimpse_requests,
    model_json,
    parse_message,
    score_json,
    session_json,
    sse,
)

STATIC = Path(__file__).with_name("static")
PLAYGROUND = STATIC / "playground.html"


class HttpRoutes:
    """The handlers behind serving.http.HttpFront's routes, over one servicer and the gRPC
    health servicer. The `(request, body)` ones run inside HttpFront.call; the open routes
    (playground, live, ready) take the request alone."""

    def __init__(self, servicer, health) -> None:
        self.servicer, self.health = servicer, health

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


class _NoContext:
    """The context HealthServicer.Check gets from the readiness route: it aborts only for a
    service it does not know, and the server's "" is set before the HTTP port opens."""

    async def abort(self, code, details=""):
        raise HttpError(503, f"health: {details or code}", "UNAVAILABLE")
