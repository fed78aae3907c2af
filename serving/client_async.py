"""AsyncClient: the client of serving/client.py for asyncio code, with AsyncSession and
AsyncGeneration. The same calls as Client, as coroutines (`await client.score(...)`),
`generate` as an async iterator (`async for piece in client.generate(...)`) and
`async with client.session(...) as s`. Request building, results and errors are shared with
Client (serving/client_core.py, serving/client_types.py); this module only awaits. Import it
from serving.client. No torch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

import grpc
import grpc.aio

from serving import client_core as core
from serving.client_types import (
    Glimpse,
    ModelInfo,
    ScoreResult,
    ServerError,
    SessionInfo,
    Snapshot,
    glimpse_of,
)

T = TypeVar("T")


class AsyncGeneration(core.Received):
    """Generation for AsyncClient: `async for piece in ...`; `await result()`; the same
    fields and `cancel()`."""

    def __iter__(self):
        raise TypeError("an AsyncClient's generation is read with `async for`")

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for r in self._responses:
                yield self._take(r)
        except grpc.RpcError as exc:
            self._failed(exc)

    async def result(self) -> AsyncGeneration:
        async for _ in self:
            pass
        return self


class AsyncClient(core.ClientBase[AsyncGeneration]):
    """Client for asyncio code: the same calls as coroutines (see serving/client.py). Make
    it inside a running event loop; `await close()` it or use `async with`."""

    grpc_module = grpc.aio
    generation = AsyncGeneration

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _unary(self, call: core.Unary[T], timeout: float | None = None) -> T:
        try:
            response = await getattr(self._stub, call.method)(
                call.request, **self._options(timeout)
            )
        except grpc.RpcError as exc:
            raise ServerError.of(exc) from None
        return call.result(response)

    async def models(self) -> list[ModelInfo]:
        return await self._unary(core.models_call())

    async def score(
        self,
        model: str,
        text: str,
        *,
        per_char: bool = False,
        session_id: str = "",
        timeout: float | None = None,
    ) -> ScoreResult:
        return await self._unary(core.score_call(model, text, per_char, session_id), timeout)

    async def classify_stream(
        self,
        model: str,
        image=None,
        *,
        glimpses=None,
        session_id: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[Glimpse]:
        try:
            async for r in self._glimpses(model, image, glimpses, session_id, timeout):
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
        return await self._unary(core.session_info_call(session_id))

    async def attach(self, session_id: str) -> AsyncSession:
        return AsyncSession(self, await self.session_info(session_id))

    async def restore(self, snapshot: Snapshot | bytes) -> AsyncSession:
        return AsyncSession(self, await self._unary(core.restore_call(snapshot)))


class _Opening:
    def __init__(self, client: AsyncClient, model: str) -> None:
        self.client, self.model = client, model
        self.session: AsyncSession | None = None  # once entered

    async def _open(self) -> AsyncSession:
        return AsyncSession(
            self.client, await self.client._unary(core.create_session_call(self.model))
        )

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
        return AsyncSession(self.client, await self.client._unary(core.fork_call(self.id)))

    async def snapshot(self) -> Snapshot:
        return await self.client._unary(core.snapshot_call(self.id))

    async def close(self) -> None:
        with core.gone_ok():
            await self.client._unary(core.close_call(self.id))
