"""The Python client of an nlstm server: `Client` (blocking) and `AsyncClient` (asyncio), over
gRPC, with typed results. No torch.

    from serving.client import Client

    with Client("localhost:50051", api_key=None, tls=None) as client:
        for piece in client.generate("ptb-nlstm", "the company said ", max_chars=200, seed=1):
            print(piece, end="", flush=True)
        print(client.score("ptb-nlstm", "the stock rose").bits_per_char)
        print(client.classify("mnist-nlstm", image)[-1].predicted_class)   # image: (28, 28)
        with client.session("ptb-nlstm") as s:          # closed when the block ends
            s.generate("the company said ", max_chars=50).text
            other = s.fork()                             # a copy of the state, a session of its own
            snap = s.snapshot()                          # bytes: client.restore(snap) anywhere

AsyncClient has the same calls as coroutines (`await client.score(...)`), `generate` as an
async iterator and `async with client.session(...) as s`. A failed call raises ServerError
with the gRPC status code's name and the server's message (the results and ServerError are
defined in serving/client_types.py; what both clients share in serving/client_core.py,
AsyncClient itself in serving/client_async.py). `tls`: None or False for
plaintext, True for TLS trusting the system's roots, or TLS(ca=..., cert=..., key=...) for a
private CA and, with cert and key, mutual TLS. `api_key` is sent as `authorization: Bearer
KEY` with every call. The `nlstm generate|score|classify|session` commands are built on this
(serving/commands.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TypeVar

import grpc

from serving import client_core as core
from serving.client_async import AsyncClient, AsyncGeneration, AsyncSession
from serving.client_types import (
    TLS,
    Glimpse,
    ModelInfo,
    ScoreResult,
    ServerError,
    SessionInfo,
    Snapshot,
    glimpse_of,
)

# the results and settings are part of this module's interface, and so is AsyncClient
__all__ = [
    "TLS",
    "AsyncClient",
    "AsyncGeneration",
    "AsyncSession",
    "Client",
    "Generation",
    "Glimpse",
    "ModelInfo",
    "ScoreResult",
    "ServerError",
    "Session",
    "SessionInfo",
    "Snapshot",
]

T = TypeVar("T")


class Generation(core.Received):
    """A Generate call: iterate it for the text as it arrives (str pieces); afterwards (or
    at any time) `text` holds what came so far, `finish_reason` why it ended ("length",
    "stop", "cancelled"; "" until the end), `position` the sequence's position after the last
    piece, `bits` each character's -log2 p when logprobs was asked for. `cancel()` stops it."""

    def __iter__(self) -> Iterator[str]:
        try:
            for r in self._responses:
                yield self._take(r)
        except grpc.RpcError as exc:
            self._failed(exc)

    def result(self) -> Generation:
        """Read the rest of the stream; returns self."""
        for _ in self:
            pass
        return self


