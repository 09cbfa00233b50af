"""Fill what fits: gather requests that come one at a time into batches that memory holds.

Requests wait in groups, one per key (by default the exact shapes of the
request's tensors beyond their rows). A group runs when its rows reach what
the guard expects to fit for that shape (its learned limit, or what the room
holds at the measured cost; ``max_batch`` where nothing was learned), or when
its oldest request has waited ``max_wait`` seconds, whichever comes first. One
batch runs at a time, under the guard, on the batcher's own thread, so that
the event loop goes on gathering the next one; each request gets its own rows
of the output back.

Batching assumes what splitting assumes: each row's output depends on that row
alone. The first batch of several requests of each key checks it once, by
running its first request again on its own; where they differ, the batcher
warns once and runs every request on its own from then on, so that no answer
depends on the requests it was batched with.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from torchmemguard._decorators import guard as guard_module
from torchmemguard._decorators import is_coroutine_callable, oom_safe
from torchmemguard._errors import (
    BatchError,
    BatchTypeError,
    MergeError,
    OutOfMemoryError,
    QueueFullError,
    SplitRefusedError,
    check_int,
    raise_bad_arguments,
)
from torchmemguard._guarded import Guard
from torchmemguard._independence import Checked, compute_dtypes, difference
from torchmemguard._merging import Merger
from torchmemguard._structures import children, cloned, labels, split

logger = logging.getLogger("torchmemguard")

Request = torch.Tensor | Mapping[str, torch.Tensor]
# The shapes of a request's tensors beyond their rows: (name, shape, dtype, device) each.
Signature = tuple[tuple[Any, tuple[int, ...], torch.dtype, torch.device], ...]


@dataclass(eq=False)
class _Waiting:
    """One request in its group, until its batch is taken."""

    request: Request
    rows: int
    future: asyncio.Future[Any]
    since: float  # the loop's time when it came
    queued: bool = True


@dataclass(eq=False)
class _Group:
    """The waiting requests of one key."""

    signature: Signature
    target: int  # the rows a batch of this key may hold
    waiting: collections.deque[_Waiting] = field(default_factory=collections.deque)
    rows: int = 0


class _Coupled(Exception):
    """A batch's rows differ from the same request run on its own."""

    def __init__(self, found: str, alone: Any) -> None:
        super().__init__(found)
        self.alone = alone


