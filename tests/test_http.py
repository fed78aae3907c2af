"""The HTTP/JSON front (serving/http.py) against a real server on port 0: every route, the same
answers as gRPC for the same request, server-sent events, errors with their HTTP statuses
(400, 404, 409, 412, 413, 429), a client that goes away, and the call metrics. Fronts with settings
of their own (API keys, rates, drain, `nlstm serve --http-port`, HTTPS) are
tests/test_http_servers.py."""

from __future__ import annotations

import base64
import time

import numpy as np
import pytest
from http_calls import Http

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.engine import Limits
from serving.formats import image_to_glimpses
from serving.testing.inprocess import ServerThread
from training.testing.models import CHAR_MODEL, GLIMPSE_MODEL


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
        c, _response = api.open_stream(  # kept open while the session is in use
            f"/v2/models/{CHAR_MODEL}/generate_stream",
            {"text_input": "the", "parameters": {"max_tokens": 200_000, "session_id": sid}},
        )
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
