"""What serving/client.py's clients send and get, without the calls: the typed results
(ModelInfo, SessionInfo, Snapshot, ScoreResult, Glimpse), ServerError, the TLS settings, and
the conversions between them and the protobuf messages. No torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.files import atomic_write_bytes
from serving.formats import image_to_glimpses

FINISH = {
    pb.FINISH_REASON_UNSPECIFIED: "",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop",
    pb.FINISH_REASON_CANCELLED: "cancelled",
}


# ------------------------------------------------------------------------------ results
class ServerError(Exception):
    """A call the server refused or that failed: `code` is the gRPC status code's name
    ("INVALID_ARGUMENT", "NOT_FOUND", ...), `details` the server's message."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details

    @classmethod
    def of(cls, exc: grpc.RpcError) -> ServerError:
        return cls(exc.code().name, exc.details() or "")


@dataclass(frozen=True)
class TLS:
    """TLS to a server: `ca` the PEM CA that signed its certificate (None: the system's roots);
    `cert` and `key` a client certificate for servers that ask for one (mutual TLS)."""

    ca: str | Path | None = None
    cert: str | Path | None = None
    key: str | Path | None = None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    task: str  # "ptb", "text8", "poems", "mnist"
    kind: str  # the core: "nlstm", "lstm", "hmlstm"
    vocab_size: int  # character models; 0 for classifiers
    num_classes: int  # classifiers; 0 for character models
    metrics: dict[str, float]  # training figures: "valid_bpc", "test_acc", ...
    depth: int
    num_layers: int
    hidden_size: int


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    model: str
    position: int  # characters (or glimpses) the state has taken in since its creation
    idle_timeout_seconds: int
    in_use: bool  # a call is running on it now


@dataclass(frozen=True)
class Snapshot:
    """A session's state as bytes (a versioned, checksummed format): restore it with
    Client.restore on this server or any other running the same export of the model."""

    data: bytes
    model: str
    position: int

    def save(self, path: str | Path) -> None:
        """Write the data to `path` atomically (a reader never sees half a snapshot)."""
        atomic_write_bytes(path, self.data)


@dataclass(frozen=True)
class ScoreResult:
    bits_per_char: float
    total_bits: float
    num_chars: int
    unknown_chars: int  # characters outside the vocabulary (scored as the unknown symbol)
    position: int
    bits: list[float] = field(default_factory=list)  # per character, with per_char=True
    boundaries: list[str] = field(default_factory=list)  # HM-LSTM, per_char: '0'/'1' per layer


@dataclass(frozen=True)
class Glimpse:
    step: int  # glimpses read so far in this call (1 for the first)
    probabilities: list[float]  # one per class, summing to 1
    predicted_class: int
    position: int


def model_info_of(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        m.name,
        m.task,
        m.kind,
        m.vocab_size,
        m.num_classes,
        dict(m.metrics),
        m.depth,
        m.num_layers,
        m.hidden_size,
    )


def session_info_of(s: pb.Session) -> SessionInfo:
    return SessionInfo(s.session_id, s.model, s.position, s.idle_timeout_seconds, s.in_use)


def score_of(r: pb.ScoreResponse) -> ScoreResult:
    return ScoreResult(
        r.bits_per_char,
        r.total_bits,
        r.num_chars,
        r.unknown_chars,
        r.position,
        list(r.bits),
        list(r.boundaries),
    )


def glimpse_of(r: pb.GlimpseResponse) -> Glimpse:
    return Glimpse(r.step, list(r.probabilities), r.predicted_class, r.position)


def generate_request(
    model: str,
    prompt: str,
    max_chars: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    stop: Iterable[str],
    logprobs: bool,
    session_id: str,
) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        model=model,
        session_id=session_id,
        prompt=prompt,
        max_chars=max_chars,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop=list(stop),
        logprobs=logprobs,
    )
    if seed is not None:
        request.seed = seed
    return request


def glimpse_requests(model: str, image, glimpses, session_id: str) -> list[pb.GlimpseRequest]:
    """An image (28, 28: uint8 0..255 or floats in [0, 1]) as its 20 glimpses, or glimpses
    as given (rows of 49 floats in [0, 1])."""
    if (image is None) == (glimpses is None):
        raise ValueError("classify takes an image or glimpses, not both or neither")
    rows = (
        image_to_glimpses(np.asarray(image))
        if image is not None
        else np.asarray(glimpses, dtype=np.float32)
    )
    if rows.ndim != 2 or not len(rows):
        raise ValueError(
            f"glimpses must be a non-empty list of rows of 49 floats, got shape {rows.shape}"
        )
    return [
        pb.GlimpseRequest(
            model=model if i == 0 else "",
            session_id=session_id if i == 0 else "",
            pixels=g.tolist(),
        )
        for i, g in enumerate(rows)
    ]
