"""An ASGI middleware that answers 503 instead of failing when a request runs out of memory.

Pure ASGI: it imports no web framework. In FastAPI or Starlette, add it with
``app.add_middleware(ShedOnOutOfMemory, ...)``, which puts it inside the
framework's outermost layer, the one that turns an unhandled exception into a
500: it sees the error first. Around any other ASGI application, wrap it:
``app = ShedOnOutOfMemory(app, ...)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from torchmemguard._classify import is_oom
from torchmemguard._errors import QueueFullError, gathered, raise_bad_arguments
from torchmemguard._observability import metrics
from torchmemguard._serving.admission import Admission
from torchmemguard._units import parse_size

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("torchmemguard")

_DISCONNECT: Message = {"type": "http.disconnect"}


class _Answer:
    """A response built once, so that sending it under memory pressure allocates little."""

    def __init__(self, status: int, detail: str, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.body = json.dumps({"detail": detail}).encode()
        self.headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.body)).encode()),
            *headers,
        ]

    async def send(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


class ShedOnOutOfMemory:
    """Answer 503 and ``Retry-After`` to a request that runs out of memory; 413 to a large body.

    Any exception of the app for which :func:`torchmemguard.is_oom` is true
    (``MemoryError``, a torch out-of-memory error, ``torchmemguard.OutOfMemoryError``,
    or one of them in the chain) becomes a 503, if the app had not started its
    response; otherwise it is raised again. So does a
    :class:`torchmemguard.QueueFullError` of a full :class:`torchmemguard.Batcher`
    (counted as ``no_room``). Every other exception passes
    through untouched.

    ``retry_after``: the seconds a client should wait before trying again,
    sent in the 503's ``Retry-After`` header.

    ``max_body_bytes``: the largest request body let through (an int, or a size
    such as ``"1MiB"``); ``None``, any. A larger ``Content-Length`` gets a 413
    before the app runs; a streamed body gets it as soon as it passes the
    limit, and the app reads no more of it.

    ``max_bytes_in_flight``: the bodies of the requests let in at once, in
    bytes, by their ``Content-Length`` (a streamed body counts as
    ``max_body_bytes``). A request that does not fit waits its turn, first come,
    first served, for up to ``max_wait`` seconds, and then gets a 503. A body
    larger than the whole allowance goes in alone. ``None``, no waiting. It needs
    an asyncio event loop.

    Before any answer of its own, the middleware reads the rest of the body and
    drops it, so that a client that sends its whole body before reading the
    answer gets the answer rather than a reset connection. Each refused request
    counts in ``torchmemguard_requests_refused_total``, by reason, once
    :func:`torchmemguard.install_metrics` has been called.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        retry_after: int = 1,
        max_body_bytes: int | str | None = None,
        max_bytes_in_flight: int | str | None = None,
        max_wait: float = 10.0,
    ) -> None:
        wrong_type: list[str] = []
        wrong_value: list[str] = []
        if not callable(app):
            wrong_type.append(f"app must be an ASGI application (a callable), got {app!r}")
        if isinstance(retry_after, bool) or not isinstance(retry_after, int):
            wrong_type.append(f"retry_after must be an int of seconds, got {retry_after!r}")
        elif retry_after < 0:
            wrong_value.append(f"retry_after must be at least 0 seconds, got {retry_after!r}")
        sizes: dict[str, int | None] = {}
        for name, size in (
            ("max_body_bytes", max_body_bytes),
            ("max_bytes_in_flight", max_bytes_in_flight),
        ):
            sizes[name] = (
                None if size is None else gathered(wrong_type, wrong_value, parse_size, size, name)
            )
        if isinstance(max_wait, bool) or not isinstance(max_wait, int | float):
            wrong_type.append(f"max_wait must be a number of seconds, got {max_wait!r}")
        elif not (0 < max_wait < math.inf):
            wrong_value.append(
                f"max_wait must be a positive, finite number of seconds, got {max_wait!r}"
            )
        raise_bad_arguments(wrong_type, wrong_value)

        self.app = app
        self.retry_after = retry_after
        self.max_body_bytes = sizes["max_body_bytes"]
        self.max_wait = float(max_wait)
        in_flight = sizes["max_bytes_in_flight"]
        self.admission = None if in_flight is None else Admission(in_flight)
        retry = [(b"retry-after", str(retry_after).encode())]
        self._out_of_memory = _Answer(
            503, f"Out of memory for this request; retry after {retry_after} s", retry
        )
        self._busy = _Answer(
            503, f"No room for this request in {max_wait:g} s; retry after {retry_after} s", retry
        )
        self._queue_full = _Answer(
            503, f"Too many requests waiting for a batch; retry after {retry_after} s", retry
        )
        self._too_large = _Answer(
            413, f"The request body is larger than {self.max_body_bytes} bytes", []
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(receive, send, self.max_body_bytes, self._too_large)
        length, streamed = _body_length(scope)
        if self.max_body_bytes is not None and length is not None and length > self.max_body_bytes:
            await exchange.refuse(self._too_large, "body_too_large")
            return
        size = length or 0
        if streamed:
            size = self.max_body_bytes or (self.admission.allowance if self.admission else 0)
        if self.admission is None or size == 0:
            await self._serve(scope, exchange)
            return
        share = self.admission.share(size)
        if not await self.admission.acquire(share, self.max_wait):
            await exchange.refuse(self._busy, "no_room")
            return
        try:
            await self._serve(scope, exchange)
        finally:
            self.admission.release(share)

    async def _serve(self, scope: Scope, exchange: _Exchange) -> None:
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except Exception as exc:
            if exchange.refused:  # our 413 went out: what the app did after it is moot
                return
            full = isinstance(exc, QueueFullError)
            if exchange.started or not (full or is_oom(exc)):
                raise
            error = type(exc).__name__
        else:
            return
        # Out of the except block: the error, its traceback and the frames that
        # held the request's memory are gone before anything more is allocated.
        with contextlib.suppress(MemoryError):
            logger.warning("%s in %s %s: answered 503", error, scope["method"], scope["path"])
        if full:
            await exchange.refuse(self._queue_full, "no_room")
        else:
            await exchange.refuse(self._out_of_memory, "out_of_memory")


class _Exchange:
    """One request's ``receive`` and ``send`` as the app sees them: body counted, answer watched."""

    def __init__(self, receive: Receive, send: Send, limit: int | None, too_large: _Answer) -> None:
        self._receive = receive
        self._send = send
        self._limit = limit
        self._too_large = too_large
        self._received = 0
        self._body_read = False
        self.started = False
        self.refused = False

    async def receive(self) -> Message:
        if self.refused:
            return _DISCONNECT
        message = await self._receive()
        if message["type"] != "http.request":
            self._body_read = True
            return message
        self._received += len(message.get("body", b""))
        self._body_read = not message.get("more_body", False)
        if self._limit is None or self._received <= self._limit:
            return message
        del message
        if not self.started:
            await self.refuse(self._too_large, "body_too_large")
        return _DISCONNECT

    async def send(self, message: Message) -> None:
        if self.refused:
            return
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)

    async def refuse(self, answer: _Answer, reason: metrics.RefusalReason) -> None:
        """Read what is left of the body, drop it, send ``answer`` and count it."""
        self.refused = True
        with contextlib.suppress(MemoryError):  # then answer without reading the rest
            while not self._body_read:
                message = await self._receive()
                self._body_read = message["type"] != "http.request" or not message.get(
                    "more_body", False
                )
                del message
        await answer.send(self._send)
        metrics.count_refused(reason)


def _body_length(scope: Scope) -> tuple[int | None, bool]:
    """The request's ``Content-Length``, or None; and whether its body is streamed without one."""
    streamed = False
    for name, value in scope.get("headers", ()):
        name = name.lower()
        if name == b"content-length":
            with contextlib.suppress(ValueError):
                return int(value), False
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            streamed = True
    return None, streamed