class Batcher:
    """Gather requests that come one at a time into batches of what fits, and answer each
    with its own rows: ``output = await batcher(request)``.

    ``fn`` is the model: a module or a sync callable, guarded with
    :func:`~torchmemguard.guard` or :func:`~torchmemguard.oom_safe` (it is
    guarded here, with the default options, if it is not). A request is a
    batch of its own: a tensor whose first dimension counts its rows (1 for one
    sample), called as ``fn(batch)``, or a mapping of such tensors with the
    same rows (a tokenizer's output), called as ``fn(**batch)``, under
    ``torch.inference_mode()``. Each request
    gets the rows of the output that its own rows made: every tensor of the
    output must have the batch's rows first, and every list one item per row.

    Args:
        max_wait: seconds the oldest request of a group waits for more before its
            group runs anyway.
        max_batch: the most rows of one batch; the batch size while nothing learned
            says what fits.
        max_queue: the most requests waiting at once; past it a request raises
            :class:`~torchmemguard.QueueFullError` (a 503 under
            :class:`~torchmemguard.asgi.ShedOnOutOfMemory`).
        key: ``key(request)`` names a request's group; by default, the shapes,
            dtypes and devices of its tensors beyond their rows.
        pad: ``pad(request, key)`` makes a request the shape of its group before it
            waits (for example, to its length bucket with an attention mask that
            leaves the padding out). After it, every request of a key must have
            the same shapes beyond its rows; one that does not gets a
            :class:`~torchmemguard.BatchError` of its own.

    A request's own problems (not a tensor or mapping of tensors, a shape that
    its key's group cannot take, a full queue) raise at once, for it alone.
    An error of the model in a batch of several requests runs each of them
    again on its own, so that only the request that causes it gets it; a
    :class:`~torchmemguard.OutOfMemoryError` reaches every request of its
    batch. A request cancelled while it waits leaves its group. Call
    :meth:`close` when the service stops.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        max_wait: float = 0.005,
        max_batch: int = 64,
        max_queue: int = 1024,
        key: Callable[[Request], Hashable] | None = None,
        pad: Callable[[Request, Hashable], Request] | None = None,
    ) -> None:
        wrong_type: list[str] = []
        wrong_value: list[str] = []
        if not callable(fn):
            wrong_type.append(f"fn must be a module or a callable, got {fn!r}")
        elif is_coroutine_callable(fn):
            wrong_type.append(
                f"fn must be a sync callable (the batcher runs it on a thread), got {fn!r}"
            )
        if isinstance(max_wait, bool) or not isinstance(max_wait, int | float):
            wrong_type.append(f"max_wait must be a number of seconds, got {max_wait!r}")
        elif not 0 <= max_wait < float("inf"):
            wrong_value.append(f"max_wait must be at least 0 seconds, got {max_wait!r}")
        check_int("max_batch", max_batch, 1, wrong_type, wrong_value)
        check_int("max_queue", max_queue, 1, wrong_type, wrong_value)
        for name, value in (("key", key), ("pad", pad)):
            if value is not None and not callable(value):
                wrong_type.append(f"{name} must be a callable or None, got {value!r}")
        raise_bad_arguments(wrong_type, wrong_value)
        self.fn, self._guard = _guarded(fn)
        # The instance of a guarded method reached through it, which the guard's memory
        # keys its sizes by.
        self._instance = getattr(self.fn, "_self_instance", None)
        self.max_wait = float(max_wait)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._key = key
        self._pad = pad
        self._groups: dict[Hashable, _Group] = {}
        self._queued = 0  # requests waiting, in every group
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._checked = Checked()  # keys whose rows were checked in a batch
        self._alone = False  # rows depend on each other: one request per batch
        self._closed = False
        # Started now, not with the first request: a thread started under a memory cap
        # maps its stack out of the memory the model needs.
        self._worker = concurrent.futures.ThreadPoolExecutor(1, "torchmemguard-batcher")
        self._worker.submit(threading.get_ident).result()

    async def __call__(self, request: Request) -> Any:
        """The output rows of ``request``, once its batch ran."""
        if self._closed:
            raise RuntimeError("the batcher was closed")
        rows, signature = _described(request, "request")
        key = signature if self._key is None else self._key(request)
        if self._pad is not None:
            request = self._pad(request, key)
            rows, signature = _described(request, "the padded request")
        if self._queued >= self.max_queue:
            raise QueueFullError(
                f"{self.max_queue} requests are already waiting (max_queue={self.max_queue}); "
                "retry later, or serve fewer requests at once"
            )
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(signature, self._target(request))
        elif group.signature != signature:
            raise BatchError(
                f"a request of key {key!r} has the shapes {_shapes(signature)} beyond its rows, "
                f"and the requests waiting with that key {_shapes(group.signature)}; key= and "
                "pad= must give every request of a key the same shapes"
            )
        loop = asyncio.get_running_loop()
        waiting = _Waiting(request, rows, loop.create_future(), loop.time())
        group.waiting.append(waiting)
        group.rows += rows
        self._queued += 1
        waiting.future.add_done_callback(lambda _: self._leave(key, group, waiting))
        self._start(loop)
        return await waiting.future

    def close(self) -> None:
        """Fail the requests still waiting, and stop the batcher's thread once the batch
        under way has run."""
        self._closed = True
        for group in self._groups.values():
            for waiting in group.waiting:
                if not waiting.future.done():
                    waiting.future.set_exception(RuntimeError("the batcher was closed"))
        self._worker.shutdown(wait=True)

    def _target(self, request: Request) -> int:
        """The rows a batch of requests like ``request`` may hold."""
        if self._alone:
            return 1
        if isinstance(request, torch.Tensor):
            return self._guard.holds(self._instance, (request,), {}, self.max_batch)
        return self._guard.holds(self._instance, (), dict(request), self.max_batch)

    def _leave(self, key: Hashable, group: _Group, waiting: _Waiting) -> None:
        """A request's future is done: one cancelled while it waits leaves its group."""
        if not waiting.queued:
            return
        waiting.queued = False
        group.waiting.remove(waiting)
        group.rows -= waiting.rows
        self._queued -= 1
        if not group.waiting and self._groups.get(key) is group:
            del self._groups[key]

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._serve())
        elif self._wake is not None:
            self._wake.set()

    async def _serve(self) -> None:
        """Run the groups as they become ready, one batch at a time, until none waits."""
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while self._groups and not self._closed:
            key, wait = self._ready(loop.time())
            if key is None:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            batch = self._take(key)
            if batch:
                await self._run(key, batch)

    def _ready(self, now: float) -> tuple[Hashable | None, float]:
        """The key of the ready group whose oldest request came first, if any; else how
        long until the first group's wait ends."""
        ready, first, wait = None, float("inf"), float("inf")
        for key, group in self._groups.items():
            since = group.waiting[0].since
            if group.rows >= group.target or now - since >= self.max_wait:
                if since < first:
                    ready, first = key, since
            else:
                wait = min(wait, since + self.max_wait - now)
        return ready, wait

    def _take(self, key: Hashable) -> list[_Waiting]:
        """The oldest requests of group ``key`` that fit in one batch (at least one)."""
        group = self._groups[key]
        batch: list[_Waiting] = []
        rows = 0
        while group.waiting:
            waiting = group.waiting[0]
            if batch and rows + waiting.rows > group.target:
                break
            group.waiting.popleft()
            group.rows -= waiting.rows
            self._queued -= 1
            waiting.queued = False
            if not waiting.future.done():  # else cancelled a moment ago
                batch.append(waiting)
                rows += waiting.rows
        if not group.waiting:
            del self._groups[key]
        return batch

    async def _run(self, key: Hashable, batch: list[_Waiting]) -> None:
        """Run one batch on the worker and answer its requests."""
        loop = asyncio.get_running_loop()
        check = len(batch) > 1 and key not in self._checked
        try:
            answers = await loop.run_in_executor(self._worker, self._answers, batch, check)
        except _Coupled as coupled:
            self._refuse_batching(str(coupled))
            _answer(batch[0], coupled.alone)
            await self._one_by_one(batch[1:])
            return
        except Exception as exc:
            if len(batch) == 1 or _final(exc):
                for waiting in batch:
                    _fail(waiting, exc)
            else:  # only the request that causes it gets it
                await self._one_by_one(batch)
            return
        finally:
            if key in self._groups:  # what fits may have changed with this batch
                group = self._groups[key]
                group.target = self._target(group.waiting[0].request)
        if check:
            self._checked.add(key)
        for waiting, answer in zip(batch, answers, strict=True):
            _answer(waiting, answer)

    async def _one_by_one(self, batch: list[_Waiting]) -> None:
        loop = asyncio.get_running_loop()
        for waiting in batch:
            try:
                answers = await loop.run_in_executor(self._worker, self._answers, [waiting], False)
            except Exception as exc:
                _fail(waiting, exc)
            else:
                _answer(waiting, answers[0])

    def _answers(self, batch: list[_Waiting], check: bool) -> list[Any]:
        """On the worker: the output rows of each request, run as one batch; with
        ``check``, the first request is run again on its own and compared."""
        requests = [waiting.request for waiting in batch]
        n = sum(waiting.rows for waiting in batch)
        output = self._call(_joined(requests))
        _check_rows(output, n, "output")
        if check:
            alone = self._call(cloned(requests[0]))
            dtypes = compute_dtypes(_device(requests[0]), self._guard.module)
            found = difference(alone, output, 0, Merger(), dtypes)
            if found is not None:
                raise _Coupled(found, alone)
        answers, start = [], 0
        for waiting in batch:
            answers.append(split(output, n, start, start + waiting.rows, path="output"))
            start += waiting.rows
        return answers

    def _call(self, batch: Request) -> Any:
        with torch.inference_mode():
            if isinstance(batch, torch.Tensor):
                return self.fn(batch)
            return self.fn(**batch)

    def _refuse_batching(self, found: str) -> None:
        self._alone = True
        for group in self._groups.values():
            group.target = 1
        logger.warning(
            "%s answers differently in a batch than alone (%s): its rows depend on each "
            "other, so the batcher runs every request on its own from now on.",
            self._guard.name,
            found,
        )


