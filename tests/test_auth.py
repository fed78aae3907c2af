"""TLS, mutual TLS, API keys, session ownership and per-client quotas (issue 15, items 7 and 8),
against an in-process server with certificates the tests make (tests/certs.py), and the CLI
clients' --tls-ca / --api-key / NLSTM_API_KEY."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import grpc
import pytest
from certs import make_certs
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc
from serving.auth import ApiKeys, channel_credentials, peer_host, server_credentials
from serving.engine import Limits
from serving.limits import ServerLimits
from serving.testing.inprocess import ServerThread, wait_for

pytest.importorskip("cryptography")

KEY_A, KEY_B = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
GLIMPSE = [0.5] * 49


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"# the test's keys\n{KEY_A}\n\n  {KEY_B}  \n")
    return path


@pytest.fixture(scope="module")
def secured(models_dir, certs, keys_file):
    """TLS and API keys, 3 sessions per client."""
    s = ServerThread(
        models_dir,
        Limits(max_sessions_per_client=3, stream_interval=0.0, max_messages_per_s=0.0),
        api_keys=ApiKeys.from_file(keys_file),
        tls=server_credentials(certs.server_cert, certs.server_key),
    )
    yield s
    s.close()


def tls_channel(target, certs, **kw):
    return grpc.secure_channel(target, channel_credentials(certs.ca, **kw))


def bearer(key):
    return [("authorization", f"Bearer {key}")]


def code_of(call):
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (pb.ScoreResponse, pb.Session)):
            list(result)
    return info.value.code(), info.value.details()


# ------------------------------------------------------------------------------------ TLS
def test_tls_serves_clients_that_trust_its_ca_only(secured, certs):
    with tls_channel(secured.target, certs) as channel:
        stub = pb_grpc.InferenceStub(channel)
        assert len(stub.ListModels(pb.ListModelsRequest(), metadata=bearer(KEY_A)).models) == 2
    # a plaintext client, or one trusting another CA, cannot talk to it
    with grpc.insecure_channel(secured.target) as channel:
        code, _ = code_of(
            lambda: pb_grpc.InferenceStub(channel).ListModels(
                pb.ListModelsRequest(), metadata=bearer(KEY_A), timeout=5
            )
        )
        assert code == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(secured.target, channel_credentials(certs.other_ca)) as channel:
        code, _ = code_of(
            lambda: pb_grpc.InferenceStub(channel).ListModels(
                pb.ListModelsRequest(), metadata=bearer(KEY_A), timeout=5
            )
        )
        assert code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate(models_dir, certs):
    s = ServerThread(
        models_dir,
        Limits(),
        tls=server_credentials(certs.server_cert, certs.server_key, client_ca_file=certs.ca),
    )
    try:
        with tls_channel(s.target, certs) as channel:  # no client certificate
            code, _ = code_of(
                lambda: pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
            )
            assert code == grpc.StatusCode.UNAVAILABLE
        with tls_channel(
            s.target, certs, cert_file=certs.client_cert, key_file=certs.client_key
        ) as channel:
            assert (
                len(pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest()).models) == 2
            )
    finally:
        s.close()


def test_credentials_files_are_checked(certs, tmp_path):
    not_pem = tmp_path / "x.pem"
    not_pem.write_text("hello")
    with pytest.raises(ValueError, match="is not in PEM format"):
        server_credentials(not_pem, certs.server_key)
    with pytest.raises(ValueError, match="needs its key"):
        channel_credentials(certs.ca, cert_file=certs.client_cert)
    with pytest.raises(FileNotFoundError):
        server_credentials(tmp_path / "missing.pem", certs.server_key)


# ------------------------------------------------------------------------------- API keys
def test_calls_without_a_valid_key_are_unauthenticated_and_health_stays_open(secured, certs):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with tls_channel(secured.target, certs) as channel:
        stub = pb_grpc.InferenceStub(channel)
        calls = {
            "ListModels": lambda md: stub.ListModels(pb.ListModelsRequest(), metadata=md),
            "CreateSession": lambda md: stub.CreateSession(
                pb.CreateSessionRequest(model="tiny-char"), metadata=md
            ),
            "Generate": lambda md: stub.Generate(
                pb.GenerateRequest(model="tiny-char", max_chars=3), metadata=md
            ),
            "Score": lambda md: stub.Score(
                pb.ScoreRequest(model="tiny-char", text="abc"), metadata=md
            ),
            "ClassifyGlimpses": lambda md: stub.ClassifyGlimpses(
                iter([pb.GlimpseRequest(model="tiny-mnist", pixels=GLIMPSE)]), metadata=md
            ),
        }
        for method, call in calls.items():
            for md, why in (
                ([], "needs an API key"),
                (bearer("x" * 20), "not valid"),
                ([("authorization", f"Basic {KEY_A}")], "not valid"),
            ):
                code, details = code_of(lambda call=call, md=md: call(md))
                assert code == grpc.StatusCode.UNAUTHENTICATED and why in details, (method, details)
                assert KEY_A not in details
            # counted like any other ending (just after the client has its answer)
            assert wait_for(
                lambda method=method: (
                    secured.metric(
                        "nlstm_requests_total", {"method": method, "code": "UNAUTHENTICATED"}
                    )
                    == 3
                )
            ), method
        # a request that the server would refuse as too large is refused as unauthenticated:
        # it is never read
        code, _ = code_of(
            lambda: stub.Score(pb.ScoreRequest(model="tiny-char", text="a" * 1_000_000))
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED
        # reflection needs a key too; health checks do not
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        code, _ = code_of(lambda: refl.ServerReflectionInfo(iter([request])))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert next(
            refl.ServerReflectionInfo(iter([request]), metadata=bearer(KEY_B))
        ).list_services_response
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest()).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        # the right key, any case of "Bearer", serves every rpc
        assert (
            stub.Score(
                pb.ScoreRequest(model="tiny-char", text="abc"),
                metadata=[("authorization", f"bearer {KEY_A}")],
            ).num_chars
            == 3
        )


def test_sessions_belong_to_the_key_that_created_them(secured, certs):
    with tls_channel(secured.target, certs) as channel:
        stub = pb_grpc.InferenceStub(channel)
        sid = stub.CreateSession(
            pb.CreateSessionRequest(model="tiny-char"), metadata=bearer(KEY_A)
        ).session_id
        glimpse_sid = stub.CreateSession(
            pb.CreateSessionRequest(model="tiny-mnist"), metadata=bearer(KEY_A)
        ).session_id
        unknown = secrets.token_urlsafe(16)
        for other in (sid, glimpse_sid):
            attempts = [
                lambda s: stub.Score(
                    pb.ScoreRequest(session_id=s, text="abc"), metadata=bearer(KEY_B)
                ),
                lambda s: stub.Generate(
                    pb.GenerateRequest(session_id=s, max_chars=2), metadata=bearer(KEY_B)
                ),
                lambda s: stub.ClassifyGlimpses(
                    iter([pb.GlimpseRequest(session_id=s, pixels=GLIMPSE)]), metadata=bearer(KEY_B)
                ),
                lambda s: stub.CloseSession(
                    pb.CloseSessionRequest(session_id=s), metadata=bearer(KEY_B)
                ),
            ]
            for attempt in attempts:
                code, details = code_of(lambda attempt=attempt, other=other: attempt(other))
                _, details_unknown = code_of(lambda attempt=attempt: attempt(unknown))
                # NOT_FOUND, worded as for an id that does not exist: existence is not revealed
                assert code == grpc.StatusCode.NOT_FOUND
                assert details.replace(other, "ID") == details_unknown.replace(unknown, "ID")
        # the owner's calls still work: the other key's attempts changed nothing
        assert (
            stub.Score(
                pb.ScoreRequest(session_id=sid, text="abc"), metadata=bearer(KEY_A)
            ).num_chars
            == 3
        )
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=bearer(KEY_A))
        stub.CloseSession(pb.CloseSessionRequest(session_id=glimpse_sid), metadata=bearer(KEY_A))


def test_api_keys_file_is_checked(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="holds no keys"):
        ApiKeys.from_file(path)
    secret = "short-key"
    path.write_text(f"{KEY_A}\n{secret}\n")
    with pytest.raises(ValueError, match="line 2: a key is 16 to 256 visible ASCII") as info:
        ApiKeys.from_file(path)
    assert secret not in str(info.value)  # the message never quotes a key
    path.write_text(f"{KEY_A} {KEY_B}\n")
    with pytest.raises(ValueError, match="line 1"):
        ApiKeys.from_file(path)
    keys = ApiKeys.from_file(_write(tmp_path / "ok", f"{KEY_A}\n{KEY_B}\n"))
    assert len(keys) == 2
    client, _ = keys.client_of([("authorization", f"Bearer {KEY_A}")])
    assert client.startswith("key:") and KEY_A not in client
    assert keys.client_of([("authorization", f"Bearer {KEY_B}")])[0] != client


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_peer_host_drops_the_port():
    assert peer_host("ipv4:127.0.0.1:5000") == "ipv4:127.0.0.1"
    assert peer_host("ipv6:[::1]:5000") == "ipv6:[::1]" == peer_host("ipv6:%5B::1%5D:5000")
    assert peer_host("unix:/tmp/socket") == "unix:/tmp/socket"


# ------------------------------------------------------------------------ per-client quotas
def test_sessions_per_client_by_key(secured, certs):
    with tls_channel(secured.target, certs) as channel:
        stub = pb_grpc.InferenceStub(channel)

        def create(key):
            return stub.CreateSession(
                pb.CreateSessionRequest(model="tiny-char"), metadata=bearer(key)
            ).session_id

        mine = [create(KEY_A) for _ in range(3)]
        code, details = code_of(lambda: create(KEY_A))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "this client holds 3 sessions: the server's per-client session limit is 3" in details
        theirs = create(KEY_B)  # another key is another client
        stub.CloseSession(pb.CloseSessionRequest(session_id=mine.pop()), metadata=bearer(KEY_A))
        mine.append(create(KEY_A))  # closing one makes room
        for sid in mine:
            stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=bearer(KEY_A))
        stub.CloseSession(pb.CloseSessionRequest(session_id=theirs), metadata=bearer(KEY_B))
        assert (
            secured.running.engine.store.held_by("key:x") == 0
            and len(secured.running.engine.store) == 0
        )


def test_sessions_per_client_by_address_without_keys_and_expiry_frees_them(models_dir):
    s = ServerThread(models_dir, Limits(max_sessions_per_client=2, idle_timeout=0.3))
    try:

        def create():
            return s.stub.CreateSession(pb.CreateSessionRequest(model="tiny-char")).session_id

        create(), create()
        code, details = code_of(create)
        assert (
            code == grpc.StatusCode.RESOURCE_EXHAUSTED
            and "per-client session limit is 2" in details
        )
        time.sleep(0.5)
        create(), create()  # the expired ones no longer count
        # the client is the peer's address, without the port (each call may use a new connection)
        (client,) = s.running.engine.store._per_client
        assert (
            client in ("peer:ipv4:127.0.0.1", "peer:ipv6:[::1]")
            and s.running.engine.store.held_by(client) == 2
        )
    finally:
        s.close()


def test_per_client_rate_limit(models_dir, certs, keys_file):
    s = ServerThread(
        models_dir,
        Limits(),
        api_keys=ApiKeys.from_file(keys_file),
        server_limits=ServerLimits(max_client_requests_per_s=2.0),
    )
    try:
        stub = s.stub

        def models(key):
            return stub.ListModels(pb.ListModelsRequest(), metadata=bearer(key))

        for _ in range(4):  # a burst of twice the rate
            models(KEY_A)
        code, details = code_of(lambda: models(KEY_A))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than 2 calls per second, the server's per-client rate limit" in details
        assert wait_for(
            lambda: (
                s.metric(
                    "nlstm_requests_total", {"method": "ListModels", "code": "RESOURCE_EXHAUSTED"}
                )
                == 1
            )
        )
        models(KEY_B)  # another client has its own budget
        health = health_pb2_grpc.HealthStub(s.channel)
        for _ in range(10):  # health checks are not limited
            health.Check(health_pb2.HealthCheckRequest())
    finally:
        s.close()


# ------------------------------------------------------------------------------ CLI clients
def test_cli_clients_take_tls_ca_and_api_key(secured, certs, capsys, monkeypatch):
    from training.cli import main

    target = ["--target", secured.target, "--tls-ca", str(certs.ca)]
    args = ["generate", *target, "--model", "tiny-char", "--max-chars", "7", "--seed", "1"]
    assert main([*args, "--api-key", KEY_A]) == 0
    assert len(capsys.readouterr().out) == 8
    assert main(args) == 2
    assert "UNAUTHENTICATED: this server needs an API key" in capsys.readouterr().err
    monkeypatch.setenv("NLSTM_API_KEY", KEY_B)
    assert main(args) == 0
    capsys.readouterr()
    text_file = Path(certs.ca).parent / "t.txt"
    text_file.write_text("the cat")
    assert main(["score", str(text_file), *target, "--model", "tiny-char"]) == 0
    assert capsys.readouterr().out.startswith("7 characters")
    # without --tls-ca the client speaks plaintext and gets no answer
    assert (
        main(
            [
                "score",
                str(text_file),
                "--target",
                secured.target,
                "--model",
                "tiny-char",
                "--timeout",
                "2",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "no nlstm server answers" in err or "UNAVAILABLE" in err, err
    assert (
        main(
            [
                "score",
                str(text_file),
                "--target",
                secured.target,
                "--tls-client-cert",
                str(certs.client_cert),
                "--model",
                "tiny-char",
            ]
        )
        == 2
    )
    assert "need --tls-ca" in capsys.readouterr().err


def test_healthcheck_speaks_tls_without_a_key(secured, certs, models_dir, capsys, monkeypatch):
    from serving.healthcheck import main

    assert main(["--target", secured.target, "--tls-ca", str(certs.ca)]) == 0
    assert "SERVING" in capsys.readouterr().out
    assert main(["--target", secured.target, "--timeout", "2"]) == 1  # plaintext to a TLS server
    monkeypatch.setenv("NLSTM_TLS_CA", str(certs.ca))
    assert main(["--target", secured.target, "--service", "nlstm.v1.Inference"]) == 0
    # mutual TLS: the client certificate from the environment
    s = ServerThread(
        models_dir,
        Limits(),
        tls=server_credentials(certs.server_cert, certs.server_key, client_ca_file=certs.ca),
    )
    try:
        assert main(["--target", s.target, "--timeout", "2"]) == 1
        monkeypatch.setenv("NLSTM_TLS_CLIENT_CERT", str(certs.client_cert))
        monkeypatch.setenv("NLSTM_TLS_CLIENT_KEY", str(certs.client_key))
        assert main(["--target", s.target]) == 0
    finally:
        s.close()
