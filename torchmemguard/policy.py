"""The retry policy: what one guarded call does after running out of memory.

A :class:`Run` owns the decisions of one call: its batch, the chunks done so
far, the next chunk to try, the clean-up after an out-of-memory error, and when
to give up. The call loops of :class:`~torchmemguard.guarded.Guard` only carry
them out.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from torchmemguard import device as devices
from torchmemguard import metrics, structures
from torchmemguard.classify import is_oom, onednn_failed, oom_device
from torchmemguard.errors import BatchError, OutOfMemoryError
from torchmemguard.gradients import BackwardWatch
from torchmemguard.merging import FIRST

if TYPE_CHECKING:
    from torchmemguard.guarded import Guard


class Run:
    """One guarded call: its batch, its chunks so far, and the next step."""

    def __init__(
        self,
        guard: Guard,
        wrapped: Callable[..., Any],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        failed: BaseException | None = None,
    ) -> None:
        self.guard = guard
        self.args = args
        self.kwargs = kwargs
        self.owner = guard.module if guard.module is not None else instance
        self.batch = guard.plan.bind(guard.plan.skip(instance), args, kwargs)
        self.problem = self._find_batch()
        self.where = self.device  # the device the metrics name: the batch's, or the OOM's
        self.pieces: list[Any] = []
        self.sizes: list[int] = []
        self.offset = 0
        self.ooms = 0
        self.smallest = self.n
        self.collected = False  # a full garbage collection was tried
        self.ceiling: int | None = None  # the smallest chunk that failed in this call
        self.counted = False  # this call already counted towards growing the limit
        self.recovery: int | None = None  # device generation of a pending recovery
        self.ran_out: torch.device | None = None  # the device of the last OOM
        self.last_oom: BaseException | None = None  # a copy of the last OOM, without frames
        self.watch: BackwardWatch | None = None  # watches the attempt under way
        self.onednn_failed = False  # oneDNN could not create a primitive in this call
        self.merger = guard.merger_for(args, kwargs)  # None: the user's merge hook
        self.whole: Any = None
        self.split = False  # the call was cut into chunks
        self.finished = False
        if failed is not None:
            self.chunk = self.size = self.n
            self.failed(failed)
        elif self.problem is None:
            self.chunk = max(
                min(guard.options.min_chunk, self.n),
                guard.memory.start(self.key, self.group, self.n, self.bytes_per_sample),
            )
        else:
            self.chunk = self.n

    def _find_batch(self) -> str | None:
        """Work out the batch size and memory key; describe a problem instead of raising."""
        self.n = 0
        self.device: torch.device | None = None
        self.bytes_per_sample = 0
        self.group: Hashable = None
        self.key: Hashable = None
        n = self.batch.size(self.guard.options.split)
        if isinstance(n, str):
            return f"{self.guard.name}: {n}"
        self.n = n
        info = structures.BatchInfo()
        for value in self.batch.values:
            structures.describe(value, n, info)
        if info.device is None and isinstance(self.owner, torch.nn.Module):
            param = next(self.owner.parameters(), None)
            info.device = param.device if param is not None else None
        self.device = info.device
        self.bytes_per_sample = info.bytes_per_sample
        scope = None if self.guard.module is not None else _scope(self.owner)
        self.group = (scope, info.device, info.dtype)
        self.key = (scope, info.device, info.dtype, tuple(info.shapes))
        return None

    def _left_out(self) -> str | None:
        problem = self.batch.left_out(self.n, self.guard.options.split)
        return None if problem is None else f"{self.guard.name}: {problem}"

    def attempt(self, watch: bool = True) -> contextlib.AbstractContextManager[object]:
        """The context of the next attempt. A retry or a chunk runs under a watch
        for ``backward()`` where gradients are enabled, and without oneDNN once
        oneDNN failed in this call.

        Async calls pass ``watch=False``: a torch function mode belongs to a
        thread, which an awaiting coroutine shares with other tasks.
        """
        retry = self.ooms > 0 or self.size < self.n
        watched = watch and retry and torch.is_grad_enabled()
        self.watch = BackwardWatch() if watched else None
        if self.onednn_failed:
            return _both(devices.without_onednn(), self.watch)
        return self.watch or contextlib.nullcontext()

    def next_step(self) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """The arguments of the next attempt, or None when the call is complete."""
        if self.recovery is not None:
            devices.recover(self.ran_out, self.recovery, collect=self.collected)
            self.recovery = None
            if self.key is not None:
                room = devices.room(self.ran_out)
                self.guard.memory.noted_room(self.key, self.group, self.ran_out, room)
            self.guard.count(self.where, retries=1)
        if self.finished:
            return None
        if self.problem is not None or (self.offset == 0 and self.chunk >= self.n):
            self.size = self.n
            return self.args, self.kwargs
        self.size = size = min(self.chunk, self.n - self.offset)
        if not self.split:
            problem = self._left_out()
            if problem is not None:
                raise BatchError(problem)
            self.split = True
            self.guard.count(self.where, split_calls=1)
            self.guard.warn_batch_coupled(self.owner)
        stop = self.offset + size
        hook = self.guard.options.split
        lists = self.guard.plan.lists
        values = [
            structures.split(value, self.n, self.offset, stop, hook, label, lists)
            for value, label in zip(self.batch.values, self.batch.labels, strict=True)
        ]
        return self.batch.replace(values, self.args, self.kwargs)

    def caught(self, exc: BaseException) -> bool:
        """Take an exception of the attempt under way: True when the call goes on.

        Called inside the ``except`` block; an exception that is neither an
        out-of-memory error nor a stopped ``backward()`` is the caller's.
        """
        if self.watch is not None and self.watch.seen:
            self._stopped_backward()
            return True
        if not is_oom(exc):
            return False
        self.failed(exc)
        return True

    def succeeded(self, output: Any) -> None:
        """Keep the output of the attempt that just returned."""
        if self.watch is not None and self.watch.seen:
            self._stopped_backward()  # the attempt caught the stop itself
            return
        if self.size == self.n and self.offset == 0:
            self.whole = output
            self.finished = True
            if self.problem is None and self.ooms:
                self.guard.memory.fitted(
                    self.key, self.group, self.n, self.bytes_per_sample, limited=False
                )
            return
        if self.merger is not None:
            # Stop at the first chunk whose output shows that the chunks cannot merge.
            first = self.pieces[0] if self.pieces else FIRST
            self.merger.check(output, self.size, first, self.sizes[0] if self.sizes else 0)
        self.pieces.append(output)
        self.sizes.append(self.size)
        self.offset += self.size
        # Growth counts calls, not chunks: one call of many chunks is one success.
        limited = self.size == self.chunk < self.n and not self.counted
        self.counted = self.counted or limited
        chunk = self.guard.memory.fitted(
            self.key, self.group, self.size, self.bytes_per_sample, limited, devices.room
        )
        if self.ceiling is not None:
            # Other threads may raise the shared limit: never retry what failed here.
            chunk = min(chunk, self.ceiling - 1)
        self.chunk = max(self.guard.options.min_chunk, chunk)
        self.finished = self.offset >= self.n

    def failed(self, exc: BaseException) -> None:
        """Decide what follows an out-of-memory error; raise when nothing can.

        Called inside the ``except`` block, so it must not touch memory: the
        clean-up waits for :meth:`next_step`, once the exception is gone.
        """
        guard = self.guard
        self.ran_out = self.where = _named(oom_device(exc), self.device)
        guard.count(self.where, ooms=1)
        self.ooms += 1
        self.last_oom = _detached(exc)
        self.onednn_failed = self.onednn_failed or onednn_failed(exc)
        if guard.runs_backward:
            self._give_up(exc, *_BACKWARD_REFUSAL)
        problem = self.problem or self._left_out()
        if problem is not None:
            raise BatchError(problem)
        self.smallest = min(self.smallest, self.size)
        self.ceiling = min(self.ceiling or self.size, self.size)
        if self.ooms > guard.options.max_retries:
            self._too_small(exc, f"gave up after {self.ooms} out-of-memory errors")
        if self.size <= guard.options.min_chunk or self.size <= 1:
            if self.collected:
                self._too_small(exc, "even the smallest chunk ran out of memory")
            self.collected = True  # one last try, after a full garbage collection
        else:
            self.chunk = max(
                guard.options.min_chunk,
                guard.memory.failed(self.key, self.group, self.size, self.bytes_per_sample),
            )
        self.recovery = devices.generation(self.ran_out)

    def _stopped_backward(self) -> None:
        """A retry or chunk tried to run ``backward()``: the call accumulates gradients.

        From now on the guard never splits this callable. A call that has not
        run out of memory runs again whole; one that has gives up.
        """
        self.guard.learned_backward()
        if self.ooms:
            self._give_up(None, *_BACKWARD_REFUSAL)
        self.chunk = self.n
        self.pieces.clear()
        self.sizes.clear()
        self.offset = 0
        self.split = False

    def _give_up(self, exc: BaseException | None, what: str, advice: str) -> NoReturn:
        """Raise our OutOfMemoryError from ``exc``, or from the last OOM once it is gone,
        with the device's memory state."""
        device = self.ran_out if exc is None else _named(oom_device(exc), self.device)
        self.guard.count(device, unrecovered=1)
        raise OutOfMemoryError(
            f"{self.guard.name} ran out of memory on {device or 'an unknown device'}: "
            f"{what}. Memory: {devices.describe(device)}. {advice}"
        ) from (exc or self.last_oom)

    def _too_small(self, exc: BaseException, why: str) -> NoReturn:
        self._give_up(
            exc,
            f"{why}; batch of {self.n} samples, smallest chunk tried {self.smallest}",
            "Pass smaller batches, free memory held elsewhere in the process, "
            "or give it a larger memory budget.",
        )

    def result(self) -> Any:
        """The output of the whole call, merged from its chunks if it was split."""
        if self.whole is not None or not self.pieces:
            return self.whole
        metrics.record_chunk(self.guard.name, self.where, max(self.sizes))
        try:
            if self.merger is not None:
                return self.merger.merge(self.pieces, self.sizes)
            return self.guard.options.merge(self.pieces)  # type: ignore[misc]
        except Exception as exc:
            if not is_oom(exc):
                raise
            self._give_up(
                exc,
                f"its batch of {self.n} samples ran in {len(self.pieces)} chunks, "
                "but merging their outputs did not fit",
                "Pass smaller batches, or a merge= that keeps the outputs apart.",
            )


