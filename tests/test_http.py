"""The HTTP/JSON front (serving/http.py) against real servers on port 0: every route, the same
answers as gRPC for the same request, server-sent events, errors with their HTTP statuses
(400, 401, 404, 409, 412, 413, 429, 503), API keys and session ownership, the per-client
rate shared with gRPC, readiness through a drain, a client that goes away, the call metrics,
and `nlstm serve --http-port` / NLSTM_HTTP_PORT in a real process."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.auth import ApiKeys
from serving.engine import Limits
from serving.formats import image_to_glimpses
from serving.limits import ServerLimits
from serving.server import shutdown
from serving.testing.inprocess import ServerThread
from training.testing.models import CHAR_MODEL, GLIMPSE_MODEL

KEY_A, KEY_B = secrets.token_urlsafe(24), secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def server(models_dir):
    s = ServerThread(
        models_dir,
        Limits(
            max_chars=500,
            max_text=2000,
            max_sessions=16,
            stream_interval=0.0,
            max_messages_per_s=0.0,
        ),
        http_port=0,
    )
    yield s
    s.close()


class Http:
    """Calls to one server's HTTP port: (status, JSON body)."""

    def __init__(self, port: int, key: str | None = None, host: str = "localhost") -> None:
        self.host, self.port, self.key = host, port, key

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=60)

    def headers(self) -> dict:
        h = {"Content-Type": "application/json"}
        if self.key:
            h["Authorization"] = f"Bearer {self.key}"
        return h

    def call(self, method: str, path: str, body=None, raw: bytes | None = None) -> tuple[int, dict]:
        c = self.conn()
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        c.request(method, path, data, self.headers())
        r = c.getresponse()
        out = r.read()
        c.close()
        return r.status, json.loads(out)

    def events(self, path: str, body: dict) -> list[dict]:
        """The data of every server-sent event of a stream ("event" added when named)."""
        c = self.conn()
        c.request("POST", path, json.dumps(body).encode(), self.headers())
        r = c.getresponse()
        assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream", r.read()
        out = parse_events(r.read().decode())
        c.close()
        return out


def parse_events(text: str) -> list[dict]:
    out = []
    for block in text.split("\n\n"):
        if not block:
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        data = json.loads(fields["data"])
        if "event" in fields:
            data["event"] = fields["event"]
        out.append(data)
    return out


@pytest.fixture(scope="module")
def api(server) -> Http:
    return Http(server.running.http_port)


def grpc_text(server, **fields) -> tuple[str, int]:
    request = pb.GenerateRequest(**fields)
    text, position = "", 0
    for r in server.stub.Generate(request):
        text += r.text
        position = r.position
    return text, position


# ------------------------------------------------------------------------------ the routes
def test_health_metadata_and_the_page(api):
    assert api.call("GET", "/v2/health/live") == (200, {"live": True})
    assert api.call("GET", "/v2/health/ready") == (200, {"ready": True})
    status, meta = api.call("GET", "/v2")
    assert status == 200 and meta["name"] == "nlstm" and "generate" in meta["extensions"]
    status, models = api.call("GET", "/v2/models")
    assert [m["name"] for m in models["models"]] == [CHAR_MODEL, GLIMPSE_MODEL]
    status, m = api.call("GET", f"/v2/models/{CHAR_MODEL}")
    assert (
        status == 200
        and m["kind"] == "nlstm"
        and m["vocab_size"] > 0
        and m["metrics"] == {"valid_bpc": 3.0}
    )
    assert api.call("GET", f"/v2/models/{GLIMPSE_MODEL}/ready") == (200, {"ready": True})
    status, body = api.call("GET", "/v2/models/nope")
    assert status == 404 and "no model 'nope'" in body["error"] and CHAR_MODEL in body["error"]
    c = api.conn()
    c.request("GET", "/")
    r = c.getresponse()
    page = r.read().decode()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/html")
    assert "<title>nlstm playground</title>" in page and "/generate_stream" in page


