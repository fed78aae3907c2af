"""Who is calling: TLS credentials, API keys, and the per-client call rate.

`Gate` is a gRPC server interceptor in front of every service but health checking (which
stays open, so that load balancers and the Docker HEALTHCHECK need no key); build_server adds
it when there are API keys, a per-client rate or a per-client session bound:

- with API keys (`ApiKeys`, one key a line in a file), a call must carry the metadata
  `authorization: Bearer KEY`; one without it or with a key not in the file is refused with
  UNAUTHENTICATED before its request message is read (the refusal is a handler that never
  reads it), so an unauthenticated client cannot make the server unpack anything;
- every admitted call runs with its `Caller` in a context variable: the client is the key's
  fingerprint (never the key itself), or the peer's address without keys. The session store
  reads it (serving.sessions): sessions belong to the key that created them, and the
  per-client session bound counts by client;
- with a rate (`RateLimiter`), a client's calls beyond it get RESOURCE_EXHAUSTED.

TLS: `server_credentials` (a certificate and key, and a client CA for mutual TLS) and
`channel_credentials` for the clients.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import grpc

from serving.limits import RateLimiter

log = logging.getLogger("nlstm.serving")

OPEN_SERVICES = ("/grpc.health.v1.Health/",)  # need no key
MIN_KEY_CHARS, MAX_KEY_CHARS = 16, 256


@dataclass(frozen=True)
class Caller:
    """The client of the running call: `client` names it for sessions and quotas ("key:" and
    the first 16 hex digits of the key's SHA-256, or "peer:" and its address without the port);
    `private`: sessions belong to their creator (the server has API keys)."""

    client: str
    private: bool = False


ANONYMOUS = Caller("")
_CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("nlstm_caller", default=ANONYMOUS)


def current_caller() -> Caller:
    """The Caller of the call running in this task (ANONYMOUS outside a call)."""
    return _CALLER.get()


def peer_host(peer: str) -> str:
    """'ipv4:10.0.0.1:5000' -> 'ipv4:10.0.0.1', 'ipv6:%5B::1%5D:5000' -> 'ipv6:[::1]': a client's
    address without the port, which changes with every connection."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in address:
        address = address.rsplit(":", 1)[0]
    return f"{kind}:{unquote(address)}"  # grpc writes IPv6 brackets percent-encoded


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class ApiKeys:
    """The keys a server accepts, kept as SHA-256 digests (a lookup compares digests, not the
    keys, so its time says nothing about how much of a key was right)."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("no API keys given")
        self._digests = {hashlib.sha256(k.encode()).digest(): fingerprint(k) for k in keys}

    def __len__(self) -> int:
        return len(self._digests)

    @classmethod
    def from_file(cls, path: str | Path) -> ApiKeys:
        """One key a line; blank lines and lines starting with # are skipped. A key is 16 to 256
        visible ASCII characters (what gRPC metadata carries), no spaces."""
        path = Path(path)
        keys = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            key = line.strip()
            if not key or key.startswith("#"):
                continue
            if not (
                MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS and all(33 <= ord(c) <= 126 for c in key)
            ):
                # the line's number, never its content: it may be a key
                raise ValueError(
                    f"API keys file {path}, line {n}: a key is {MIN_KEY_CHARS} to {MAX_KEY_CHARS} "
                    "visible ASCII characters without spaces"
                )
            keys.append(key)
        if not keys:
            raise ValueError(f"API keys file {path} holds no keys (one a line; # starts a comment)")
        return cls(keys)

    def client_of(self, metadata) -> tuple[str | None, str]:
        """(the Caller.client of a call's metadata or None, why not)."""
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return (
                None,
                "this server needs an API key: send the metadata 'authorization: Bearer KEY'",
            )
        scheme, _, key = str(values[0]).partition(" ")
        fp = (
            self._digests.get(hashlib.sha256(key.strip().encode()).digest())
            if scheme.lower() == "bearer"
            else None
        )
        if fp is None:
            return (
                None,
                "the API key is not valid on this server (metadata 'authorization: Bearer KEY')",
            )
        return f"key:{fp}", ""


def _refusal(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that ends the call with `code` without reading its request: a stream handler
    serves a unary call as well on the wire, and reads nothing unless asked."""

    async def refuse(request_iterator, context):
        await context.abort(code, message)
        yield  # an async generator: never reached

    return grpc.stream_stream_rpc_method_handler(refuse)


def _admitting(handler: grpc.RpcMethodHandler, admit) -> grpc.RpcMethodHandler:
    """`handler` of the same kind, running `await admit(context)` first."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    # grpc's stubs type a handler's behaviours as optional synchronous callables; on grpc.aio
    # they are coroutine functions (unary responses) and async generators (streams).
    inner: Any
    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary

        async def unary(request, context):
            await admit(context)
            return await inner(request, context)

        kind = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )
        return kind(unary, **kwargs)
    inner = handler.unary_stream or handler.stream_stream

    async def stream(request, context):
        await admit(context)
        async for response in inner(request, context):
            yield response

    kind = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream
        else grpc.stream_stream_rpc_method_handler
    )
    return kind(stream, **kwargs)


class Gate(grpc.aio.ServerInterceptor):
    """API keys, the Caller of each call, the per-client rate (see the module docstring).
    With neither keys nor a rate, it only names the caller."""

    def __init__(self, keys: ApiKeys | None = None, rate: RateLimiter | None = None) -> None:
        self.keys, self.rate = keys, rate

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        client = None
        if self.keys is not None:
            client, why = self.keys.client_of(details.invocation_metadata)
            if client is None:
                return _refusal(grpc.StatusCode.UNAUTHENTICATED, why)
        rate = self.rate

        async def admit(context) -> None:
            caller = Caller(
                client or f"peer:{peer_host(context.peer())}", private=client is not None
            )
            if rate is not None and (wait := rate.allow(caller.client)):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, rate_refusal(rate, wait))
            run_as(caller)

        return _admitting(handler, admit)


