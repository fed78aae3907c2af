"""What the blocking Client (serving/client.py) and the AsyncClient (serving/client_async.py)
share, so that each of them only says how a call is made (blocking or awaited): the connection
(channel, stub, the deadline and API key every call carries), `generate`, each unary call as
data (its method, its request and how the answer becomes a result), the Generate stream's
bookkeeping, and closing a session that may be gone already. No torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc
from serving.client_types import (
    FINISH,
    TLS,
    ModelInfo,
    ScoreResult,
    ServerError,
    SessionInfo,
    Snapshot,
    generate_request,
    glimpse_requests,
    model_info_of,
    score_of,
    session_info_of,
)

T = TypeVar("T")
G = TypeVar("G", bound="Received")


# ------------------------------------------------------------------------------ unary calls
@dataclass(frozen=True)
class Unary(Generic[T]):
    """One unary call before it is made: the stub's `method`, its `request`, and `result`, which
    turns the response into what the client's method returns."""

    method: str
    request: Any  # the method's protobuf request message
    result: Callable[[Any], T]


def models_call() -> Unary[list[ModelInfo]]:
    return Unary(
        "ListModels", pb.ListModelsRequest(), lambda r: [model_info_of(m) for m in r.models]
    )


def score_call(model: str, text: str, per_char: bool, session_id: str) -> Unary[ScoreResult]:
    request = pb.ScoreRequest(model=model, session_id=session_id, text=text, per_char=per_char)
    return Unary("Score", request, score_of)


def create_session_call(model: str) -> Unary[SessionInfo]:
    return Unary("CreateSession", pb.CreateSessionRequest(model=model), session_info_of)


def session_info_call(session_id: str) -> Unary[SessionInfo]:
    return Unary("GetSession", pb.GetSessionRequest(session_id=session_id), session_info_of)


def restore_call(snapshot: Snapshot | bytes) -> Unary[SessionInfo]:
    data = snapshot.data if isinstance(snapshot, Snapshot) else snapshot
    return Unary("RestoreSession", pb.RestoreSessionRequest(data=data), session_info_of)


def fork_call(session_id: str) -> Unary[SessionInfo]:
    return Unary("ForkSession", pb.ForkSessionRequest(session_id=session_id), session_info_of)


def snapshot_call(session_id: str) -> Unary[Snapshot]:
    return Unary(
        "SnapshotSession",
        pb.SnapshotSessionRequest(session_id=session_id),
        lambda s: Snapshot(s.data, s.model, s.position),
    )


def close_call(session_id: str) -> Unary[None]:
    return Unary("CloseSession", pb.CloseSessionRequest(session_id=session_id), lambda _: None)


@contextmanager
def gone_ok() -> Iterator[None]:
    """Around closing a session: closing one that is gone already (expired) is not an error."""
    try:
        yield
    except ServerError as exc:
        if exc.code != "NOT_FOUND":
            raise


# ------------------------------------------------------------------------------ Generate
class Received:
    """What a Generate call has received so far: the state Generation and AsyncGeneration
    share (they differ in how the stream is read)."""

    def __init__(self, responses) -> None:
        self._responses = responses
        self.pieces: list[str] = []
        self.bits: list[float] = []
        self.finish_reason = ""
        self.position = 0

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def _take(self, r: pb.GenerateResponse) -> str:
        self.pieces.append(r.text)
        self.bits.extend(r.bits)
        self.position = r.position
        if r.finish_reason:
            self.finish_reason = FINISH[r.finish_reason]
        return r.text

    def _failed(self, exc: grpc.RpcError) -> None:
        """The stream ended with an error: after cancel() that is the end ("cancelled"),
        anything else is raised as ServerError."""
        if exc.code() == grpc.StatusCode.CANCELLED and self.finish_reason == "":
            self.finish_reason = "cancelled"
            return
        raise ServerError.of(exc) from None

    def cancel(self) -> None:
        self._responses.cancel()


# ------------------------------------------------------------------------------ the connection
class ClientBase(Generic[G]):
    """The connection to one server that both clients hold. A subclass names the grpc module
    its channel comes from (grpc or grpc.aio) and the class that reads a Generate stream."""

    grpc_module: Any  # grpc or grpc.aio
    generation: type[G]

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        api_key: str | None = None,
        tls: bool | TLS | None = None,
        timeout: float | None = None,
    ) -> None:
        self.target, self.timeout = target, timeout
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
        self._channel = channel(self.grpc_module, target, tls)
        self._tls = bool(tls)
        self._stub = pb_grpc.InferenceStub(self._channel)

    def _options(self, timeout: float | None) -> dict[str, Any]:
        """The keyword arguments of every stub call: the deadline and the API key."""
        return {"timeout": timeout or self.timeout, "metadata": self.metadata}

    def _glimpses(self, model: str, image, glimpses, session_id: str, timeout: float | None):
        """The ClassifyGlimpses response stream for an image or glimpses."""
        requests = glimpse_requests(model, image, glimpses, session_id)
        return self._stub.ClassifyGlimpses(iter(requests), **self._options(timeout))

    def generate(
        self,
        model: str,
        prompt: str = "",
        *,
        max_chars: int = 200,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.0,
        seed: int | None = None,
        stop: Iterable[str] = (),
        logprobs: bool = False,
        session_id: str = "",
        timeout: float | None = None,
    ) -> G:
        """Sample up to max_chars characters after `prompt` (temperature 0: greedy; top_k, top_p
        0: off); iterate the result for the pieces as they arrive."""
        request = generate_request(
            model, prompt, max_chars, temperature, top_k, top_p, seed, stop, logprobs, session_id
        )
        return self.generation(self._stub.Generate(request, **self._options(timeout)))


def channel(module, target: str, tls: bool | TLS | None):
    """A channel of grpc or grpc.aio (`module`) to `target`: plaintext, or TLS."""
    if not tls:
        return module.insecure_channel(target)
    from serving.auth import channel_credentials

    t = tls if isinstance(tls, TLS) else TLS()
    return module.secure_channel(target, channel_credentials(t.ca, t.cert, t.key))