def test_generate_matches_grpc_and_streams_as_events(server, api):
    body = {
        "text_input": "the ",
        "parameters": {
            "max_tokens": 400,
            "seed": 5,
            "temperature": 0.9,
            "top_k": 8,
            "top_p": 0.9,
            "logprobs": True,
        },
    }
    status, r = api.call("POST", f"/v2/models/{CHAR_MODEL}/generate", body)
    assert status == 200
    text, position = grpc_text(
        server,
        model=CHAR_MODEL,
        prompt="the ",
        max_chars=400,
        seed=5,
        temperature=0.9,
        top_k=8,
        top_p=0.9,
    )
    assert (r["text_output"], r["position"], r["finish_reason"]) == (text, position, "length")
    assert r["model_name"] == CHAR_MODEL and len(r["bits"]) == 400 and all(b > 0 for b in r["bits"])
    events = api.events(f"/v2/models/{CHAR_MODEL}/generate_stream", body)
    assert (
        len(events) > 1
    )  # a message per character at stream_interval 0 (some join when the reader lags)
    assert "".join(e["text_output"] for e in events) == text
    assert events[-1]["finish_reason"] == "length" and events[-1]["position"] == position
    assert all("finish_reason" not in e for e in events[:-1])
    assert sum(len(e["bits"]) for e in events) == 400
    # stop strings; max_tokens defaults to 100
    status, r = api.call(
        "POST",
        f"/v2/models/{CHAR_MODEL}/generate",
        {"text_input": "the", "parameters": {"seed": 1, "stop": ["t"]}},
    )
    assert status == 200 and r["finish_reason"] in ("stop", "length")
    assert (
        r["text_output"].endswith("t")
        if r["finish_reason"] == "stop"
        else len(r["text_output"]) == 100
    )


def test_score_matches_grpc(server, api):
    status, r = api.call(
        "POST", f"/v2/models/{CHAR_MODEL}/score", {"text": "the cat sat", "per_char": True}
    )
    g = server.stub.Score(pb.ScoreRequest(model=CHAR_MODEL, text="the cat sat", per_char=True))
    assert status == 200
    assert r["bits_per_char"] == g.bits_per_char and r["num_chars"] == 11 and r["position"] == 11
    assert np.array_equal(np.float32(r["bits"]), np.float32(g.bits)) and r["boundaries"] == []


def test_classify_image_glimpses_and_stream(server, api):
    rng = np.random.default_rng(0)
    image = rng.random((28, 28)).astype(np.float32)
    glimpses = image_to_glimpses(image)
    status, by_image = api.call(
        "POST", f"/v2/models/{GLIMPSE_MODEL}/classify", {"image": image.tolist()}
    )
    assert status == 200 and len(by_image["steps"]) == 20
    status, by_glimpses = api.call(
        "POST", f"/v2/models/{GLIMPSE_MODEL}/classify", {"glimpses": glimpses.tolist()}
    )
    assert by_image == by_glimpses

    def requests():
        for i, g in enumerate(glimpses):
            yield pb.GlimpseRequest(model=GLIMPSE_MODEL if i == 0 else "", pixels=g.tolist())

    answers = list(server.stub.ClassifyGlimpses(requests()))
    assert [s["probabilities"] for s in by_image["steps"]] == [
        list(a.probabilities) for a in answers
    ]
    assert by_image["predicted_class"] == answers[-1].predicted_class
    events = api.events(
        f"/v2/models/{GLIMPSE_MODEL}/classify_stream", {"glimpses": glimpses[:3].tolist()}
    )
    assert [e["step"] for e in events] == [1, 2, 3]
    assert [e["probabilities"] for e in events] == [
        s["probabilities"] for s in by_image["steps"][:3]
    ]


