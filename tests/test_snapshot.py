"""The session snapshot format (serving/snapshot.py): round trips and every refusal."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from serving import snapshot as snap
from serving.formats import ExportMeta
from serving.snapshot import (
    SessionState,
    SnapshotInvalid,
    SnapshotMismatch,
    check_model,
    decode,
    encode,
)

REPO = Path(__file__).resolve().parents[1]
KEY = b"k" * 32


def state(logits: bool = True, position: int = 1234) -> SessionState:
    rng = np.random.default_rng(0)
    return SessionState(
        model="ptb-nlstm",
        model_id=hashlib.sha256(b"export").hexdigest(),
        position=position,
        state=rng.standard_normal((3, 600)).astype(np.float32),
        logits=rng.standard_normal(51).astype(np.float32) if logits else None,
    )


def same(a: SessionState, b: SessionState) -> bool:
    return (
        (a.model, a.model_id, a.position) == (b.model, b.model_id, b.position)
        and a.state.dtype == b.state.dtype == np.float32
        and a.state.tobytes() == b.state.tobytes()
        and (a.logits is None) == (b.logits is None)
        and (a.logits is None or a.logits.tobytes() == b.logits.tobytes())
    )


def resign(data: bytes, body_edit) -> bytes:
    """Apply `body_edit` to an unsigned snapshot's body and recompute its checksum, as a forger
    (or a bug) would: checks behind the checksum must catch what it cannot."""
    body = body_edit(data[: -snap.DIGEST_SIZE])
    return body + hashlib.sha256(body).digest()


def with_header(data: bytes, **changes) -> bytes:
    def edit(body: bytes) -> bytes:
        n = struct.unpack_from("<I", body, 12)[0]
        header = json.loads(body[16 : 16 + n])
        header.update(changes)
        h = json.dumps(header).encode()
        return body[:12] + struct.pack("<I", len(h)) + h + body[16 + n :]

    return resign(data, edit)


@pytest.mark.parametrize("logits", [True, False])
@pytest.mark.parametrize("key", [None, KEY])
def test_round_trip_is_bit_exact(logits, key):
    s = state(logits=logits)
    s.state[0, 0] = np.float32(-0.0)
    s.state[0, 1] = np.float32(1e-45)  # a subnormal survives
    data = encode(s, key)
    assert data[:8] == snap.MAGIC and struct.unpack_from("<H", data, 8)[0] == snap.FORMAT_VERSION
    out = decode(data, key)
    assert same(s, out)
    assert np.signbit(out.state[0, 0])
    out.state[0, 0] = 5.0  # decoded arrays are writable copies
    assert len(data) < 8 * 1024  # the PTB model's state: ~7 KB


def test_layout_is_as_documented():
    s = state()
    data = encode(s)
    magic, version, flags, n = struct.unpack_from("<8sHHI", data)
    assert (magic, version, flags) == (b"NLSTMSS\0", 1, 0)
    header = json.loads(data[16 : 16 + n])
    assert header == {
        "model": "ptb-nlstm",
        "model_id": s.model_id,
        "position": 1234,
        "state_shape": [3, 600],
        "dtype": "float32",
        "logits_size": 51,
    }
    arrays = data[16 + n : -32]
    assert arrays == s.state.astype("<f4").tobytes() + s.logits.astype("<f4").tobytes()
    assert data[-32:] == hashlib.sha256(data[:-32]).digest()
    signed = encode(s, KEY)
    assert struct.unpack_from("<H", signed, 10)[0] == snap.FLAG_HMAC

    body = signed[:-64]
    assert signed[-64:-32] == hashlib.sha256(body).digest()
    assert signed[-32:] == hmac.new(KEY, body, hashlib.sha256).digest()


def test_position_up_to_uint64():
    s = state(position=2**64 - 1)
    assert decode(encode(s)).position == 2**64 - 1
    with pytest.raises(ValueError, match="position"):
        encode(state(position=2**64))


@pytest.mark.parametrize("key", [None, KEY])
def test_every_truncation_is_refused(key):
    data = encode(state(), key)
    for n in list(range(80)) + list(range(len(data) - 80, len(data))):
        with pytest.raises(SnapshotInvalid):
            decode(data[:n], key)


@pytest.mark.parametrize("key", [None, KEY])
def test_every_single_byte_corruption_is_refused(key):
    data = bytearray(encode(state(), key))
    # every byte of the header and trailers, and a sample of the arrays
    positions = (
        list(range(300))
        + list(range(300, len(data) - 100, 97))
        + list(range(len(data) - 100, len(data)))
    )
    for i in positions:
        bad = bytearray(data)
        bad[i] ^= 0x01
        with pytest.raises(SnapshotInvalid):
            decode(bytes(bad), key)


def test_wrong_magic_and_version():
    data = encode(state())
    with pytest.raises(SnapshotInvalid, match="magic"):
        decode(resign(data, lambda b: b"NOTASNAP" + b[8:]))
    with pytest.raises(SnapshotInvalid, match="version 2 is not readable"):
        decode(resign(data, lambda b: b[:8] + struct.pack("<H", 2) + b[10:]))
    with pytest.raises(SnapshotInvalid, match="unknown flags"):
        decode(resign(data, lambda b: b[:10] + struct.pack("<H", 4) + b[12:]))


def test_oversized_is_refused_before_parsing():
    data = encode(state())
    with pytest.raises(
        SnapshotInvalid, match=f"{len(data)} bytes; this server accepts at most 1000"
    ):
        decode(data, max_bytes=1000)
    assert same(decode(data, max_bytes=len(data)), state())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["state", "logits"])
def test_non_finite_values_are_refused(bad, where):
    s = state()
    getattr(s, where).reshape(-1)[7] = bad
    with pytest.raises(SnapshotInvalid, match="non-finite"):
        decode(encode(s))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"model": ""}, "model must be"),
        ({"model": 3}, "model must be"),
        ({"model_id": "abc"}, "model_id must be 64"),
        ({"position": -1}, "position must be"),
        ({"position": 1.5}, "position must be"),
        ({"position": True}, "position must be"),
        ({"state_shape": [3]}, "state_shape must be"),
        ({"state_shape": [0, 600]}, "state_shape must be"),
        ({"state_shape": [600, 3]}, None),  # same byte count: decodes, check_model refuses
        ({"state_shape": [4, 600]}, "arrays are"),
        ({"state_shape": [10**7, 10**7]}, "far larger"),
        ({"dtype": "float16"}, "dtype must be"),
        ({"logits_size": 0}, "logits_size must be"),
        ({"logits_size": 50}, "arrays are"),
        ({"logits_size": None}, "arrays are"),
        ({"extra": 1}, "exactly the keys"),
    ],
)
def test_header_fields_are_checked(changes, match):
    data = with_header(encode(state()), **changes)
    if match is None:
        s = decode(data)
        with pytest.raises(SnapshotInvalid, match="corrupt"):
            check_model(s, "ptb-nlstm", s.model_id, state_shape=(3, 600), output_size=51)
        return
    with pytest.raises(SnapshotInvalid, match=match):
        decode(data)


def test_header_not_json():
    def edit(b: bytes) -> bytes:
        n = struct.unpack_from("<I", b, 12)[0]
        return b[:16] + b"{" + b" " * (n - 1) + b[16 + n :]

    with pytest.raises(SnapshotInvalid, match="not valid JSON"):
        decode(resign(encode(state()), edit))


def test_hmac_rules():
    s = state()
    signed, unsigned = encode(s, KEY), encode(s)
    assert same(decode(signed, KEY), s)
    with pytest.raises(SnapshotInvalid, match="does not verify"):
        decode(signed, b"another key")
    with pytest.raises(SnapshotInvalid, match="not signed"):
        decode(unsigned, KEY)
    # a server without a key reads a signed snapshot (checksum, layout and values checked)
    assert same(decode(signed), s)
    # re-signing the body with another key (or stripping the HMAC and the flag) does not pass
    forged = signed[:-32] + b"\0" * 32
    with pytest.raises(SnapshotInvalid, match="does not verify"):
        decode(forged, KEY)
    with pytest.raises(ValueError, match="empty"):
        encode(s, b"")


def test_check_model():
    s = state()
    check_model(s, "ptb-nlstm", s.model_id, state_shape=(3, 600), output_size=51)
    with pytest.raises(SnapshotMismatch, match="not 'poems-nlstm'"):
        check_model(s, "poems-nlstm", s.model_id)
    with pytest.raises(SnapshotMismatch, match="another export"):
        check_model(s, "ptb-nlstm", "0" * 64)
    with pytest.raises(SnapshotInvalid, match="51 logits"):
        check_model(s, "ptb-nlstm", s.model_id, output_size=50)
    check_model(state(logits=False), "ptb-nlstm", s.model_id, (3, 600), 51)
    assert issubclass(SnapshotMismatch, ValueError) and issubclass(SnapshotInvalid, ValueError)


def test_model_identity_follows_the_export_not_its_folder():
    meta = ExportMeta.from_folder(REPO / "exported" / "ptb-nlstm")
    ident = snap.model_identity(meta)
    assert len(ident) == 64 and ident == snap.model_identity(
        ExportMeta.from_folder(REPO / "exported" / "ptb-nlstm")
    )
    assert ident != snap.model_identity(ExportMeta.from_folder(REPO / "exported" / "poems-nlstm"))
    # other figures, same graphs: the same model
    assert snap.model_identity(dataclasses.replace(meta, figures={"x": 1})) == ident
    # another graph file (a re-export with other weights): another identity
    files = dict(meta.files, **{"model.onnx": "0" * 64})
    assert snap.model_identity(dataclasses.replace(meta, files=files)) != ident
