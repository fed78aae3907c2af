"""The Prometheus /metrics endpoint, served on the server's event loop.

prometheus_client's own server (`start_http_server`) bound 0.0.0.0 whatever `--host` said and
gave each connection a thread that waited for its request without a timeout: 100 idle
connections made 100 threads, held for good. Here a connection is a coroutine: it has
`REQUEST_TIMEOUT` seconds to send its request (of at most `MAX_REQUEST_BYTES`), gets one answer
and is closed (no keep-alive, so no connection idles after its answer), and at most
`MAX_CONNECTIONS` are open at once (more are closed at once). The exposition text is made in a
worker thread, so a scrape does not hold up the gRPC calls on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("nlstm.serving")

REQUEST_TIMEOUT = 10.0  # seconds a connection has to send its request line and headers
MAX_REQUEST_BYTES = 8 << 10
MAX_CONNECTIONS = 64


def listen_host(host: str) -> str | None:
    """An address as `--host` gives it (gRPC's form: "[::]" for every interface, "[::1]",
    "0.0.0.0", "localhost") as asyncio binds it: None for every interface (IPv4 and IPv6, as
    gRPC's "[::]" does), brackets dropped."""
    if host in ("", "[::]", "::", "*"):
        return None
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


class MetricsServer:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.open = 0  # connections being served
        self._writers: set[asyncio.StreamWriter] = set()
        self._servers: list[asyncio.Server] = []  # one per address

    def addresses(self) -> list[tuple[str, int]]:
        """(address, port) of every socket it listens on."""
        return [s.getsockname()[:2] for server in self._servers for s in server.sockets]

    @property
    def port(self) -> int:
        return self._servers[0].sockets[0].getsockname()[1] if self._servers else 0

    async def start(self, host: str, port: int) -> None:
        """Listen on `host` (gRPC's form, see listen_host) and `port` (0: a free one, the same on
        every address the host resolves to)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            listen_host(host), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        sockets: list[socket.socket] = []
        error: OSError | None = None
        for family, type_, proto, _, address in infos:
            if any(s.family == family and s.getsockname()[0] == address[0] for s in sockets):
                continue
            sock = socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:  # "::" and "0.0.0.0" both come: each its own socket
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                # port 0: the first socket picks a free port, the others take the same one
                sock.bind(
                    (
                        address[0],
                        port or (sockets[0].getsockname()[1] if sockets else 0),
                        *address[2:],
                    )
                )
            except OSError as exc:  # e.g. ::1 where IPv6 is off: serve on the other addresses
                sock.close()
                error = error or exc
                continue
            sockets.append(sock)
        if not sockets:
            raise error or OSError(f"{host!r} resolves to no address to bind")
        for sock in sockets:
            self._servers.append(
                await asyncio.start_server(self._serve, sock=sock, limit=MAX_REQUEST_BYTES)
            )

    async def close(self) -> None:
        """Stop listening and close the connections still open (a scrape in progress loses its
        answer: the process is exiting)."""
        for server in self._servers:
            server.close()
        for writer in list(self._writers):
            writer.close()
        for server in self._servers:
            # Python 3.12 waits here for every connection to end: they were closed just above
            try:
                await asyncio.wait_for(server.wait_closed(), 1.0)
            except TimeoutError:
                log.warning("the metrics endpoint did not close within 1 s")
        self._servers = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open >= MAX_CONNECTIONS:
            writer.close()
            return
        self.open += 1
        self._writers.add(writer)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except (
                TimeoutError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ConnectionError,
            ):
                return  # idle, cut short or too long: closed without an answer
            method, _, rest = head.partition(b" ")
            path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
            if method not in (b"GET", b"HEAD"):
                status, body, kind = b"405 Method Not Allowed", b"GET /metrics\n", b"text/plain"
            elif path not in (b"/metrics", b"/"):
                status, body, kind = b"404 Not Found", b"GET /metrics\n", b"text/plain"
            else:
                body = await asyncio.get_running_loop().run_in_executor(
                    None, generate_latest, self.registry
                )
                status, kind = b"200 OK", CONTENT_TYPE_LATEST.encode()
            writer.write(
                b"HTTP/1.1 "
                + status
                + b"\r\nContent-Type: "
                + kind
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + (body if method != b"HEAD" else b"")
            )
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self.open -= 1
            self._writers.discard(writer)
            writer.close()