def test_sessions_create_get_snapshot_restore_fork_close(api):
    status, s = api.call("POST", f"/v2/models/{CHAR_MODEL}/sessions")
    assert status == 200 and s["model"] == CHAR_MODEL and s["position"] == 0 and not s["in_use"]
    sid = s["session_id"]
    status, r = api.call(
        "POST", f"/v2/models/{CHAR_MODEL}/score", {"text": "the cat", "session_id": sid}
    )
    assert r["position"] == 7
    assert api.call("GET", f"/v2/sessions/{sid}")[1]["position"] == 7
    status, snap = api.call("POST", f"/v2/sessions/{sid}/snapshot")
    assert status == 200 and snap["position"] == 7 and snap["model"] == CHAR_MODEL
    assert base64.b64decode(snap["data"])[:8] == b"NLSTMSS\0"
    status, restored = api.call("POST", "/v2/sessions/restore", {"data": snap["data"]})
    status, forked = api.call("POST", f"/v2/sessions/{sid}/fork")
    ids = [sid, restored["session_id"], forked["session_id"]]
    assert len(set(ids)) == 3 and restored["position"] == forked["position"] == 7
    texts = set()
    for x in ids:  # each continues exactly as the original would
        status, r = api.call(
            "POST",
            f"/v2/models/{CHAR_MODEL}/generate",
            {"text_input": " on", "parameters": {"max_tokens": 20, "seed": 3, "session_id": x}},
        )
        assert r["position"] == 7 + 3 + 20
        texts.add(r["text_output"])
    assert len(texts) == 1
    for x in ids:
        assert api.call("DELETE", f"/v2/sessions/{x}") == (200, {})
    status, body = api.call("GET", f"/v2/sessions/{sid}")
    assert status == 404 and "no session" in body["error"]


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "path, body, raw, status, words",
    [
        (
            f"/v2/models/{CHAR_MODEL}/generate",
            {"text_input": "a", "parameters": {"max_tokens": 0}},
            None,
            400,
            "max_tokens must be in [1, 500], got 0",
        ),
        (
            f"/v2/models/{CHAR_MODEL}/generate",
            {"text_input": "a", "parameters": {"max_tokens": "x"}},
            None,
            400,
            "max_tokens",
        ),
        (
            f"/v2/models/{CHAR_MODEL}/generate",
            {"text_input": "a", "parameters": {"temprature": 1}},
            None,
            400,
            "unknown field(s) 'temprature'; allowed: logprobs, max_tokens",
        ),
        (
            f"/v2/models/{CHAR_MODEL}/generate",
            {"text_input": "a", "parameters": {"stop": "x"}},
            None,
            400,
            "parameters.stop must be a list",
        ),
        (
            f"/v2/models/{CHAR_MODEL}/generate",
            {"text_input": "a", "parameters": {"top_p": 2}},
            None,
            400,
            "top_p",
        ),
        (f"/v2/models/{CHAR_MODEL}/generate", None, b"{not json", 400, "not valid JSON"),
        (
            f"/v2/models/{CHAR_MODEL}/generate",
            None,
            b"[1, 2]",
            400,
            "must be a JSON object, got list",
        ),
        (f"/v2/models/{CHAR_MODEL}/score", {"text": ""}, None, 400, "text must not be empty"),
        (f"/v2/models/{CHAR_MODEL}/score", {"text": "a" * 2001}, None, 429, "at most 2000"),
        (
            f"/v2/models/{GLIMPSE_MODEL}/classify",
            {"glimpses": [[0.5] * 48]},
            None,
            400,
            "got 48 values",
        ),
        (
            f"/v2/models/{GLIMPSE_MODEL}/classify",
            {"image": [[2.0] * 28] * 28},
            None,
            400,
            "scaled to [0, 1]",
        ),
        (
            f"/v2/models/{GLIMPSE_MODEL}/classify",
            {"image": [[0.0] * 28] * 27},
            None,
            400,
            "shape (28, 28)",
        ),
        (f"/v2/models/{GLIMPSE_MODEL}/classify", {}, None, 400, 'either "glimpses"'),
        (
            f"/v2/models/{CHAR_MODEL}/classify",
            {"glimpses": [[0.5] * 49]},
            None,
            412,
            "runs on glimpse classifiers",
        ),
        ("/v2/models/nope/score", {"text": "a"}, None, 404, "nope"),
        ("/v2/sessions/restore", {"data": "%%%"}, None, 400, "not valid base64"),
        (
            "/v2/sessions/restore",
            {"data": base64.b64encode(b"junk").decode()},
            None,
            400,
            "snapshot",
        ),
        ("/v2/sessions/nosuchsession/fork", {}, None, 404, "no session 'nosuchsession'"),
        ("/v2/nothing", {}, None, 404, "no route POST /v2/nothing"),
        ("/v2", {}, None, 405, "POST is not allowed on /v2"),
    ],
)
def test_errors_say_what_was_wrong(api, path, body, raw, status, words):
    got, r = api.call("POST", path, body, raw)
    assert got == status and words in r["error"], r


