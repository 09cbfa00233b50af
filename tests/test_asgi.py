"""ShedOnOutOfMemory driven as a raw ASGI app, and mounted in FastAPI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

import torchmemguard
from tests.asgi_calls import Exchange, call, scope
from torchmemguard.asgi import ShedOnOutOfMemory

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
CPU_OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8388608 bytes."


def raising(error: BaseException, read: bool = False) -> App:
    """An app that raises ``error``, after reading its whole body if ``read``."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while read and (await receive()).get("more_body"):
            pass
        raise error

    return app


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers 200 with the length of the body it read."""
    length = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        length += len(message["body"])
        if not message["more_body"]:
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps(length).encode()})


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    torchmemguard.install_metrics(registry)
    return registry


def refused(registry: CollectorRegistry, reason: str) -> float | None:
    return registry.get_sample_value("torchmemguard_requests_refused_total", {"reason": reason})


# ---------------------------------------------------------------------------
# Bodies too large


def test_body_declared_larger_than_the_limit_gets_413_without_the_app() -> None:
    ran = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        ran.append(scope)

    exchange = call(ShedOnOutOfMemory(app, max_body_bytes=10), [b"x" * 6, b"x" * 6])
    assert (exchange.status, ran) == (413, [])
    assert exchange.body == {"detail": "The request body is larger than 10 bytes"}
    assert exchange.received == 2, "the rest of the body was not read and dropped"


def test_streamed_body_past_the_limit_gets_413_and_the_app_reads_no_more() -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (message := await receive())["type"] == "http.request":
            seen.append(message)
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    chunks = [b"x" * 4] * 5
    exchange = call(ShedOnOutOfMemory(app, max_body_bytes=10), chunks, streamed=True)
    assert exchange.status == 413
    assert len(exchange.sent) == 2, f"the app's answer went out too: {exchange.sent}"
    assert [len(m["body"]) for m in seen] == [4, 4], "the app read past the limit"
    assert exchange.received == 5


def test_body_at_the_limit_goes_through() -> None:
    exchange = call(ShedOnOutOfMemory(echo, max_body_bytes="10B"), [b"x" * 4, b"x" * 6])
    assert (exchange.status, exchange.body) == (200, 10)


# ---------------------------------------------------------------------------
# Out of memory


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError(CPU_OOM),
        torchmemguard.OutOfMemoryError("even the smallest chunk ran out of memory"),
        ValueError("could not parse the body"),
    ],
    ids=["MemoryError", "torch OOM", "CPU allocator", "unrecovered", "chained"],
)
def test_out_of_memory_error_becomes_503_with_retry_after(error: BaseException) -> None:
    if isinstance(error, ValueError):
        error.__cause__ = MemoryError()
    exchange = call(ShedOnOutOfMemory(raising(error, read=True), retry_after=7), [b"{}"])
    assert exchange.status == 503
    assert exchange.headers["retry-after"] == "7"
    assert exchange.body == {"detail": "Out of memory for this request; retry after 7 s"}


def test_body_left_unread_by_the_app_is_read_before_the_503() -> None:
    exchange = call(ShedOnOutOfMemory(raising(MemoryError())), [b"ab", b"cd", b"ef"])
    assert (exchange.status, exchange.received) == (503, 3)


def test_other_exception_passes_through_untouched() -> None:
    error = KeyError("token_ids")
    with pytest.raises(KeyError) as raised:
        call(ShedOnOutOfMemory(raising(error)), [b"{}"])
    assert raised.value is error


def test_out_of_memory_after_the_response_started_is_raised_again() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise MemoryError

    exchange = Exchange([b"{}"])
    with pytest.raises(MemoryError):
        asyncio.run(ShedOnOutOfMemory(app)(scope([b"{}"]), exchange.receive, exchange.send))
    assert [m["type"] for m in exchange.sent] == ["http.response.start"]


def test_scope_other_than_http_passes_through() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])
        raise MemoryError

    with pytest.raises(MemoryError):
        asyncio.run(ShedOnOutOfMemory(app)({"type": "lifespan"}, None, None))
    assert seen == ["lifespan"]


def test_refusals_are_counted_by_reason(registry: CollectorRegistry) -> None:
    assert refused(registry, "out_of_memory") == 0
    call(ShedOnOutOfMemory(raising(MemoryError())), [b"{}"])
    call(ShedOnOutOfMemory(raising(MemoryError())), [b"{}"])
    call(ShedOnOutOfMemory(echo, max_body_bytes=1), [b"{}"])
    call(ShedOnOutOfMemory(echo, max_body_bytes=1), [b"{}"])
    call(ShedOnOutOfMemory(echo, max_body_bytes=1), [b"{}"], streamed=True)
    assert refused(registry, "out_of_memory") == 2
    assert refused(registry, "body_too_large") == 3
    assert refused(registry, "no_room") == 0


def test_a_full_batcher_queue_becomes_503_counted_as_no_room(registry: CollectorRegistry) -> None:
    batcher = torchmemguard.Batcher(torch.nn.Identity(), max_wait=0.2, max_queue=1)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await batcher(torch.zeros(1, 3))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def both() -> list[Exchange]:
        middleware = ShedOnOutOfMemory(app, retry_after=2)
        exchanges = [Exchange([b"{}"]), Exchange([b"{}"])]
        await asyncio.gather(*(middleware(scope(e.chunks), e.receive, e.send) for e in exchanges))
        return exchanges

    try:
        first, second = asyncio.run(both())
    finally:
        batcher.close()
    assert first.status == 200
    assert (second.status, second.headers["retry-after"]) == (503, "2")
    assert second.body == {"detail": "Too many requests waiting for a batch; retry after 2 s"}
    assert refused(registry, "no_room") == 1


# ---------------------------------------------------------------------------
# Admission by body size


async def _concurrently(
    middleware: ShedOnOutOfMemory, bodies: list[int], log: list[str], release: asyncio.Event
) -> list[Exchange]:
    exchanges = [Exchange([b"x" * size]) for size in bodies]
    tasks = []
    for exchange in exchanges:
        tasks.append(
            asyncio.create_task(middleware(scope(exchange.chunks), exchange.receive, exchange.send))
        )
        await asyncio.sleep(0)  # they arrive in this order
    await asyncio.sleep(0.05)
    log.append("released")
    release.set()
    await asyncio.gather(*tasks)
    return exchanges


def test_requests_past_the_allowance_wait_their_turn_in_arrival_order() -> None:
    log: list[str] = []

    async def run() -> list[Exchange]:
        release = asyncio.Event()

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            body = (await receive())["body"]
            log.append(f"in {len(body)}")
            await release.wait()
            await echo(scope, lambda: asyncio.sleep(0, {"type": "http.disconnect"}), send)

        middleware = ShedOnOutOfMemory(app, max_bytes_in_flight=10)
        return await _concurrently(middleware, [6, 4, 8, 1, 30], log, release)

    exchanges = asyncio.run(run())
    assert [e.status for e in exchanges] == [200] * 5
    # 6 and 4 fill the allowance; 8 waits for room, and 1 behind it; 30 goes in alone.
    assert log == ["in 6", "in 4", "released", "in 8", "in 1", "in 30"]


def test_request_that_waits_too_long_gets_503_and_the_next_ones_go_in() -> None:
    log: list[str] = []

    async def run() -> list[Exchange]:
        release = asyncio.Event()

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            body = (await receive())["body"]
            log.append(f"in {len(body)}")
            if len(body) == 9:
                await release.wait()
            await echo(scope, lambda: asyncio.sleep(0, {"type": "http.disconnect"}), send)

        middleware = ShedOnOutOfMemory(app, max_bytes_in_flight=10, max_wait=0.01, retry_after=3)
        return await _concurrently(middleware, [9, 5], log, release)

    first, second = asyncio.run(run())
    assert (first.status, second.status) == (200, 503)
    assert second.headers["retry-after"] == "3"
    assert second.body == {"detail": "No room for this request in 0.01 s; retry after 3 s"}
    assert second.received == 1, "the body of the refused request was not read"
    assert log == ["in 9", "released"]


def test_request_without_a_body_never_waits() -> None:
    async def run() -> int:
        release = asyncio.Event()

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["method"] == "POST":
                await release.wait()
            await echo(scope, lambda: asyncio.sleep(0, {"type": "http.disconnect"}), send)

        middleware = ShedOnOutOfMemory(app, max_bytes_in_flight=1, max_wait=5)
        post = Exchange([b"xx"])
        waiting = asyncio.create_task(middleware(scope([b"xx"]), post.receive, post.send))
        await asyncio.sleep(0)
        get = Exchange([])
        await asyncio.wait_for(middleware(scope([], method="GET"), get.receive, get.send), 1)
        release.set()
        await waiting
        return get.status

    assert asyncio.run(run()) == 200


# ---------------------------------------------------------------------------
# Its arguments


def test_bad_arguments_are_all_named_with_their_values() -> None:
    with pytest.raises(TypeError) as raised:
        ShedOnOutOfMemory(
            echo, retry_after=1.5, max_body_bytes=[1], max_bytes_in_flight="-1MiB", max_wait="10"
        )  # type: ignore[arg-type]
    message = str(raised.value)
    assert "retry_after must be an int of seconds, got 1.5" in message
    assert "max_body_bytes must be an int or a size string" in message
    assert "max_bytes_in_flight='-1MiB' must be a positive number of bytes" in message
    assert "max_wait must be a number of seconds, got '10'" in message


def test_values_out_of_range_are_a_value_error() -> None:
    with pytest.raises(
        ValueError,
        match=r"retry_after must be at least 0 seconds, got -1.*"
        r"max_body_bytes='lots' is not a size.*max_wait must be a positive, "
        r"finite number of seconds, got inf",
    ):
        ShedOnOutOfMemory(echo, retry_after=-1, max_body_bytes="lots", max_wait=float("inf"))


# ---------------------------------------------------------------------------
# In FastAPI


def _fastapi_app(error: BaseException) -> Any:
    fastapi = pytest.importorskip("fastapi")
    app = fastapi.FastAPI()

    @app.post("/predict")
    async def predict() -> None:
        raise error

    return app


def test_fastapi_app_with_the_middleware_added_answers_503() -> None:
    app = _fastapi_app(MemoryError())
    app.add_middleware(ShedOnOutOfMemory, retry_after=2)
    exchange = call(app, [b"{}"])
    assert (exchange.status, exchange.headers["retry-after"]) == (503, "2")


def test_fastapi_app_wrapped_from_outside_has_already_answered_500() -> None:
    # FastAPI's outermost layer sends the 500 before it raises the error again:
    # the middleware must be added inside, with add_middleware.
    exchange = Exchange([b"{}"])
    app = ShedOnOutOfMemory(_fastapi_app(MemoryError()))
    with pytest.raises(MemoryError):
        asyncio.run(app(scope([b"{}"]), exchange.receive, exchange.send))
    assert exchange.status == 500
