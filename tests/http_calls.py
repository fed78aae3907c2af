"""Calls to a server's HTTP/JSON port for the tests (tests/test_http.py,
tests/test_http_servers.py): `Http` (status and JSON body, server-sent events, a stream left
open) and `parse_events`."""

from __future__ import annotations

import http.client
import json


class Http:
    """Calls to one server's HTTP port: (status, JSON body)."""

    def __init__(self, port: int, key: str | None = None, host: str = "localhost") -> None:
        self.host, self.port, self.key = host, port, key

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=60)

    def headers(self) -> dict:
        h = {"Content-Type": "application/json"}
        if self.key:
            h["Authorization"] = f"Bearer {self.key}"
        return h

    def call(self, method: str, path: str, body=None, raw: bytes | None = None) -> tuple[int, dict]:
        c = self.conn()
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        c.request(method, path, data, self.headers())
        r = c.getresponse()
        out = r.read()
        c.close()
        return r.status, json.loads(out)

    def open_stream(self, path: str, body: dict) -> tuple[http.client.HTTPConnection, object]:
        """A server-sent event stream left open once its first event has come: (connection,
        response), the rest of it to read (or the connection to close) by the caller."""
        c = self.conn()
        c.request("POST", path, json.dumps(body), self.headers())
        r = c.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")
        return c, r

    def events(self, path: str, body: dict) -> list[dict]:
        """The data of every server-sent event of a stream ("event" added when named)."""
        c = self.conn()
        c.request("POST", path, json.dumps(body).encode(), self.headers())
        r = c.getresponse()
        assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream", r.read()
        out = parse_events(r.read().decode())
        c.close()
        return out


def parse_events(text: str) -> list[dict]:
    out = []
    for block in text.split("\n\n"):
        if not block:
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        data = json.loads(fields["data"])
        if "event" in fields:
            data["event"] = fields["event"]
        out.append(data)
    return out
