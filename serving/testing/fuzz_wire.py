"""The fuzzer's wire format (see serving/testing/fuzz.py): a request message as the fuzzer sends
it (`Fields`), encoded field by field here rather than by the protobuf library, so that it can
carry what a Python client cannot put in a message (a string that is not UTF-8, such as a lone
surrogate; a varint beyond the field's range; a float given by its raw bits, NaN payloads
included; a field with the wrong wire type; a cut or padded message). Also the references to
sessions and snapshots resolved when a request is sent, how a real snapshot is mutated, and
`parse`: what the server sees in the bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from serving import snapshot


@dataclass(frozen=True)
class SessionRef:
    """A session id chosen when the request is sent: "live" a session created for it on a model
    of the rpc's kind, "other" one on a model of the other kind, "stale" a closed one, "near"
    a live session's id with its last character changed."""

    kind: str


@dataclass(frozen=True)
class SnapshotRef:
    """Snapshot bytes chosen when the request is sent: the real snapshot of a model of `kind`
    ("char", "glimpse"), changed by `mutation` (see `mutate`)."""

    kind: str
    mutation: tuple = ()


def mutate(data: bytes, mutation: tuple) -> bytes:
    """`data` changed by `mutation`: ("flip", i, bit), ("cut", n: bytes off the end), ("head", n:
    the first n bytes), ("splice", i, bytes), ("pad", bytes), ("zeros", n), or ("field", name,
    value): decoded, the field set, encoded again (unsigned, a valid checksum); () leaves it as
    it is."""
    if not mutation:
        return data
    op, *args = mutation
    if op == "flip":
        i = args[0] % len(data)
        return data[:i] + bytes([data[i] ^ (1 << args[1])]) + data[i + 1 :]
    if op == "cut":
        return data[: max(0, len(data) - args[0])]
    if op == "head":
        return data[: args[0]]
    if op == "splice":
        i = args[0] % (len(data) + 1)
        return data[:i] + args[1] + data[i:]
    if op == "pad":
        return data + args[0]
    if op == "zeros":
        return data + b"\0" * args[0]
    s = snapshot.decode(data)
    name, value = args
    if name == "state_columns":  # a state of another shape
        s.state = np.resize(s.state, (s.state.shape[0], value))
    elif name == "nan":
        s.state = s.state.copy()
        s.state.flat[value % s.state.size] = np.nan
    elif name == "logits":
        s.logits = None if value is None else np.full(value, 0.5, np.float32)
    else:
        setattr(s, name, value)
    return snapshot.encode(s)


@dataclass(frozen=True)
class Fields:
    """One request message as the fuzzer sends it: (field, value) pairs in wire order (a name of
    the message's field, or the number of a field it does not have), then `cut` bytes removed
    from the end of the encoding and `tail` appended."""

    items: tuple[tuple[str | int, Any], ...] = ()
    cut: int = 0
    tail: bytes = b""


Message = Fields | bytes  # bytes: sent as they are
Request = Message | tuple  # ClassifyGlimpses: a tuple of messages, the stream


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # a negative number as protobuf writes an int64: ten bytes
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _float32(value: float) -> bytes:
    """A float32's four bytes; an int is taken as its raw bits."""
    if isinstance(value, int):
        return struct.pack("<I", value % (1 << 32))
    return struct.pack("<f", value)


def _field(number: int, ftype: int | None, value) -> bytes:
    """One field by the type of its value: str (UTF-8, lone surrogates passed through, so not
    UTF-8) and bytes length-delimited, bool and int a varint (an int in a float field: its raw
    bits), float fixed32, a list packed floats or repeated strings."""
    if isinstance(value, (list, tuple)):
        if ftype == FieldDescriptor.TYPE_FLOAT:
            return _delimited(number, b"".join(_float32(v) for v in value))
        return b"".join(_field(number, ftype, v) for v in value)
    if isinstance(value, bytes):
        return _delimited(number, value)
    if isinstance(value, str):
        return _delimited(number, value.encode("utf-8", "surrogatepass"))
    if ftype == FieldDescriptor.TYPE_FLOAT or isinstance(value, float):
        return _varint(number << 3 | 5) + _float32(value)
    return _varint(number << 3) + _varint(int(value))


def encode(
    message: Message, descriptor, resolve: Callable[[SessionRef | SnapshotRef], str | bytes]
) -> bytes:
    """The bytes of one message of type `descriptor`, each SessionRef or SnapshotRef replaced by
    resolve(ref)."""
    if isinstance(message, bytes):
        return message
    out = b""
    for name, value in message.items:
        number: int
        ftype: int | None
        if isinstance(name, str):  # a field of the message
            f = descriptor.fields_by_name[name]
            number, ftype = f.number, f.type
        else:  # the number of a field it does not have
            number, ftype = name, None
        if isinstance(value, (SessionRef, SnapshotRef)):
            value = resolve(value)
        out += _field(number, ftype, value)
    return out[: max(0, len(out) - message.cut)] + message.tail


def parse(cls, data: bytes):
    """What the server sees in `data`: a message, or None when it does not parse."""
    try:
        return cls.FromString(data)
    except DecodeError:
        return None