def test_body_over_the_receive_limit_is_413(api, server):
    # the receive limit: 4 bytes a character of max_text and the stop strings, and 16 KiB
    status, r = api.call("POST", f"/v2/models/{CHAR_MODEL}/score", {"text": "a" * 100_000})
    assert status == 413 and "larger than this server's limit" in r["error"]


def test_busy_session_is_409_and_a_client_that_goes_away_cancels_its_call(models_dir):
    s = ServerThread(
        models_dir,
        Limits(max_chars=200_000, stream_interval=0.0, max_messages_per_s=0.0),
        http_port=0,
    )
    try:
        api = Http(s.running.http_port)
        sid = api.call("POST", f"/v2/models/{CHAR_MODEL}/sessions")[1]["session_id"]
        c = api.conn()
        c.request(
            "POST",
            f"/v2/models/{CHAR_MODEL}/generate_stream",
            json.dumps(
                {"text_input": "the", "parameters": {"max_tokens": 200_000, "session_id": sid}}
            ),
            api.headers(),
        )
        r = c.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")
        status, body = api.call(
            "POST", f"/v2/models/{CHAR_MODEL}/score", {"text": "a", "session_id": sid}
        )
        assert status == 409 and "in use by another call" in body["error"]
        c.close()  # goes away: the server stops generating and releases the session
        deadline = time.monotonic() + 20
        while (info := api.call("GET", f"/v2/sessions/{sid}")[1])["in_use"]:
            assert time.monotonic() < deadline, "the call went on after its client left"
            time.sleep(0.05)
        assert 3 < info["position"] < 3 + 200_000
        assert s.running.metrics.requests.labels("Generate", "CANCELLED")._value.get() == 1
    finally:
        s.close()


def test_snapshot_of_a_model_this_server_lacks_is_412(models_dir, api, tmp_path):
    sid = api.call("POST", f"/v2/models/{CHAR_MODEL}/sessions")[1]["session_id"]
    data = api.call("POST", f"/v2/sessions/{sid}/snapshot")[1]["data"]
    (tmp_path / GLIMPSE_MODEL).symlink_to(models_dir / GLIMPSE_MODEL, target_is_directory=True)
    other = ServerThread(tmp_path, Limits(), http_port=0)
    try:
        status, r = Http(other.running.http_port).call(
            "POST", "/v2/sessions/restore", {"data": data}
        )
        assert status == 412 and CHAR_MODEL in r["error"]
    finally:
        other.close()


def test_http_calls_count_in_the_call_metrics(server, api):
    requests = server.running.metrics.requests
    before = (
        requests.labels("Score", "OK")._value.get(),
        requests.labels("Score", "INVALID_ARGUMENT")._value.get(),
    )
    api.call("POST", f"/v2/models/{CHAR_MODEL}/score", {"text": "the"})
    api.call("POST", f"/v2/models/{CHAR_MODEL}/score", {"text": ""})
    after = (
        requests.labels("Score", "OK")._value.get(),
        requests.labels("Score", "INVALID_ARGUMENT")._value.get(),
    )
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)


