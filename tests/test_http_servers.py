"""HTTP/JSON fronts started with settings of their own, on real servers on port 0: API keys and
session ownership (401), the per-client rate shared with gRPC (429), readiness through a drain
(503), `nlstm serve --http-port` / NLSTM_HTTP_PORT in a real process, the concurrent call
limit, and HTTPS with the gRPC certificate."""

from __future__ import annotations

import asyncio
import http.client
import json
import secrets
import signal
import time

import grpc
import pytest
from http_calls import Http, parse_events
from serve_process import port_in_log, start_serve

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.auth import ApiKeys
from serving.engine import Limits
from serving.limits import ServerLimits
from serving.server import shutdown
from serving.testing.inprocess import ServerThread
from training.testing.models import CHAR_MODEL

KEY_A, KEY_B = secrets.token_urlsafe(24), secrets.token_urlsafe(24)


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
    c, r = api.open_stream(
        f"/v2/models/{CHAR_MODEL}/generate_stream",
        {"text_input": "the", "parameters": {"max_tokens": 100_000}},
    )
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
    proc = start_serve(models_dir, "--metrics-port", "-1", NLSTM_HTTP_PORT="0")
    try:
        port = port_in_log(proc, r"HTTP/JSON and the playground on http://localhost:(\d+)/")
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
        c, _response = api.open_stream(  # the one call allowed, kept open
            f"/v2/models/{CHAR_MODEL}/generate_stream",
            {"text_input": "the", "parameters": {"max_tokens": 100_000}},
        )
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
    from serving.cli import http_ssl
    from serving.http import ssl_context
    from training.cli import build_parser

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
        http_ssl(args), ssl.SSLContext
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