def _guarded(fn: Callable[..., Any]) -> tuple[Callable[..., Any], Guard]:
    """``fn`` and its guard; guarded here if it was not."""
    found = getattr(fn, "_self_guard", None)
    if isinstance(found, Guard):
        return fn, found
    guarded = guard_module(fn) if isinstance(fn, torch.nn.Module) else oom_safe(fn)
    return guarded, guarded._self_guard  # type: ignore[attr-defined]


def _described(request: object, name: str) -> tuple[int, Signature]:
    """The rows of ``request`` and its shapes beyond them; a BatchError (a BatchTypeError
    for a value of another type) names every problem."""
    if isinstance(request, torch.Tensor):
        items: list[tuple[Any, object]] = [(None, request)]
    elif isinstance(request, Mapping) and request:
        items = list(request.items())
    else:
        raise BatchTypeError(
            f"{name} must be a tensor or a non-empty mapping of tensors, got {request!r:.200}"
        )
    wrong_type, wrong_value, found = [], [], set()
    for label, value in items:
        where = name if label is None else f"{name}[{label!r}]"
        if not isinstance(value, torch.Tensor):
            wrong_type.append(f"{where} is a {type(value).__name__}, not a tensor")
        elif value.dim() == 0 or value.shape[0] == 0:
            wrong_value.append(f"{where} has no rows (shape {tuple(value.shape)})")
        else:
            found.add(value.shape[0])
    if len(found) > 1:
        wrong_value.append(f"the tensors of {name} have different rows: {sorted(found)}")
    if wrong_type or wrong_value:
        error = BatchTypeError if wrong_type else BatchError
        raise error("; ".join(wrong_type + wrong_value))
    signature = tuple(
        (label, tuple(value.shape[1:]), value.dtype, value.device)
        for label, value in sorted(items, key=lambda item: str(item[0]))
        if isinstance(value, torch.Tensor)
    )
    return found.pop(), signature