# ------------------------------------------------------------------------------ keys, quotas
def test_api_keys_and_session_ownership(models_dir):
    s = ServerThread(
        models_dir, Limits(max_sessions_per_client=2), api_keys=ApiKeys([KEY_A, KEY_B]), http_port=0
    )
    try:
        port = s.running.http_port
        anonymous, a, b = Http(port), Http(port, KEY_A), Http(port, KEY_B)
        status, r = anonymous.call("POST", f"/v2/models/{CHAR_MODEL}/score", {"text": "the"})
        assert (
            status == 401
            and r["error"]
            == "this server needs an API key: send the header 'authorization: Bearer KEY'"
        )
        status, r = Http(port, "x" * 24).call("GET", "/v2/models")
        assert status == 401 and "not valid" in r["error"]
        assert anonymous.call("GET", "/v2/health/ready")[0] == 200  # health needs no key
        c = anonymous.conn()
        c.request("GET", "/")
        assert c.getresponse().status == 200  # nor does the page (its calls do)
        assert a.call("GET", "/v2/models")[0] == 200
        sid = a.call("POST", f"/v2/models/{CHAR_MODEL}/sessions")[1]["session_id"]
        assert a.call("GET", f"/v2/sessions/{sid}")[0] == 200
        status, r = b.call("GET", f"/v2/sessions/{sid}")
        assert status == 404  # another key's session is answered as an unknown id
        assert b.call("POST", f"/v2/sessions/{sid}/fork")[0] == 404
        # the per-client session bound counts a key's sessions over both protocols
        from serving.auth import bearer

        s.stub.CreateSession(pb.CreateSessionRequest(model=CHAR_MODEL), metadata=bearer(KEY_A))
        status, r = a.call("POST", f"/v2/models/{CHAR_MODEL}/sessions")
        assert status == 429 and "per-client session limit is 2" in r["error"]
        assert b.call("POST", f"/v2/models/{CHAR_MODEL}/sessions")[0] == 200
    finally:
        s.close()


def test_rate_limit_is_one_bucket_across_grpc_and_http(models_dir):
    s = ServerThread(
        models_dir, Limits(), server_limits=ServerLimits(max_client_requests_per_s=0.5), http_port=0
    )
    try:
        api = Http(s.running.http_port, host="127.0.0.1")
        with grpc.insecure_channel(f"127.0.0.1:{s.running.port}") as channel:
            from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc

            pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest())  # the burst is 1 call
        status, r = api.call("GET", "/v2/models")
        assert (
            status == 429
            and "more than 0.5 calls per second" in r["error"]
            and "retry in" in r["error"]
        )
    finally:
        s.close()


# ------------------------------------------------------------------------------ drain
def test_ready_turns_503_during_a_drain_and_new_calls_are_refused(models_dir):
    s = ServerThread(
        models_dir,
        Limits(max_chars=100_000, stream_interval=0.0, max_messages_per_s=0.0),
        http_port=0,
    )
    api = Http(s.running.http_port)
    c = api.conn()
    c.request(
        "POST",
        f"/v2/models/{CHAR_MODEL}/generate_stream",
        json.dumps({"text_input": "the", "parameters": {"max_tokens": 100_000}}),
        api.headers(),
    )
    r = c.getresponse()
    assert r.readline().startswith(b"data: ")
    draining = asyncio.run_coroutine_threadsafe(shutdown(s.running, 3.0), s.loop)
    deadline = time.monotonic() + 10
    while api.call("GET", "/v2/health/ready")[0] != 503:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert api.call("GET", "/v2/health/ready") == (503, {"ready": False})
    status, body = api.call("POST", f"/v2/models/{CHAR_MODEL}/score", {"text": "the"})
    assert status == 503 and "shutting down" in body["error"]
    # the stream in flight ends, before the grace period is over, with a cancelled finish
    events = parse_events("data: " + r.read().decode())
    assert events[-1]["finish_reason"] == "cancelled"
    draining.result(30)
    c.close()
    s.loop.call_soon_threadsafe(s.loop.stop)
    s.thread.join(10)


