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
defined in serving/client_types.py). `tls`: None or False for
plaintext, True for TLS trusting the system's roots, or TLS(ca=..., cert=..., key=...) for a
private CA and, with cert and key, mutual TLS. `api_key` is sent as `authorization: Bearer
KEY` with every call. The `nlstm generate|score|classify|session` commands are built on this
(serving/commands.py).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterable, Iterator

import grpc

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc
from serving.client_types import (  # the results and settings are part of this module's interface
    FINISH,
    TLS,
    Glimpse,
    ModelInfo,
    ScoreResult,
    ServerError,
    SessionInfo,
    Snapshot,
    generate_request,
    glimpse_of,
    glimpse_requests,
    model_info_of,
    score_of,
    session_info_of,
)


class _Received:
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

    def cancel(self) -> None:
        self._responses.cancel()


class Generation(_Received):
    """A Generate call: iterate it for the text as it arrives (str pieces); afterwards (or
    at any time) `text` holds what came so far, `finish_reason` why it ended ("length",
    "stop", "cancelled"; "" until the end), `position` the sequence's position after the last
    piece, `bits` each character's -log2 p when logprobs was asked for. `cancel()` stops it."""

    def __iter__(self) -> Iterator[str]:
        try:
            for r in self._responses:
                yield self._take(r)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and self.finish_reason == "":
                self.finish_reason = "cancelled"  # cancel() was called
                return
            raise ServerError.of(exc) from None

    def result(self) -> Generation:
        """Read the rest of the stream; returns self."""
        for _ in self:
            pass
        return self


# ------------------------------------------------------------------------------ blocking
class Client:
    """A blocking client of one server (see the module docstring). Thread-safe; close() it,
    or use it as a context manager."""

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
        self._channel = _channel(grpc, target, tls)
        self._tls = bool(tls)
        self._stub = pb_grpc.InferenceStub(self._channel)

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

    def _call(self, method: str, request, timeout: float | None = None):
        try:
            return getattr(self._stub, method)(
                request, timeout=timeout or self.timeout, metadata=self.metadata
            )
        except grpc.RpcError as exc:
            raise ServerError.of(exc) from None

    # -------------------------------------------------------------- calls
    def models(self) -> list[ModelInfo]:
        return [model_info_of(m) for m in self._call("ListModels", pb.ListModelsRequest()).models]

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
    ) -> Generation:
        """Sample up to max_chars characters after `prompt` (temperature 0: greedy; top_k, top_p
        0: off); iterate the result for the pieces as they arrive."""
        request = generate_request(
            model, prompt, max_chars, temperature, top_k, top_p, seed, stop, logprobs, session_id
        )
        return Generation(
            self._stub.Generate(request, timeout=timeout or self.timeout, metadata=self.metadata)
        )

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
        return score_of(
            self._call(
                "Score",
                pb.ScoreRequest(model=model, session_id=session_id, text=text, per_char=per_char),
                timeout,
            )
        )

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
        requests = glimpse_requests(model, image, glimpses, session_id)
        try:
            for r in self._stub.ClassifyGlimpses(
                iter(requests), timeout=timeout or self.timeout, metadata=self.metadata
            ):
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
        return Session(
            self, session_info_of(self._call("CreateSession", pb.CreateSessionRequest(model=model)))
        )

    def attach(self, session_id: str) -> Session:
        """An existing session, by id."""
        return Session(self, self.session_info(session_id))

    def session_info(self, session_id: str) -> SessionInfo:
        return session_info_of(
            self._call("GetSession", pb.GetSessionRequest(session_id=session_id))
        )

    def restore(self, snapshot: Snapshot | bytes) -> Session:
        """A new session holding a snapshot's state (from this server or another running the
        same export of the model)."""
        data = snapshot.data if isinstance(snapshot, Snapshot) else snapshot
        return Session(
            self, session_info_of(self._call("RestoreSession", pb.RestoreSessionRequest(data=data)))
        )


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
        return Session(
            self.client,
            session_info_of(
                self.client._call("ForkSession", pb.ForkSessionRequest(session_id=self.id))
            ),
        )

    def snapshot(self) -> Snapshot:
        s = self.client._call("SnapshotSession", pb.SnapshotSessionRequest(session_id=self.id))
        return Snapshot(s.data, s.model, s.position)

    def close(self) -> None:
        """Free it on the server; closing one that is gone already (expired) is not an error."""
        try:
            self.client._call("CloseSession", pb.CloseSessionRequest(session_id=self.id))
        except ServerError as exc:
            if exc.code != "NOT_FOUND":
                raise


# ------------------------------------------------------------------------------ asyncio
class AsyncGeneration(_Received):
    """Generation for AsyncClient: `async for piece in ...`; `await result()`; the same
    fields and `cancel()`."""

    def __iter__(self):
        raise TypeError("an AsyncClient's generation is read with `async for`")

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for r in self._responses:
                yield self._take(r)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and self.finish_reason == "":
                self.finish_reason = "cancelled"
                return
            raise ServerError.of(exc) from None

    async def result(self) -> AsyncGeneration:
        async for _ in self:
            pass
        return self