def _shapes(signature: Signature) -> str:
    return ", ".join(
        f"{'' if label is None else f'{label}: '}{list(shape)}" for label, shape, _, _ in signature
    )


def _device(request: Request) -> torch.device:
    if isinstance(request, torch.Tensor):
        return request.device
    return next(iter(request.values())).device


def _joined(requests: list[Request]) -> Request:
    """The requests as one batch, their rows one after another."""
    first = requests[0]
    if len(requests) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(requests)  # type: ignore[arg-type]
    return {name: torch.cat([request[name] for request in requests]) for name in first}  # type: ignore[index]


def _check_rows(output: Any, n: int, path: str) -> None:
    """Refuse an output with a tensor that is not ``n`` rows: one value for the whole batch
    cannot be given back to each request as its own."""
    if isinstance(output, torch.Tensor):
        if output.dim() == 0 or output.shape[0] != n:
            raise MergeError(
                f"{path} has the shape {tuple(output.shape)}, not the batch's {n} rows first: "
                "the batcher cannot tell which part of it is each request's"
            )
        return
    if output is None:
        return
    if isinstance(output, list):  # one item per row
        if len(output) != n:
            raise MergeError(
                f"{path} is a list of {len(output)} items, not one per row of the batch's {n}: "
                "the batcher cannot tell which items are each request's"
            )
        return
    items = children(output)
    if items is None:
        raise MergeError(
            f"{path} is a {type(output).__name__}: the batcher gives each request its rows "
            "of tensors and lists, and cannot split it"
        )
    for item, name in zip(items, labels(output, path), strict=True):
        _check_rows(item, n, name)


def _final(exc: BaseException) -> bool:
    """Whether running the requests of a failed batch one by one cannot help: the guard
    already tried chunks down to its smallest."""
    return isinstance(exc, OutOfMemoryError) and not isinstance(exc, SplitRefusedError)


def _answer(waiting: _Waiting, answer: Any) -> None:
    if not waiting.future.done():
        waiting.future.set_result(answer)


def _fail(waiting: _Waiting, exc: BaseException) -> None:
    if not waiting.future.done():
        waiting.future.set_exception(exc)