# ------------------------------------------------------------------------------ the command
def test_serve_http_port_environment_in_a_real_process(models_dir):
    from training.cli import build_parser

    assert build_parser().parse_args(["serve"]).http_port is None  # off unless set
    env = dict(os.environ, PYTHONUNBUFFERED="1", NLSTM_HTTP_PORT="0")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "training.cli",
            "serve",
            "--models",
            str(models_dir),
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--host",
            "localhost",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        port, lines, deadline = None, [], time.time() + 60
        while port is None and time.time() < deadline:
            lines.append(proc.stderr.readline())
            if m := re.search(
                r"HTTP/JSON and the playground on http://localhost:(\d+)/", lines[-1]
            ):
                port = int(m.group(1))
        assert port, "".join(lines)
        api = Http(port)
        assert api.call("GET", "/v2/health/ready") == (200, {"ready": True})
        assert (
            api.call(
                "POST",
                f"/v2/models/{CHAR_MODEL}/generate",
                {"text_input": "the", "parameters": {"max_tokens": 5}},
            )[1]["position"]
            == 8
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_concurrent_call_limit(models_dir):
    s = ServerThread(
        models_dir,
        Limits(max_chars=100_000, stream_interval=0.0, max_messages_per_s=0.0),
        server_limits=ServerLimits(max_concurrent_calls=1),
        http_port=0,
    )
    try:
        api = Http(s.running.http_port)
        c = api.conn()
        c.request(
            "POST",
            f"/v2/models/{CHAR_MODEL}/generate_stream",
            json.dumps({"text_input": "the", "parameters": {"max_tokens": 100_000}}),
            api.headers(),
        )
        r = c.getresponse()
        assert r.readline().startswith(b"data: ")
        status, body = api.call("POST", f"/v2/models/{CHAR_MODEL}/score", {"text": "the"})
        assert status == 429 and "maximum of 1 calls" in body["error"]
        c.close()
    finally:
        s.close()


def test_https_with_the_grpc_certificate(models_dir, tmp_path):
    pytest.importorskip("cryptography")
    import ssl

    from certs import make_certs

    from serving.auth import server_credentials
    from serving.http import ssl_context
    from training.cli import _http_ssl, build_parser

    certs = make_certs(tmp_path)
    args = build_parser().parse_args(
        [
            "serve",
            "--http-port",
            "0",
            "--tls-cert",
            str(certs.server_cert),
            "--tls-key",
            str(certs.server_key),
        ]
    )
    assert isinstance(
        _http_ssl(args), ssl.SSLContext
    )  # the flags give the HTTP port the same certificate
    s = ServerThread(
        models_dir,
        Limits(),
        tls=server_credentials(certs.server_cert, certs.server_key),
        http_port=0,
        http_ssl=ssl_context(certs.server_cert, certs.server_key),
    )
    try:
        trust = ssl.create_default_context(cafile=str(certs.ca))
        c = http.client.HTTPSConnection("localhost", s.running.http_port, context=trust, timeout=30)
        c.request("POST", f"/v2/models/{CHAR_MODEL}/score", json.dumps({"text": "the"}))
        r = c.getresponse()
        assert r.status == 200 and json.loads(r.read())["num_chars"] == 3
        c.close()
        plain = http.client.HTTPConnection("localhost", s.running.http_port, timeout=10)
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            plain.request("GET", "/v2/health/ready")
            plain.getresponse()
    finally:
        s.close()
