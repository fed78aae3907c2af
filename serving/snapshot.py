"""The session snapshot format: one session's recurrent state as bytes that outlive the process.

SnapshotSession hands these bytes to a client, RestoreSession takes them back (on any replica,
after any restart), and the session stores keep sessions in the same form. A snapshot binds
the exported model it came from (its name and `model_identity`: a digest over meta.json's
file hashes, so a re-export with changed weights is a different model), the state's shape and
dtype, the logits that predict the next symbol and the session's position. numpy and the
standard library only: no pickle, nothing here executes what it reads.

Layout, version 1 (all integers little-endian):

    offset  size  field
    0       8     magic  b"NLSTMSS\\0"
    8       2     format version (uint16) = FORMAT_VERSION
    10      2     flags (uint16): bit 0 set = signed (an HMAC follows the checksum); every
                  other bit must be clear
    12      4     header length N (uint32)
    16      N     header: UTF-8 JSON object with exactly the keys
                    "model"        str   the served model's name
                    "model_id"     str   model_identity() of its export (64 hex digits)
                    "position"     int   characters (or glimpses) the state has taken in, >= 0
                    "state_shape"  [S, H] ints >= 1
                    "dtype"        "float32" (little-endian, "<f4")
                    "logits_size"  int >= 1, or null when nothing was fed yet (no logits)
    16+N    4*S*H  the state, row-major (S, H) float32
    ...     4*V    the logits (V = logits_size), absent when logits_size is null
    ...     32    checksum: SHA-256 of every byte above (the "body")
    ...     32    signed only: HMAC-SHA256 of the body under the server's snapshot key

Every snapshot carries the checksum, so truncation and corruption are caught even without a
key; a key adds authenticity. Decoding with a key refuses an unsigned snapshot (missing HMAC)
and one whose HMAC does not verify; decoding without a key checks a signed snapshot's checksum,
layout and values but not its HMAC (a server without a key has nothing to verify it against).
Everything refused here is `SnapshotInvalid` (the servicer answers INVALID_ARGUMENT); a
well-formed snapshot of another model, or of another export of this model, is `SnapshotMismatch`
from `check_model` (FAILED_PRECONDITION).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"NLSTMSS\0"
FORMAT_VERSION = 1
FLAG_HMAC = 1  # signed: an HMAC-SHA256 follows the checksum
_FIXED = struct.Struct("<8sHHI")  # magic, version, flags, header length
DIGEST_SIZE = 32  # SHA-256 and HMAC-SHA256
DTYPE = "float32"
_WIRE_DTYPE = np.dtype("<f4")
# The PTB model's snapshot is ~7 KB; 16 MiB leaves room for far larger models while keeping a
# hostile RestoreSession from making the server allocate without bound.
DEFAULT_MAX_BYTES = 16 << 20
_MAX_HEADER = 64 << 10  # the header is ~200 bytes; anything near this is not a snapshot
_HEADER_KEYS = {"model", "model_id", "position", "state_shape", "dtype", "logits_size"}
_MAX_POSITION = (1 << 64) - 1  # the proto's uint64


class SnapshotError(ValueError):
    """A snapshot that cannot be restored here."""


class SnapshotInvalid(SnapshotError):
    """Not a readable snapshot: truncated, corrupt, oversized, another format or version,
    non-finite values, or an HMAC that is missing or does not verify (INVALID_ARGUMENT)."""


class SnapshotMismatch(SnapshotError):
    """A well-formed snapshot of another model, or of another export of the served model
    (FAILED_PRECONDITION: restoring it would continue from a state the model never made)."""


@dataclass
class SessionState:
    """What a session is, without where it lives: the unit snapshots and session stores keep."""

    model: str  # the served model's name
    model_id: str  # model_identity() of the export that made the state
    position: int  # characters (or glimpses) taken in since the session was created
    state: np.ndarray  # (S, H) float32: after the last symbol fed
    logits: np.ndarray | None  # (V,) float32 predicting the next symbol; None: nothing fed yet


def model_identity(meta) -> str:
    """A digest naming one export of a model: sha256 over meta.json's file hashes (the graphs,
    the tokenizer), the state layout and the numeric precision. Re-exporting with other weights
    changes it; renaming the folder or editing meta.json's figures does not. `meta` is a
    serving.formats.ExportMeta."""
    ident = {
        "files": dict(sorted(meta.files.items())),
        "state_slots": list(meta.state_slots),
        "hidden_size": meta.hidden_size,
        "output_size": meta.output_size,
        "precision": DTYPE,  # the step graphs run float32; a float16 export would differ here
    }
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _hmac(body: bytes, key: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()


def encode(s: SessionState, key: bytes | None = None) -> bytes:
    """The snapshot bytes of `s`; with `key`, the trailer is an HMAC-SHA256 under it."""
    state = np.asarray(s.state)
    if state.ndim != 2 or state.shape[0] < 1 or state.shape[1] < 1:
        raise ValueError(
            f"a session state must have shape (S, H) with S, H >= 1; got {state.shape}"
        )
    if not 0 <= int(s.position) <= _MAX_POSITION:
        raise ValueError(f"position must be in [0, 2**64); got {s.position}")
    logits = None if s.logits is None else np.asarray(s.logits).reshape(-1)
    if logits is not None and logits.size < 1:
        raise ValueError("logits must hold at least one value, or be None")
    if key is not None and not key:
        raise ValueError("a snapshot key must not be empty")
    header = json.dumps(
        {
            "model": s.model,
            "model_id": s.model_id,
            "position": int(s.position),
            "state_shape": [int(state.shape[0]), int(state.shape[1])],
            "dtype": DTYPE,
            "logits_size": None if logits is None else int(logits.size),
        },
        separators=(",", ":"),
    ).encode()
    flags = FLAG_HMAC if key is not None else 0
    parts = [
        _FIXED.pack(MAGIC, FORMAT_VERSION, flags, len(header)),
        header,
        state.astype(_WIRE_DTYPE, copy=False).tobytes(),
    ]
    if logits is not None:
        parts.append(logits.astype(_WIRE_DTYPE, copy=False).tobytes())
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest() + (b"" if key is None else _hmac(body, key))


def decode(
    data: bytes, key: bytes | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> SessionState:
    """Parse and verify a snapshot; every refusal is a SnapshotInvalid saying what was wrong.

    With `key`, the snapshot must carry a valid HMAC under it. The model is not checked here:
    call `check_model` with the served model's name and identity.
    """
    data = bytes(data)
    if len(data) > max_bytes:
        raise SnapshotInvalid(
            f"snapshot is {len(data)} bytes; this server accepts at most {max_bytes}"
        )
    if len(data) < _FIXED.size + DIGEST_SIZE:
        raise SnapshotInvalid(
            f"snapshot is truncated: {len(data)} bytes is shorter than the smallest snapshot "
            f"({_FIXED.size + DIGEST_SIZE} bytes)"
        )
    magic, version, flags, header_len = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotInvalid(
            "not a session snapshot (wrong magic bytes); pass the data field "
            "of a SnapshotSession answer unchanged"
        )
    if version != FORMAT_VERSION:
        raise SnapshotInvalid(
            f"snapshot format version {version} is not readable here; this server reads version "
            f"{FORMAT_VERSION}"
        )
    if flags & ~FLAG_HMAC:
        raise SnapshotInvalid(
            f"snapshot has unknown flags {flags:#x}; version {FORMAT_VERSION} "
            f"defines only {FLAG_HMAC:#x} (signed)"
        )
    signed = bool(flags & FLAG_HMAC)
    if key is not None and not signed:
        raise SnapshotInvalid(
            "snapshot is not signed, and this server requires an HMAC (it has "
            "a snapshot key): restore only snapshots a server with that key made"
        )
    # Integrity before anything is parsed: a truncated snapshot fails here too (its last bytes
    # are not a digest of the rest).
    n_trailer = DIGEST_SIZE * (2 if signed else 1)
    if len(data) < _FIXED.size + n_trailer:
        raise SnapshotInvalid(f"snapshot is truncated: {len(data)} bytes")
    body = data[:-n_trailer]
    checksum = data[len(body) : len(body) + DIGEST_SIZE]
    if not hmac.compare_digest(checksum, hashlib.sha256(body).digest()):
        raise SnapshotInvalid(
            "snapshot is corrupt or truncated (its SHA-256 checksum does not "
            "match); pass the data of a SnapshotSession answer unchanged"
        )
    if key is not None and not hmac.compare_digest(data[-DIGEST_SIZE:], _hmac(body, key)):
        raise SnapshotInvalid(
            "snapshot HMAC does not verify: it was changed or signed with "
            "another key than this server's"
        )

    if header_len > _MAX_HEADER or _FIXED.size + header_len > len(body):
        raise SnapshotInvalid(
            f"snapshot header length {header_len} runs past the data: truncated or corrupt"
        )
    try:
        header = json.loads(body[_FIXED.size : _FIXED.size + header_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SnapshotInvalid(f"snapshot header is not valid JSON ({exc})") from None
    model, model_id, position, shape, logits_size = _check_header(header)

    n_state = shape[0] * shape[1]
    n_logits = logits_size or 0
    payload = body[_FIXED.size + header_len :]
    expected = 4 * (n_state + n_logits)
    if len(payload) != expected:
        raise SnapshotInvalid(
            f"snapshot arrays are {len(payload)} bytes; a state of shape {tuple(shape)} and "
            f"{n_logits} logits take {expected}: truncated or corrupt"
        )
    values = np.frombuffer(payload, dtype=_WIRE_DTYPE).astype(np.float32)  # a writable copy
    if not np.isfinite(values).all():
        raise SnapshotInvalid(
            "snapshot holds non-finite values (NaN or infinity) in its state or "
            "logits; a model's state is always finite"
        )
    state = values[:n_state].reshape(shape)
    logits = values[n_state:] if logits_size is not None else None
    return SessionState(
        model=model, model_id=model_id, position=position, state=state, logits=logits
    )


def _check_header(h) -> tuple[str, str, int, tuple[int, int], int | None]:
    def bad(msg: str):
        raise SnapshotInvalid(f"snapshot header: {msg}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(h, dict):
        bad("must be a JSON object")
    if set(h) != _HEADER_KEYS:
        bad(f"must have exactly the keys {sorted(_HEADER_KEYS)}; got {sorted(h)}")
    if not isinstance(h["model"], str) or not h["model"]:
        bad(f"model must be a non-empty string, got {h['model']!r}")
    mid = h["model_id"]
    if not (isinstance(mid, str) and len(mid) == 64 and all(c in "0123456789abcdef" for c in mid)):
        bad(f"model_id must be 64 lowercase hex digits, got {mid!r}")
    if not is_int(h["position"]) or not 0 <= h["position"] <= _MAX_POSITION:
        bad(f"position must be an integer in [0, 2**64), got {h['position']!r}")
    shape = h["state_shape"]
    if not (
        isinstance(shape, list) and len(shape) == 2 and all(is_int(v) and v >= 1 for v in shape)
    ):
        bad(f"state_shape must be [S, H] with integers >= 1, got {shape!r}")
    if h["dtype"] != DTYPE:
        bad(f"dtype must be {DTYPE!r}, got {h['dtype']!r}")
    ls = h["logits_size"]
    if ls is not None and not (is_int(ls) and ls >= 1):
        bad(f"logits_size must be an integer >= 1 or null, got {ls!r}")
    # Sizes are checked against the data's length by the caller; guard the product first so a
    # forged header cannot ask for an absurd multiplication result to be compared.
    if math.prod(shape) + (ls or 0) > (1 << 40):
        bad(f"state_shape {shape} and logits_size {ls} are far larger than any snapshot")
    return h["model"], mid, h["position"], (shape[0], shape[1]), ls


def check_model(
    s: SessionState,
    name: str,
    model_id: str,
    state_shape: tuple[int, int] | None = None,
    output_size: int | None = None,
) -> None:
    """Refuse a snapshot made by another model or another export of `name`.

    `state_shape` and `output_size`, when given, are the served model's: a snapshot that names
    the right export but has other shapes was forged or corrupted (SnapshotInvalid)."""
    if s.model != name:
        raise SnapshotMismatch(
            f"snapshot is of model {s.model!r}, not {name!r}: restore it on a server that "
            f"serves {s.model!r}"
        )
    if s.model_id != model_id:
        raise SnapshotMismatch(
            f"snapshot was made by another export of model {name!r} (identity "
            f"{s.model_id[:12]}..., this server's is {model_id[:12]}...): its state means "
            "nothing to the model served now"
        )
    if state_shape is not None and tuple(s.state.shape) != tuple(state_shape):
        raise SnapshotInvalid(
            f"snapshot state has shape {tuple(s.state.shape)}, but model {name!r} keeps "
            f"{tuple(state_shape)}: the snapshot is corrupt"
        )
    if output_size is not None and s.logits is not None and s.logits.shape != (output_size,):
        raise SnapshotInvalid(
            f"snapshot has {s.logits.size} logits, but model {name!r} predicts {output_size} "
            "symbols: the snapshot is corrupt"
        )


def max_size(state_shape: tuple[int, int], output_size: int) -> int:
    """The most bytes a snapshot of a model with this state shape and output size takes (with
    room for a header naming any model a folder name can): the bound RestoreSession applies."""
    arrays = 4 * (state_shape[0] * state_shape[1] + output_size)
    return _FIXED.size + 4096 + arrays + 2 * DIGEST_SIZE