class Client(core.ClientBase[Generation]):
    """A blocking client of one server (see the module docstring). Thread-safe; close() it,
    or use it as a context manager."""

    grpc_module = grpc
    generation = Generation

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the server answers. OSError at once when the connection fails (nothing
        listens there), rather than after gRPC's reconnection backoff; after `timeout` seconds
        when something accepts the connection but does not answer."""
        settled = threading.Event()
        seen: list[grpc.ChannelConnectivity] = []
        ends = (
            grpc.ChannelConnectivity.READY,
            grpc.ChannelConnectivity.TRANSIENT_FAILURE,
            grpc.ChannelConnectivity.SHUTDOWN,
        )

        def watch(state: grpc.ChannelConnectivity) -> None:
            if state in ends:
                seen.append(state)
                settled.set()

        self._channel.subscribe(watch, try_to_connect=True)
        try:
            settled.wait(timeout)
        finally:
            self._channel.unsubscribe(watch)
        if seen and seen[0] == grpc.ChannelConnectivity.READY:
            return
        if self._tls:
            why = "over TLS: check the CA and the server's certificate, or whether it runs"
        elif seen:
            why = "the connection failed: nothing listens there"
        else:
            why = f"no answer within {timeout:g} s"
        raise OSError(f"no nlstm server answers at {self.target} ({why})")

    def _unary(self, call: core.Unary[T], timeout: float | None = None) -> T:
        try:
            response = getattr(self._stub, call.method)(call.request, **self._options(timeout))
        except grpc.RpcError as exc:
            raise ServerError.of(exc) from None
        return call.result(response)

    # -------------------------------------------------------------- calls
    def models(self) -> list[ModelInfo]:
        return self._unary(core.models_call())

    def score(
        self,
        model: str,
        text: str,
        *,
        per_char: bool = False,
        session_id: str = "",
        timeout: float | None = None,
    ) -> ScoreResult:
        """Bits per character of `text` (each character's too with per_char)."""
        return self._unary(core.score_call(model, text, per_char, session_id), timeout)

    def classify_stream(
        self,
        model: str,
        image=None,
        *,
        glimpses=None,
        session_id: str = "",
        timeout: float | None = None,
    ) -> Iterator[Glimpse]:
        """The classifier's answer after each glimpse, as it comes (see classify)."""
        try:
            for r in self._glimpses(model, image, glimpses, session_id, timeout):
                yield glimpse_of(r)
        except grpc.RpcError as exc:
            raise ServerError.of(exc) from None

    def classify(
        self,
        model: str,
        image=None,
        *,
        glimpses=None,
        session_id: str = "",
        timeout: float | None = None,
    ) -> list[Glimpse]:
        """Every glimpse's answer for an image (28, 28: uint8 0..255 or floats in [0, 1], read
        as its 20 glimpses) or for glimpses (rows of 49 floats); the last is the prediction."""
        return list(
            self.classify_stream(
                model, image, glimpses=glimpses, session_id=session_id, timeout=timeout
            )
        )

    # -------------------------------------------------------------- sessions
    def session(self, model: str) -> Session:
        """A new session on `model` (closed by `with ... as s:` at the block's end)."""
        return Session(self, self._unary(core.create_session_call(model)))

    def attach(self, session_id: str) -> Session:
        """An existing session, by id."""
        return Session(self, self.session_info(session_id))

    def session_info(self, session_id: str) -> SessionInfo:
        return self._unary(core.session_info_call(session_id))

    def restore(self, snapshot: Snapshot | bytes) -> Session:
        """A new session holding a snapshot's state (from this server or another running the
        same export of the model)."""
        return Session(self, self._unary(core.restore_call(snapshot)))


class Session:
    """A session on the server: calls on it continue from, and update, its state. `info` is
    what the server said when this object was made or last refreshed (refresh())."""

    def __init__(self, client: Client, info: SessionInfo) -> None:
        self.client, self.info = client, info
        self.id, self.model = info.session_id, info.model

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Session({self.id!r}, model={self.model!r})"

    def refresh(self) -> SessionInfo:
        self.info = self.client.session_info(self.id)
        return self.info

    @property
    def position(self) -> int:
        """The session's position now (asks the server)."""
        return self.refresh().position

    def generate(self, prompt: str = "", **options) -> Generation:
        return self.client.generate(self.model, prompt, session_id=self.id, **options)

    def score(self, text: str, **options) -> ScoreResult:
        return self.client.score(self.model, text, session_id=self.id, **options)

    def classify(self, image=None, **options) -> list[Glimpse]:
        return self.client.classify(self.model, image, session_id=self.id, **options)

    def fork(self) -> Session:
        """A new session with a copy of this one's state."""
        return Session(self.client, self.client._unary(core.fork_call(self.id)))

    def snapshot(self) -> Snapshot:
        return self.client._unary(core.snapshot_call(self.id))

    def close(self) -> None:
        """Free it on the server; closing one that is gone already (expired) is not an error."""
        with core.gone_ok():
            self.client._unary(core.close_call(self.id))