class AsyncClient:
    """Client for asyncio code: the same calls as coroutines (see the module docstring). Make
    it inside a running event loop; `await close()` it or use `async with`."""

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
        self._channel = _channel(grpc.aio, target, tls)
        self._stub = pb_grpc.InferenceStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: str, request, timeout: float | None = None):
        try:
            return await getattr(self._stub, method)(
                request, timeout=timeout or self.timeout, metadata=self.metadata
            )
        except grpc.RpcError as exc:
            raise ServerError.of(exc) from None

    async def models(self) -> list[ModelInfo]:
        return [
            model_info_of(m)
            for m in (await self._call("ListModels", pb.ListModelsRequest())).models
        ]

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
    ) -> AsyncGeneration:
        request = generate_request(
            model, prompt, max_chars, temperature, top_k, top_p, seed, stop, logprobs, session_id
        )
        return AsyncGeneration(
            self._stub.Generate(request, timeout=timeout or self.timeout, metadata=self.metadata)
        )

    async def score(
        self,
        model: str,
        text: str,
        *,
        per_char: bool = False,
        session_id: str = "",
        timeout: float | None = None,
    ) -> ScoreResult:
        return score_of(
            await self._call(
                "Score",
                pb.ScoreRequest(model=model, session_id=session_id, text=text, per_char=per_char),
                timeout,
            )
        )

    async def classify_stream(
        self,
        model: str,
        image=None,
        *,
        glimpses=None,
        session_id: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[Glimpse]:
        requests = glimpse_requests(model, image, glimpses, session_id)
        try:
            async for r in self._stub.ClassifyGlimpses(
                iter(requests), timeout=timeout or self.timeout, metadata=self.metadata
            ):
                yield glimpse_of(r)
        except grpc.RpcError as exc:
            raise ServerError.of(exc) from None

    async def classify(
        self,
        model: str,
        image=None,
        *,
        glimpses=None,
        session_id: str = "",
        timeout: float | None = None,
    ) -> list[Glimpse]:
        return [
            g
            async for g in self.classify_stream(
                model, image, glimpses=glimpses, session_id=session_id, timeout=timeout
            )
        ]

    def session(self, model: str) -> _Opening:
        """`s = await client.session(model)`, or `async with client.session(model) as s:`
        (closed at the block's end)."""
        return _Opening(self, model)

    async def session_info(self, session_id: str) -> SessionInfo:
        return session_info_of(
            await self._call("GetSession", pb.GetSessionRequest(session_id=session_id))
        )

    async def attach(self, session_id: str) -> AsyncSession:
        return AsyncSession(self, await self.session_info(session_id))

    async def restore(self, snapshot: Snapshot | bytes) -> AsyncSession:
        data = snapshot.data if isinstance(snapshot, Snapshot) else snapshot
        return AsyncSession(
            self,
            session_info_of(
                await self._call("RestoreSession", pb.RestoreSessionRequest(data=data))
            ),
        )


class _Opening:
    def __init__(self, client: AsyncClient, model: str) -> None:
        self.client, self.model = client, model
        self.session: AsyncSession | None = None  # once entered

    async def _open(self) -> AsyncSession:
        info = await self.client._call("CreateSession", pb.CreateSessionRequest(model=self.model))
        return AsyncSession(self.client, session_info_of(info))

    def __await__(self):
        return self._open().__await__()

    async def __aenter__(self) -> AsyncSession:
        self.session = session = await self._open()
        return session

    async def __aexit__(self, *exc) -> None:
        assert self.session is not None  # set by __aenter__
        await self.session.close()


class AsyncSession:
    """Session for AsyncClient: the same methods as coroutines (generate: an async iterator)."""

    def __init__(self, client: AsyncClient, info: SessionInfo) -> None:
        self.client, self.info = client, info
        self.id, self.model = info.session_id, info.model

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncSession({self.id!r}, model={self.model!r})"

    async def refresh(self) -> SessionInfo:
        self.info = await self.client.session_info(self.id)
        return self.info

    def generate(self, prompt: str = "", **options) -> AsyncGeneration:
        return self.client.generate(self.model, prompt, session_id=self.id, **options)

    async def score(self, text: str, **options) -> ScoreResult:
        return await self.client.score(self.model, text, session_id=self.id, **options)

    async def classify(self, image=None, **options) -> list[Glimpse]:
        return await self.client.classify(self.model, image, session_id=self.id, **options)

    async def fork(self) -> AsyncSession:
        info = await self.client._call("ForkSession", pb.ForkSessionRequest(session_id=self.id))
        return AsyncSession(self.client, session_info_of(info))

    async def snapshot(self) -> Snapshot:
        s = await self.client._call(
            "SnapshotSession", pb.SnapshotSessionRequest(session_id=self.id)
        )
        return Snapshot(s.data, s.model, s.position)

    async def close(self) -> None:
        try:
            await self.client._call("CloseSession", pb.CloseSessionRequest(session_id=self.id))
        except ServerError as exc:
            if exc.code != "NOT_FOUND":
                raise


def _channel(module, target: str, tls: bool | TLS | None):
    """A channel of grpc or grpc.aio (`module`) to `target`: plaintext, or TLS."""
    if not tls:
        return module.insecure_channel(target)
    from serving.auth import channel_credentials

    t = tls if isinstance(tls, TLS) else TLS()
    return module.secure_channel(target, channel_credentials(t.ca, t.cert, t.key))
