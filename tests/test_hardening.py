"""Issue 15's attacks, each against a real in-process server (or `nlstm serve` in a subprocess):
every request bounded before work is committed, the receive limit and the bytes in flight, the
metrics endpoint, range-checked settings, honest gauges and counters for glimpse streams."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_calls import code_of
from serve_process import start_serve

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.engine import Limits
from serving.limits import (
    InflightBytes,
    OverBudget,
    RateLimiter,
    ServerLimits,
    request_bytes_needed,
)
from serving.settings import SERVE_FLAGS, SERVE_RANGES, check_serve_settings
from serving.testing.inprocess import ServerThread, wait_for

GLIMPSE = [0.5] * 49


# ------------------------------------------------------------------------ 4. settings in range
def _bad_values(rng):
    bad = [rng.low - 1, rng.high + 1, float("inf"), float("-inf"), float("nan")]
    if rng.integer:
        bad.append(rng.low + 0.5)
    if rng.low_open:
        bad.append(rng.low)
    return bad


@pytest.mark.parametrize("name", sorted(SERVE_RANGES))
def test_every_numeric_setting_is_range_checked(name):
    rng = SERVE_RANGES[name]
    flag = "--" + name.replace("_", "-")
    for good in (rng.low if not rng.low_open else rng.high, rng.high):
        check_serve_settings({name: int(good) if rng.integer else float(good)})
    for bad in _bad_values(rng):
        with pytest.raises(ValueError) as info:
            check_serve_settings({name: bad})
        message = str(info.value)
        # names the flag, the range and the value
        assert message == f"{flag} must be {rng.describe()}, got {bad!r}"


def test_cli_defaults_are_in_range_and_a_bad_flag_stops_the_start(models_dir, capsys, monkeypatch):
    from training.cli import build_parser, main

    args = build_parser().parse_args(["serve"])
    check_serve_settings(vars(args))
    for flag in ("--" + n.replace("_", "-") for n in SERVE_RANGES):
        assert hasattr(args, flag[2:].replace("-", "_")), f"{flag} has a range but is not a flag"
    # the cases: each refused before anything is loaded or bound
    for argv in (
        ["--idle-timeout", "5e9"],
        ["--idle-timeout", "nan"],
        ["--idle-timeout", "inf"],
        ["--idle-timeout", "0.5"],
        ["--max-wait-ms", "inf"],
        ["--max-chars", "0"],
        ["--port", "70000"],
        ["--max-stop-chars", "100000"],
    ):
        assert main(["serve", "--models", str(models_dir), *argv]) == 2
        err = capsys.readouterr().err
        flag, text = argv
        value = float(text) if "." in text or "e" in text or text in ("nan", "inf") else int(text)
        assert f"{flag} must be a " in err and f"got {value!r}" in err, err
    assert main(["serve", "--models", str(models_dir), "--idle-timeout", "0.5"]) == 2
    assert (
        "--idle-timeout must be a finite number in [1, 31536000] seconds, got 0.5"
        in capsys.readouterr().err
    )
    monkeypatch.setenv("NLSTM_MAX_WAIT_MS", "inf")  # the environment variables go the same way
    assert main(["serve", "--models", str(models_dir)]) == 2
    assert "--max-wait-ms must be a finite number in [0, 1000] ms" in capsys.readouterr().err


def test_the_receive_limit_must_hold_the_longest_request(models_dir):
    from serving.server import build_server, load_models

    models = load_models(models_dir, providers="cpu", intra_op_threads=1)
    limits = Limits(max_text=1000)
    needed = request_bytes_needed(1000, limits.max_stop, limits.max_stop_chars)
    with pytest.raises(ValueError, match=f"below the {needed} bytes"):
        asyncio.run(
            build_server(
                models, limits=limits, server_limits=ServerLimits(max_request_bytes=needed - 1)
            )
        )
    with pytest.raises(ValueError, match="max_inflight_bytes 1000 is below the receive limit"):
        asyncio.run(
            build_server(models, limits=limits, server_limits=ServerLimits(max_inflight_bytes=1000))
        )


# ---------------------------------------------------------------- 1. every request bounded
@pytest.fixture(scope="module")
def small(models_dir):
    # small limits so that tests reach them; 8 stop characters, 3 glimpses a stream
    s = ServerThread(
        models_dir,
        Limits(
            max_chars=50,
            max_text=1000,
            max_stop_chars=8,
            max_glimpses=3,
            max_wait=0.001,
            stream_interval=0.0,
            max_messages_per_s=0.0,
        ),
    )
    yield s
    s.close()


def test_stop_strings_are_bounded_in_length(small):
    code, details = code_of(
        small.stub.Generate, pb.GenerateRequest(model="tiny-char", max_chars=5, stop=["x" * 9])
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "9 characters" in details and "at most 8 per stop string" in details
    ok = list(
        small.stub.Generate(pb.GenerateRequest(model="tiny-char", max_chars=5, stop=["x" * 8]))
    )
    assert sum(len(r.text) for r in ok) == 5


def test_a_glimpse_stream_is_bounded_in_length(small):
    before = (
        small.metric(
            "nlstm_requests_total", {"method": "ClassifyGlimpses", "code": "RESOURCE_EXHAUSTED"}
        )
        or 0
    )
    sid = small.stub.CreateSession(pb.CreateSessionRequest(model="tiny-mnist")).session_id
    requests = [
        pb.GlimpseRequest(session_id=sid if i == 0 else "", pixels=GLIMPSE) for i in range(4)
    ]
    answers = []
    with pytest.raises(grpc.RpcError) as info:
        for r in small.stub.ClassifyGlimpses(iter(requests)):
            answers.append(r)
    assert [a.step for a in answers] == [1, 2, 3]
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "3 glimpses, the most one stream may send" in info.value.details()
    assert (
        small.metric(
            "nlstm_requests_total", {"method": "ClassifyGlimpses", "code": "RESOURCE_EXHAUSTED"}
        )
        == before + 1
    )
    # the session keeps the three glimpses and goes on in a new stream
    more = list(small.stub.ClassifyGlimpses(iter(requests[:1])))
    assert [a.step for a in more] == [1]


# ---------------------------------------- 2. the receive limit and the bytes of requests in flight
def test_a_compressed_request_cannot_unpack_past_the_receive_limit(small):
    # max_text 1000: the receive limit is 4 * (1000 + 4 * 8) + 16 KiB = 20,512 bytes
    limit = request_bytes_needed(1000, 4, 8)
    assert small.running.server is not None and limit == 20512
    # the longest text the server accepts fits, even at 4 bytes a character
    r = small.stub.Score(pb.ScoreRequest(model="tiny-char", text="\U0001f600" * 1000))
    assert r.num_chars == 1000 and r.unknown_chars == 1000
    # 100,000 characters compress to about 200 bytes on the wire and are refused unpacked
    code, details = code_of(
        small.stub.Score,
        pb.ScoreRequest(model="tiny-char", text="a" * 100_000),
        compression=grpc.Compression.Gzip,
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details


def test_inflight_bytes_budget():
    budget = InflightBytes(100)
    a = budget.hold(60)
    assert budget.used == 60 and isinstance(budget.hold(50), OverBudget)
    b = budget.hold(40)
    assert budget.used == 100
    over = budget.hold(1)
    assert (
        isinstance(over, OverBudget)
        and "holding 100 bytes" in over.message()
        and "limit is 100" in over.message()
    )
    del a  # a call lets go of its request: its bytes come back
    assert budget.used == 40
    del b
    assert budget.used == 0


def _raw_glimpse(model: str, padding: int) -> bytes:
    """A GlimpseRequest with `padding` bytes in an unknown field (parsed and kept, as protobuf
    keeps unknown fields): a message that holds that many bytes of the budget."""
    msg = pb.GlimpseRequest(model=model, pixels=GLIMPSE).SerializeToString()
    field = bytes([15 << 3 | 2])  # field 15, length-delimited
    n, varint = padding, b""
    while True:
        byte, n = n & 0x7F, n >> 7
        varint += bytes([byte | (0x80 if n else 0)])
        if not n:
            break
    return msg + field + varint + b"\0" * padding


def test_bytes_of_requests_in_flight_are_bounded(models_dir):
    limits = Limits(max_text=1000, max_stop_chars=8)
    need = request_bytes_needed(1000, 4, 8)  # 20,512: the smallest budget allowed
    s = ServerThread(
        models_dir, limits, server_limits=ServerLimits(max_inflight_bytes=need + 10_000)
    )
    try:
        stream = s.channel.stream_stream(
            "/nlstm.v1.Inference/ClassifyGlimpses",
            request_serializer=lambda b: b,
            response_deserializer=pb.GlimpseResponse.FromString,
        )
        go_on = [threading.Event(), threading.Event()]

        def messages(i):
            yield _raw_glimpse("tiny-mnist", 14_000)
            go_on[i].wait(30)  # the stream stays open: its first message holds its bytes

        calls = [stream(messages(i)) for i in range(2)]
        assert [next(c).step for c in calls] == [1, 1]
        text = "\U0001f600" * 1000  # 4,000 bytes: more than the 30,512 - 2 x 14,2xx left
        code, details = code_of(s.stub.Score, pb.ScoreRequest(model="tiny-char", text=text))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (
            "bytes of requests in flight" in details
            and f"limit is {need + 10_000} bytes" in details
        )
        assert (
            s.metric("nlstm_requests_total", {"method": "Score", "code": "RESOURCE_EXHAUSTED"}) == 1
        )
        for event, call in zip(go_on, calls, strict=True):
            event.set()
            assert list(call) == []
        assert s.stub.Score(pb.ScoreRequest(model="tiny-char", text=text)).num_chars == 1000
    finally:
        for event in go_on:
            event.set()
        s.close()


def test_calls_beyond_the_concurrent_call_limit_are_refused_unread(models_dir):
    s = ServerThread(
        models_dir,
        Limits(stream_interval=0.0, max_messages_per_s=0.0),
        server_limits=ServerLimits(max_concurrent_calls=2),
    )
    try:
        hold = threading.Event()

        def idle():
            yield pb.GlimpseRequest(model="tiny-mnist", pixels=GLIMPSE)
            hold.wait(30)

        calls = [s.stub.ClassifyGlimpses(idle()) for _ in range(2)]
        assert [next(c).step for c in calls] == [1, 1]
        code, details = code_of(s.stub.ListModels, pb.ListModelsRequest())
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "Concurrent RPC limit" in details
        hold.set()
        for c in calls:
            list(c)
        assert wait_for(lambda: _lists(s))
    finally:
        hold.set()
        s.close()


def _lists(s) -> bool:
    try:
        return len(s.stub.ListModels(pb.ListModelsRequest()).models) == 2
    except grpc.RpcError:
        return False


# ----------------------------------------------------------------------- 3. the metrics endpoint
def test_metrics_endpoint_binds_its_host_and_idle_connections_cost_no_thread(monkeypatch):
    from prometheus_client import CollectorRegistry, Counter

    from serving import metrics_http
    from serving.metrics_http import MetricsServer, listen_host

    assert (
        listen_host("[::]") is None
        and listen_host("[::1]") == "::1"
        and listen_host("localhost") == "localhost"
    )
    monkeypatch.setattr(metrics_http, "REQUEST_TIMEOUT", 0.5)
    registry = CollectorRegistry()
    Counter("nlstm_test", "a test counter", registry=registry).inc(3)

    async def main():
        server = MetricsServer(registry)
        await server.start("127.0.0.1", 0)
        addresses = {a for a, _ in server.addresses()}
        assert addresses == {"127.0.0.1"}  # where it was told, not 0.0.0.0
        port = server.port
        threads = threading.active_count()
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(100)]
        await asyncio.sleep(0.1)
        assert threading.active_count() <= threads + 1  # no thread per connection
        assert server.open == metrics_http.MAX_CONNECTIONS  # the others were closed at once
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await closed(reader)  # full: closed unanswered
        # the idle ones are dropped after REQUEST_TIMEOUT
        ends = await asyncio.gather(*(closed(r) for r, _ in idle))
        assert all(ends) and server.open == 0
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 200 OK") and b"nlstm_test_total 3.0" in answer
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /metrics HTTP/1.1\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 405")
        for _, w in idle:
            w.close()
        await server.close()

    asyncio.run(main())


async def closed(reader, timeout=3.0) -> bool:
    """Did the other end close the connection (an end of file, or a reset when it closed with
    our request unread)?"""
    try:
        return await asyncio.wait_for(reader.read(), timeout) == b""
    except ConnectionResetError:
        return True


# --------------------------------------------------- 5, 6. honest gauges and counts for glimpses
def test_active_sequences_fall_back_to_zero_after_glimpse_streams(small):
    for _ in range(5):
        answers = list(
            small.stub.ClassifyGlimpses(
                iter(
                    [
                        pb.GlimpseRequest(model="tiny-mnist" if i == 0 else "", pixels=GLIMPSE)
                        for i in range(2)
                    ]
                )
            )
        )
        assert len(answers) == 2
    # the stream's end wakes the scheduler, which drops it: nothing else runs on this model
    assert wait_for(
        lambda: small.metric("nlstm_active_sequences", {"model": "tiny-mnist"}) == 0, 2.0
    )


def test_cancelled_and_killed_glimpse_streams_count_as_cancelled(small, tmp_path):
    def count(code):
        return (
            small.metric("nlstm_requests_total", {"method": "ClassifyGlimpses", "code": code}) or 0
        )

    ok, cancelled = count("OK"), count("CANCELLED")
    hold = threading.Event()

    def two_then_wait():
        for i in range(2):
            yield pb.GlimpseRequest(model="tiny-mnist" if i == 0 else "", pixels=GLIMPSE)
        hold.wait(30)

    for _ in range(3):  # the client cancels
        call = small.stub.ClassifyGlimpses(two_then_wait())
        assert [next(call).step, next(call).step] == [1, 2]
        call.cancel()
    # a client process killed mid-stream
    script = tmp_path / "client.py"
    script.write_text(
        "import sys, threading, grpc\n"
        "from serving.api.nlstm.v1 import inference_pb2 as pb, inference_pb2_grpc as pb_grpc\n"
        "stub = pb_grpc.InferenceStub(grpc.insecure_channel(sys.argv[1]))\n"
        "def reqs():\n"
        "    yield pb.GlimpseRequest(model='tiny-mnist', pixels=[0.5] * 49)\n"
        "    threading.Event().wait()\n"
        "call = stub.ClassifyGlimpses(reqs())\n"
        "next(call)\n"
        "print('ready', flush=True)\n"
        "threading.Event().wait()\n"
    )
    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, str(script), small.target],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        try:
            assert proc.stdout.readline().strip() == "ready"
        finally:
            proc.kill()
            proc.wait()
    hold.set()
    assert wait_for(lambda: count("CANCELLED") == cancelled + 5, 15.0), (
        count("CANCELLED") - cancelled,
        count("OK") - ok,
    )
    assert count("OK") == ok
    assert wait_for(
        lambda: small.metric("nlstm_active_sequences", {"model": "tiny-mnist"}) == 0, 2.0
    )


# --------------------------------------------------------------------- 8. per-client rate, units
def test_rate_limiter_refills_and_forgets_idle_clients():
    now = [0.0]
    rate = RateLimiter(2.0, clock=lambda: now[0])  # bursts of 4
    assert [rate.allow("a") for _ in range(4)] == [0.0] * 4
    assert rate.allow("a") == pytest.approx(0.5)  # one token comes back in half a second
    assert rate.allow("b") == 0.0  # clients are counted apart
    now[0] += 0.5
    assert rate.allow("a") == 0.0 and rate.allow("a") > 0
    now[0] += 10  # long idle: full buckets are forgotten at the next sweep
    for i in range(RateLimiter.SWEEP_EVERY):
        rate.allow(f"c{i % 3}")
    assert "a" not in rate._buckets and "b" not in rate._buckets


def test_every_numeric_flag_of_serve_has_a_range():
    from training.cli import build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    numeric = {a.dest for a in serve._actions if a.type in (int, float)}
    # a new numeric flag needs its range in serving/settings.py, and every range its flag
    assert numeric == set(SERVE_RANGES)


def test_every_serve_flag_names_its_environment_variable():
    # the parser is built from SERVE_FLAGS, and NLSTM_<NAME> sets each default: the help says so
    for flag in SERVE_FLAGS:
        assert f"[NLSTM_{flag.env}]" in flag.help, flag.name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_binds_metrics_to_metrics_host(models_dir):
    """`nlstm serve --host localhost`: the metrics endpoint follows --host (127.0.0.1 and ::1),
    and --metrics-host 127.0.0.1 puts it there alone."""
    for extra, expect in (
        ([], {"127.0.0.1", "[::1]"}),
        (["--metrics-host", "127.0.0.1"], {"127.0.0.1"}),
    ):
        proc = start_serve(
            models_dir, "--metrics-port", "0", *extra, cwd=Path(__file__).resolve().parents[1]
        )
        try:
            hosts, deadline = set(), time.time() + 60
            while time.time() < deadline:
                line = proc.stderr.readline()
                if not line:
                    break
                if "metrics on http://" in line:
                    hosts.add(line.split("http://", 1)[1].rsplit(":", 1)[0])
                if "on port" in line:
                    break
            assert hosts <= expect and "127.0.0.1" in hosts, hosts
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def test_idle_and_half_open_grpc_connections_are_closed(models_dir, monkeypatch):
    from serving import server as server_module

    monkeypatch.setattr(server_module, "CONNECTION_IDLE_MS", 300)
    monkeypatch.setattr(server_module, "HANDSHAKE_TIMEOUT_MS", 500)
    s = ServerThread(models_dir, Limits())
    try:
        states = []
        s.channel.subscribe(states.append, try_to_connect=False)
        assert len(s.stub.ListModels(pb.ListModelsRequest()).models) == 2
        # the server closes the idle connection: the channel goes back to IDLE (and reconnects
        # on its next call)
        assert wait_for(lambda: states and states[-1] == grpc.ChannelConnectivity.IDLE, 5.0), states
        assert len(s.stub.ListModels(pb.ListModelsRequest()).models) == 2
        # a TCP connection that never speaks HTTP/2 is dropped after the handshake timeout
        raw = socket.create_connection(("localhost", s.running.port))
        raw.settimeout(5.0)
        t0 = time.monotonic()
        try:
            while raw.recv(1024):  # the server's SETTINGS frame, then the end
                pass
        except ConnectionError:
            pass
        assert time.monotonic() - t0 < 4.0  # no socket.timeout: the server closed it
        raw.close()
    finally:
        s.close()