def rate_refusal(rate: RateLimiter, wait: float) -> str:
    """Why a call over the per-client rate is refused (gRPC and serving.http say the same)."""
    return (
        f"this client started more than {rate.rate:g} calls per second, the server's per-client "
        f"rate limit (bursts of {rate.burst:g}); retry in {wait:.2f} s"
    )


def run_as(caller: Caller) -> None:
    """Make `caller` the Caller of the call running in this task: each call (a gRPC call, an
    HTTP request of serving.http) runs in its own task, whose context this sets: nothing to
    reset."""
    _CALLER.set(caller)


def _read_pem(path: str | Path, what: str) -> bytes:
    data = Path(path).read_bytes()
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} {path} is not in PEM format (-----BEGIN ...)")
    return data


def server_credentials(
    cert_file: str | Path, key_file: str | Path, client_ca_file: str | Path | None = None
) -> grpc.ServerCredentials:
    """TLS with this certificate chain and private key; with client_ca_file, mutual TLS: every
    client must present a certificate signed by that CA."""
    cert = _read_pem(cert_file, "TLS certificate")
    key = _read_pem(key_file, "TLS private key")
    ca = _read_pem(client_ca_file, "TLS client CA") if client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def channel_credentials(
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> grpc.ChannelCredentials:
    """TLS to a server whose certificate `ca_file` signed (None: the system's roots); with a
    client certificate and key for servers that ask for one (mutual TLS)."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(ca_file, "TLS CA") if ca_file else None,
        private_key=_read_pem(key_file, "TLS client key") if key_file else None,
        certificate_chain=_read_pem(cert_file, "TLS client certificate") if cert_file else None,
    )


def bearer(api_key: str | None) -> list[tuple[str, str]]:
    """Call metadata carrying `api_key` (none without one)."""
    return [("authorization", f"Bearer {api_key}")] if api_key else []
