"""serving.client, the Python client library, against a real in-process server: Client and
AsyncClient give the raw gRPC answers as typed results, generate streams pieces, sessions are
objects (with-blocks close them, fork and snapshot/restore continue identically), errors are
ServerError with the status code, API keys and TLS."""

from __future__ import annotations

import asyncio
import secrets

import numpy as np
import pytest

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.auth import ApiKeys
from serving.client import (
    TLS,
    AsyncClient,
    Client,
    Glimpse,
    ModelInfo,
    ScoreResult,
    ServerError,
    Snapshot,
)
from serving.engine import Limits
from serving.testing.inprocess import ServerThread
from training.testing.models import CHAR_MODEL, GLIMPSE_MODEL

KEY = secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def server(models_dir):
    s = ServerThread(
        models_dir,
        Limits(
            max_chars=300,
            max_text=2000,
            max_sessions=16,
            stream_interval=0.0,
            max_messages_per_s=0.0,
        ),
    )
    yield s
    s.close()


@pytest.fixture
def client(server):
    with Client(server.target) as c:
        yield c


def raw_generate(server, **fields) -> tuple[list[str], int]:
    pieces, position = [], 0
    for r in server.stub.Generate(pb.GenerateRequest(**fields)):
        pieces.append(r.text)
        position = r.position
    return pieces, position


IMAGE = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)


def test_models_generate_score_classify(server, client):
    models = client.models()
    assert [m.name for m in models] == [CHAR_MODEL, GLIMPSE_MODEL] and isinstance(
        models[0], ModelInfo
    )
    assert models[0].vocab_size > 0 and models[1].num_classes == 10
    # 300 characters: a message each at stream_interval 0, unless the reader lags behind all of them
    gen = client.generate(CHAR_MODEL, "the ", max_chars=300, seed=4, temperature=0.8, logprobs=True)
    pieces = list(gen)
    raw, position = raw_generate(
        server, model=CHAR_MODEL, prompt="the ", max_chars=300, seed=4, temperature=0.8
    )
    # the pieces as they arrive (a message per character, or several when the reader lags)
    assert "".join(pieces) == "".join(raw) and len(pieces) > 1
    assert (gen.text, gen.position, gen.finish_reason, len(gen.bits)) == (
        "".join(raw),
        position,
        "length",
        300,
    )
    r = client.score(CHAR_MODEL, "the cat", per_char=True)
    raw_score = server.stub.Score(pb.ScoreRequest(model=CHAR_MODEL, text="the cat", per_char=True))
    assert (
        isinstance(r, ScoreResult)
        and r.bits_per_char == raw_score.bits_per_char
        and r.num_chars == 7
    )
    assert r.bits == list(raw_score.bits) and r.position == 7
    answers = client.classify(GLIMPSE_MODEL, IMAGE)
    assert len(answers) == 20 and isinstance(answers[0], Glimpse) and answers[-1].step == 20
    assert answers[-1].predicted_class == int(np.argmax(answers[-1].probabilities))
    floats = client.classify(GLIMPSE_MODEL, IMAGE.astype(np.float32) / 255)
    assert [a.probabilities for a in floats] == [a.probabilities for a in answers]
    first = next(iter(client.classify_stream(GLIMPSE_MODEL, glimpses=[[0.5] * 49])))
    assert first.step == 1 and abs(sum(first.probabilities) - 1) < 1e-5


def test_sessions_as_objects(server, client):
    with client.session(CHAR_MODEL) as s:
        assert s.model == CHAR_MODEL and s.info.position == 0
        s.score("the cat")
        assert s.generate(" sat", max_chars=10, seed=1).result().position == 7 + 4 + 10
        assert s.position == 21
        fork = s.fork()
        snap = s.snapshot()
        assert isinstance(snap, Snapshot) and snap.position == 21 and snap.model == CHAR_MODEL
        restored = client.restore(snap)
        texts = {x.generate(max_chars=30, seed=7).result().text for x in (s, fork, restored)}
        assert len(texts) == 1  # each continues exactly as the original would
        for x in (fork, restored):
            x.close()
        sid = s.id
    with pytest.raises(ServerError) as e:  # the with-block closed it
        client.session_info(sid)
    assert e.value.code == "NOT_FOUND" and "no session" in e.value.details
    with pytest.raises(ServerError):
        client.attach(fork.id)


