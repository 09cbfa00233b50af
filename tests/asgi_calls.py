"""Calling an ASGI application in the test process with a body in chunks, and its answer."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Exchange:
    """What one request sent and what it got back."""

    chunks: list[bytes]
    received: int = 0  # body messages taken from the server
    sent: list[dict[str, Any]] = field(default_factory=list)

    async def receive(self) -> dict[str, Any]:
        if self.received == len(self.chunks):
            return {"type": "http.disconnect"}
        self.received += 1
        more = self.received < len(self.chunks)
        return {"type": "http.request", "body": self.chunks[self.received - 1], "more_body": more}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.sent[0]["headers"]}

    @property
    def body(self) -> Any:
        return json.loads(b"".join(m.get("body", b"") for m in self.sent[1:]))


def scope(chunks: list[bytes], streamed: bool = False, method: str = "POST") -> dict[str, Any]:
    headers = [(b"content-type", b"application/json")]
    if streamed:
        headers.append((b"transfer-encoding", b"chunked"))
    elif chunks:
        headers.append((b"content-length", str(sum(map(len, chunks))).encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": "/predict",
        "raw_path": b"/predict",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
    }


def call(app: Any, chunks: list[bytes], streamed: bool = False) -> Exchange:
    exchange = Exchange(chunks)
    asyncio.run(app(scope(chunks, streamed), exchange.receive, exchange.send))
    return exchange