_BACKWARD_REFUSAL = (
    "it calls backward(), and the guard does not retry or split a call that accumulates "
    "gradients: chunks of it would not add up to the whole batch's gradients",
    "Its gradients hold what the failed attempt accumulated before it ran out, if anything: "
    "zero them, then run the step again with a smaller batch, or accumulate the gradients "
    "of micro-batches yourself.",
)


@contextlib.contextmanager
def _both(
    first: contextlib.AbstractContextManager[object], second: BackwardWatch | None
) -> Iterator[None]:
    with first, second or contextlib.nullcontext():
        yield


def _detached(exc: BaseException) -> BaseException | None:
    """A copy of ``exc`` without its traceback, whose frames hold the failed attempt's
    tensors: a cause to chain from later, that keeps no memory."""
    try:
        found = copy.copy(exc)
        found.__traceback__ = None
    except Exception:
        return None
    return found


def _named(ran_out: torch.device | None, batch: torch.device | None) -> torch.device | None:
    """The device an OOM names, as exactly as known: ``cuda`` becomes the batch's ``cuda:1``."""
    if ran_out is None:
        return batch
    if ran_out.index is None and batch is not None and batch.type == ran_out.type:
        return batch
    return ran_out


def _scope(owner: object) -> Hashable:
    """The part of a memory key that tells instances of a class apart."""
    return None if owner is None or isinstance(owner, type) else id(owner)