def test_snapshot_save_is_atomic_and_restorable(client, tmp_path):
    with client.session(CHAR_MODEL) as s:
        s.score("a dog")
        path = tmp_path / "s.snap"
        s.snapshot().save(path)
        assert not list(tmp_path.glob(".*tmp"))
        with client.restore(path.read_bytes()) as r:
            assert r.info.position == 5


def test_errors_are_server_errors_with_the_code(client):
    with pytest.raises(ServerError) as e:
        list(client.generate(CHAR_MODEL, "the", max_chars=0))
    assert e.value.code == "INVALID_ARGUMENT" and "max_chars must be in [1, 300]" in str(e.value)
    with pytest.raises(ServerError) as e:
        client.score("nope", "the")
    assert e.value.code == "NOT_FOUND"
    with pytest.raises(ValueError, match="an image or glimpses"):
        client.classify(GLIMPSE_MODEL)


def test_cancel_a_generation(server, client):
    gen = client.generate(CHAR_MODEL, "the", max_chars=300, seed=1)
    it = iter(gen)
    next(it)
    gen.cancel()
    rest = list(it)
    assert gen.finish_reason == "cancelled" and len(gen.text) < 300 and len(rest) < 299


def test_async_client(server):
    async def main():
        async with AsyncClient(server.target) as client:
            assert [m.name for m in await client.models()] == [CHAR_MODEL, GLIMPSE_MODEL]
            gen = client.generate(CHAR_MODEL, "the ", max_chars=40, seed=4)
            pieces = [p async for p in gen]
            raw = raw_generate(
                server, model=CHAR_MODEL, prompt="the ", max_chars=40, seed=4, temperature=1.0
            )[0]
            assert "".join(pieces) == "".join(raw)
            assert gen.finish_reason == "length"
            r = await client.score(CHAR_MODEL, "the cat")
            assert r.num_chars == 7
            answers = await client.classify(GLIMPSE_MODEL, IMAGE)
            assert [a.probabilities for a in answers] == [
                a.probabilities for a in Client(server.target).classify(GLIMPSE_MODEL, IMAGE)
            ]
            async with client.session(CHAR_MODEL) as s:
                await s.score("the cat")
                fork = await s.fork()
                snap = await s.snapshot()
                restored = await client.restore(snap)
                texts = set()
                for x in (s, fork, restored):
                    texts.add((await x.generate(max_chars=20, seed=2).result()).text)
                assert len(texts) == 1
                assert (await s.refresh()).position == 27
                await fork.close()
                await restored.close()
                sid = s.id
            with pytest.raises(ServerError) as e:
                await client.session_info(sid)
            assert e.value.code == "NOT_FOUND"
            s2 = await client.session(CHAR_MODEL)  # awaited: an open session
            assert (await client.attach(s2.id)).id == s2.id
            await s2.close()
            with pytest.raises(ServerError) as e:
                [p async for p in client.generate("nope", "x", max_chars=1)]
            assert e.value.code == "NOT_FOUND"

    asyncio.run(main())


def test_api_key_and_tls(models_dir, tmp_path):
    pytest.importorskip("cryptography")
    from certs import make_certs

    from serving.auth import server_credentials

    certs = make_certs(tmp_path)
    s = ServerThread(
        models_dir,
        Limits(),
        api_keys=ApiKeys([KEY]),
        tls=server_credentials(certs.server_cert, certs.server_key),
    )
    try:
        with Client(s.target, api_key=KEY, tls=TLS(ca=certs.ca)) as c:
            assert c.score(CHAR_MODEL, "the").num_chars == 3
            with c.session(CHAR_MODEL) as sess:
                assert sess.generate("a", max_chars=3).result().position == 4
        with Client(s.target, tls=TLS(ca=certs.ca)) as c, pytest.raises(ServerError) as e:
            c.models()
        assert e.value.code == "UNAUTHENTICATED"
        # plaintext to a TLS server: no answer
        with (
            Client(s.target, api_key=KEY) as c,
            pytest.raises(OSError, match="no nlstm server answers"),
        ):
            c.wait_ready(1)
    finally:
        s.close()
