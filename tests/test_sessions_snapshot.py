"""Sessions that travel (issue 14, section 2) against in-process servers on port 0 with the
tiny exported models, and `nlstm serve` in a subprocess for the snapshot key: snapshot, restore
and fork continuing bit-identically; every refusal of RestoreSession with its status code;
snapshots signed with a key; the `nlstm session` commands. Positions and calls that end early
are in test_sessions.py."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_calls import code_of
from serve_process import port_in_log, start_serve
from sessions_support import (
    KEY_A,
    KEY_B,
    LIMITS,
    generate,
    glimpse_requests,
    info,
    random_glimpses,
    score_bits,
    settled,
    sid_of,
)

from serving import snapshot
from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc
from serving.engine import Engine, Limits
from serving.testing.inprocess import ServerThread
from training.testing.models import CHAR_MODEL, GLIMPSE_MODEL, TEXT


@pytest.fixture(scope="module")
def server(models_dir):
    s = ServerThread(models_dir, Limits(max_sessions=64, **LIMITS))
    yield s
    s.close()


@pytest.fixture(scope="module")
def replica(models_dir):
    """A second server on the same exported models: a snapshot moves between them."""
    s = ServerThread(models_dir, Limits(**LIMITS))
    yield s
    s.close()


# ------------------------------------------------------------------ snapshot, restore, fork
def test_snapshot_restore_and_fork_continue_bit_identically(server, replica):
    stub = server.stub
    sid = sid_of(stub)
    score_bits(stub, sid, "the cat sat on the mat\n")
    snap = stub.SnapshotSession(pb.SnapshotSessionRequest(session_id=sid))
    assert (snap.model, snap.position) == (CHAR_MODEL, 23) and len(snap.data) > 0
    fork = stub.ForkSession(pb.ForkSessionRequest(session_id=sid))
    restored = stub.RestoreSession(pb.RestoreSessionRequest(data=snap.data))
    moved = replica.stub.RestoreSession(pb.RestoreSessionRequest(data=snap.data))  # another server
    ids = {sid, fork.session_id, restored.session_id, moved.session_id}
    assert len(ids) == 4 and fork.position == restored.position == moved.position == 23
    assert fork.model == restored.model == moved.model == CHAR_MODEL
    sessions = [
        (stub, sid),
        (stub, fork.session_id),
        (stub, restored.session_id),
        (replica.stub, moved.session_id),
    ]
    texts = {
        generate(st, session_id=x, max_chars=80, temperature=1.0, seed=11)[0] for st, x in sessions
    }
    assert len(texts) == 1  # the same seed gives the same text, character for character
    bits = {score_bits(st, x, "a dog ran in the park") for st, x in sessions}
    assert len(bits) == 1  # bit-identical states: the same float, not only close
    assert {info(st, x).position for st, x in sessions} == {23 + 80 + 21}

    # a fresh session (nothing fed: no logits) survives a snapshot too
    fresh = sid_of(stub)
    data = stub.SnapshotSession(pb.SnapshotSessionRequest(session_id=fresh)).data
    assert snapshot.decode(data).logits is None
    again = stub.RestoreSession(pb.RestoreSessionRequest(data=data)).session_id
    a = generate(stub, session_id=fresh, prompt="we", max_chars=40, temperature=1.0, seed=4)[0]
    b = generate(stub, session_id=again, prompt="we", max_chars=40, temperature=1.0, seed=4)[0]
    assert a == b

    # a glimpse session: the same probabilities after the same glimpses
    gid = sid_of(stub, GLIMPSE_MODEL)
    list(stub.ClassifyGlimpses(glimpse_requests(random_glimpses(5, 4), session_id=gid)))
    gdata = stub.SnapshotSession(pb.SnapshotSessionRequest(session_id=gid)).data
    gcopy = replica.stub.RestoreSession(pb.RestoreSessionRequest(data=gdata)).session_id
    more = random_glimpses(6, 3)
    x = list(stub.ClassifyGlimpses(glimpse_requests(more, session_id=gid)))
    y = list(replica.stub.ClassifyGlimpses(glimpse_requests(more, session_id=gcopy)))
    assert [r.probabilities for r in x] == [r.probabilities for r in y] and y[-1].position == 7

    for st, x in sessions + [(stub, fresh), (stub, again), (stub, gid), (replica.stub, gcopy)]:
        st.CloseSession(pb.CloseSessionRequest(session_id=x))


def test_snapshot_and_fork_of_a_busy_or_unknown_session(server):
    stub = server.stub
    sid = sid_of(stub)
    stream = stub.Generate(pb.GenerateRequest(session_id=sid, max_chars=4000, temperature=1.0))
    next(stream)
    for method, req in [
        (stub.SnapshotSession, pb.SnapshotSessionRequest),
        (stub.ForkSession, pb.ForkSessionRequest),
    ]:
        code, details = code_of(method, req(session_id=sid))
        assert code == grpc.StatusCode.ABORTED and "in use by another call" in details
        assert code_of(method, req(session_id="nope"))[0] == grpc.StatusCode.NOT_FOUND
        assert code_of(method, req(session_id=""))[0] == grpc.StatusCode.INVALID_ARGUMENT
    stream.cancel()
    settled(stub, sid)
    stub.CloseSession(pb.CloseSessionRequest(session_id=sid))


def _export_char(root: Path, seed: int) -> Path:
    """The tiny character model exported again with other weights (a changed export of it)."""
    import torch

    from training.data.tokenizer import train_char_tokenizer
    from training.export import export_model
    from training.models import ModelConfig, build_model

    torch.manual_seed(seed)
    tok = train_char_tokenizer(TEXT, newline=True)
    model = build_model(
        ModelConfig(kind="char", core="nlstm", hidden_size=16, depth=2, vocab_size=tok.vocab_size)
    )
    export_model(
        model.eval(), root / CHAR_MODEL, task="ptb", tokenizer=tok.model_proto, sequence="never"
    )
    return root


def _reencode(data: bytes, edit) -> bytes:
    s = snapshot.decode(data)
    edit(s)
    return snapshot.encode(s)


def test_restore_refusals_and_their_codes(server, models_dir, tmp_path):
    stub = server.stub
    sid = sid_of(stub)
    score_bits(stub, sid, "the cat")
    data = stub.SnapshotSession(pb.SnapshotSessionRequest(session_id=sid)).data
    INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION

    def restore(st, blob):
        return code_of(st.RestoreSession, pb.RestoreSessionRequest(data=blob))

    corrupt = bytearray(data)
    corrupt[len(data) // 2] ^= 0x40
    version = bytearray(data)
    version[8] = 2
    bound = server.running.engine._snapshot_max_bytes()
    cases = [
        (b"", INVALID, "data is required"),
        (data[:-1], INVALID, "corrupt or truncated"),
        (data[:20], INVALID, "truncated"),
        (bytes(corrupt), INVALID, "corrupt or truncated"),
        (b"x" * len(data), INVALID, "wrong magic"),
        (bytes(version), INVALID, "version 2 is not readable"),
        (data + b"\0" * bound, INVALID, f"accepts at most {bound}"),
        (_reencode(data, lambda s: s.state.__setitem__((0, 3), np.nan)), INVALID, "non-finite"),
        (_reencode(data, lambda s: s.logits.__setitem__(1, np.inf)), INVALID, "non-finite"),
        (_reencode(data, lambda s: setattr(s, "state", s.state[:, :8])), INVALID, "corrupt"),
        (_reencode(data, lambda s: setattr(s, "model", "other")), PRECONDITION, "does not run"),
        (
            _reencode(data, lambda s: setattr(s, "model", GLIMPSE_MODEL)),
            PRECONDITION,
            "another export",
        ),
        (
            _reencode(data, lambda s: setattr(s, "model_id", "0" * 64)),
            PRECONDITION,
            "another export",
        ),
    ]
    for blob, code, words in cases:
        got, details = restore(stub, blob)
        assert got == code and words in details, (words, got, details)

    # a server that runs only the classifier; one that runs a changed export of the char model
    only_glimpses = tmp_path / "glimpses"
    shutil.copytree(models_dir / GLIMPSE_MODEL, only_glimpses / GLIMPSE_MODEL)
    changed = _export_char(tmp_path / "changed", seed=1)
    for folder, words in [(only_glimpses, "does not run"), (changed, "another export")]:
        other = ServerThread(folder, Limits(max_sessions=2))
        try:
            got, details = restore(other.stub, data)
            assert got == PRECONDITION and words in details, details
            if folder == only_glimpses:  # and at its bound of sessions: RESOURCE_EXHAUSTED
                gid = sid_of(stub, GLIMPSE_MODEL)
                gdata = stub.SnapshotSession(pb.SnapshotSessionRequest(session_id=gid)).data
                for _ in range(2):
                    other.stub.RestoreSession(pb.RestoreSessionRequest(data=gdata))
                assert restore(other.stub, gdata)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            other.close()
    stub.CloseSession(pb.CloseSessionRequest(session_id=sid))


def test_snapshot_key_signs_and_is_required(models_dir, server):
    """With a snapshot key a server signs its snapshots (HMAC-SHA256) and restores only those
    signed with that key."""
    plain = server.stub
    sid = sid_of(plain)
    score_bits(plain, sid, "the cat")
    unsigned = plain.SnapshotSession(pb.SnapshotSessionRequest(session_id=sid)).data
    a = ServerThread(models_dir, Limits(), snapshot_key=KEY_A)
    b = ServerThread(models_dir, Limits(), snapshot_key=KEY_B)
    try:
        asid = a.stub.RestoreSession(
            pb.RestoreSessionRequest(data=_sign(unsigned, KEY_A))
        ).session_id
        signed = a.stub.SnapshotSession(pb.SnapshotSessionRequest(session_id=asid)).data
        assert snapshot.decode(signed, KEY_A).position == 7
        again = a.stub.RestoreSession(pb.RestoreSessionRequest(data=signed))
        assert again.position == 7
        cases = [
            (a, unsigned, "not signed"),  # a keyed server refuses what no key signed
            (b, signed, "does not verify"),  # or what another key signed
            (a, signed[:-32] + bytes(32), "does not verify"),  # or a signature made up
        ]
        for srv, blob, words in cases:
            code, details = code_of(srv.stub.RestoreSession, pb.RestoreSessionRequest(data=blob))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details, details
        # a server without a key reads signed snapshots (it has nothing to check them against)
        assert plain.RestoreSession(pb.RestoreSessionRequest(data=signed)).position == 7
        with pytest.raises(ValueError, match="at least 16 bytes"):
            Engine(a.models, snapshot_key=b"short")
    finally:
        a.close()
        b.close()


def _sign(data: bytes, key: bytes) -> bytes:
    return snapshot.encode(snapshot.decode(data), key)


def test_serve_snapshot_key_file_flag_and_environment(models_dir, tmp_path, monkeypatch, capsys):
    from training.cli import build_parser
    from training.cli import main as cli_main

    key_file = tmp_path / "key"
    key_file.write_text(KEY_A.hex() + "\n")
    monkeypatch.setenv("NLSTM_SNAPSHOT_KEY_FILE", str(key_file))
    assert build_parser().parse_args(["serve"]).snapshot_key_file == key_file
    monkeypatch.delenv("NLSTM_SNAPSHOT_KEY_FILE")
    short = tmp_path / "short"
    short.write_text("0123456789\n")
    assert cli_main(["serve", "--snapshot-key-file", str(short), "--metrics-port", "-1"]) == 2
    assert "holds 10 bytes; a snapshot key needs at least 16" in capsys.readouterr().err
    assert (
        cli_main(
            ["serve", "--snapshot-key-file", str(tmp_path / "missing"), "--metrics-port", "-1"]
        )
        == 2
    )
    assert "cannot read" in capsys.readouterr().err

    proc = start_serve(models_dir, "--metrics-port", "-1", "--snapshot-key-file", str(key_file))
    try:
        port = port_in_log(proc)
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            sid = sid_of(stub)
            score_bits(stub, sid, "the cat")
            data = stub.SnapshotSession(pb.SnapshotSessionRequest(session_id=sid)).data
            # signed with the file's stripped contents
            assert snapshot.decode(data, KEY_A.hex().encode()).position == 7
            assert stub.RestoreSession(pb.RestoreSessionRequest(data=data)).position == 7
            code, details = code_of(
                stub.RestoreSession,
                pb.RestoreSessionRequest(data=snapshot.encode(snapshot.decode(data))),
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "not signed" in details
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# ---------------------------------------------------------------------------------- the CLI
def test_cli_session_commands(server, tmp_path, capsys):
    from training.cli import main as cli_main

    target = ["--target", f"localhost:{server.running.port}"]

    def run(*argv) -> str:
        assert cli_main(["session", argv[0], *target, *argv[1:]]) == 0
        return capsys.readouterr().out

    sid = run("create", "--model", CHAR_MODEL).strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", sid)
    text_file = tmp_path / "t.txt"
    text_file.write_text("the cat", encoding="utf-8")
    assert cli_main(["score", str(text_file), *target, "--session", sid]) == 0
    capsys.readouterr()
    shown = run("show", sid)
    assert f"session: {sid}\nmodel: {CHAR_MODEL}\nposition: 7\n" in shown and "in use: no" in shown
    snap_file = tmp_path / "s.snap"
    assert cli_main(["session", "snapshot", *target, sid, "--out", str(snap_file)]) == 0
    assert "bytes: model tiny-char, position 7" in capsys.readouterr().err
    assert snapshot.decode(snap_file.read_bytes()).position == 7
    restored = run("restore", str(snap_file)).strip()
    forked = run("fork", sid).strip()
    assert len({sid, restored, forked}) == 3
    for x in (restored, forked):
        assert "position: 7" in run("show", x)
    texts = set()
    for x in (sid, restored, forked):
        assert (
            cli_main(["generate", *target, "--session", x, "--max-chars", "30", "--seed", "9"]) == 0
        )
        texts.add(capsys.readouterr().out)
    assert len(texts) == 1
    for x in (sid, restored, forked):
        run("close", x)
    assert cli_main(["session", "show", *target, sid]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    assert cli_main(["session", "restore", *target, str(tmp_path / "missing.snap")]) == 2
    text_file.write_bytes(b"not a snapshot")
    assert cli_main(["session", "restore", *target, str(text_file)]) == 2
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
