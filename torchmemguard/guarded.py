"""What one guarded callable keeps between calls, and its call loops.

:class:`Guard` holds the options, the batch plan, the size memory and the
counters. Its sync and async loops only call and report back: every decision
(what to try next, when to give up) belongs to :class:`~torchmemguard.policy.Run`.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from torchmemguard import metrics, structures
from torchmemguard.arguments import BatchPlan
from torchmemguard.classify import is_oom
from torchmemguard.merging import Merger
from torchmemguard.policy import Run
from torchmemguard.sizing import SizeMemory


@dataclass
class GuardStats:
    """Counters of one guarded callable, since it was decorated."""

    ooms: int = 0  # out-of-memory errors caught
    retries: int = 0  # attempts made after an out-of-memory error
    split_calls: int = 0  # calls that ran in more than one chunk
    unrecovered: int = 0  # calls that failed with OutOfMemoryError in the end


@dataclass(frozen=True)
class Options:
    """The options of :func:`torchmemguard.oom_safe`, checked."""

    batch_args: str | Sequence[str] | None = None  # a tuple of names once checked
    whole_args: str | Sequence[str] = ()  # a tuple of names once checked
    min_chunk: int = 1
    max_retries: int = 16
    grow_after: int = 16
    split: structures.SplitHook | None = None
    merge: structures.MergeHook | None = None

    def __post_init__(self) -> None:
        for option in ("batch_args", "whole_args"):
            names = getattr(self, option)
            if isinstance(names, str):
                names = (names,)
            if names is not None:
                if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
                    raise TypeError(
                        f"{option} must be a name or a sequence of names, "
                        f"got {getattr(self, option)!r}"
                    )
                object.__setattr__(self, option, tuple(names))
        for name, low in (("min_chunk", 1), ("max_retries", 1), ("grow_after", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < low:
                raise ValueError(f"{name} must be at least {low}, got {value!r}")
        for name in ("split", "merge"):
            hook = getattr(self, name)
            if hook is not None and not callable(hook):
                raise TypeError(f"{name} must be callable or None, got {hook!r}")


class Guard:
    """Everything one guarded callable keeps between calls."""

    def __init__(
        self,
        fn: Callable[..., Any],
        options: Options,
        module: torch.nn.Module | None = None,
        lists: bool = True,
    ) -> None:
        self.name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        self.options = options
        self.plan = BatchPlan(fn, options.batch_args, options.whole_args, lists)
        self.module = module
        self.memory = SizeMemory(grow_after=options.grow_after)
        self.stats = GuardStats()
        self._entries = self.memory.entries
        # How chunk outputs are checked and merged; None for a user's merge hook.
        merge = options.merge
        self.merger: Merger | None = (
            merge if isinstance(merge, Merger) else Merger() if merge is None else None
        )
        self.runs_backward = False  # a retry or chunk of a call tried backward()
        # The places of the arguments that set the batch size, called plainly and with
        # an instance, as (position, keyword): a position past any call's arguments
        # when there is none.
        self._places: tuple[tuple[tuple[int, str | None], ...], ...] = tuple(
            tuple(
                (sys.maxsize if slot.position is None else slot.position, slot.keyword)
                for slot in self.plan.slots(skip)
            )
            for skip in (0, self.plan.skip(True))
        )
        self._lock = threading.Lock()
        self._warned: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()

    def merger_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Merger | None:
        """How the chunk outputs of a call with these arguments are checked and merged."""
        return self.merger

    def learned_backward(self) -> None:
        """Note that calls accumulate gradients: from now on they run whole, as is."""
        self.runs_backward = True
        self.memory.clear()  # an empty memory sends every call down the direct path

    def count(self, device: torch.device | None, **deltas: int) -> None:
        """Add ``deltas`` to the counters, and to the metrics where they are installed."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)
        metrics.record(self.name, device, **deltas)

    def call(
        self,
        wrapped: Callable[..., Any],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Call ``wrapped`` under the guard (the wrapt wrapper of sync callables)."""
        if not self._entries or self._runs_whole(instance, args, kwargs):
            try:
                return wrapped(*args, **kwargs)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                run = Run(self, wrapped, instance, args, kwargs, failed=exc)
        else:
            run = Run(self, wrapped, instance, args, kwargs)
        while (step := run.next_step()) is not None:
            try:
                with run.attempt():
                    output = wrapped(*step[0], **step[1])
            except Exception as exc:
                if not run.caught(exc):
                    raise
                continue
            run.succeeded(output)
        return run.result()

    async def acall(
        self,
        wrapped: Callable[..., Awaitable[Any]],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Await ``wrapped`` under the guard (the wrapt wrapper of coroutine functions)."""
        if not self._entries or self._runs_whole(instance, args, kwargs):
            try:
                return await wrapped(*args, **kwargs)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                run = Run(self, wrapped, instance, args, kwargs, failed=exc)
        else:
            run = Run(self, wrapped, instance, args, kwargs)
        while (step := run.next_step()) is not None:
            try:
                with run.attempt(watch=False):
                    output = await wrapped(*step[0], **step[1])
            except Exception as exc:
                if not run.caught(exc):
                    raise
                continue
            run.succeeded(output)
        return run.result()

    def _runs_whole(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """True for a batch no larger than every learned limit: it runs as is.

        A quick look at the leading sizes of the arguments that set the batch
        size, so that a guard that once ran out of memory stays cheap for the
        calls that fit. Where the look is not conclusive the call takes the full
        path, which is guarded either way.
        """
        size = 1
        for position, keyword in self._places[instance is not None]:
            value: Any = args[position] if position < len(args) else kwargs.get(keyword or "")
            try:
                size = value.size(0)
            except (AttributeError, IndexError, TypeError, RuntimeError):
                if not (self.plan.lists and isinstance(value, list)):
                    return False
                size = len(value)
            if size != 1:  # a leading size of 1 may be a broadcast: look further
                break
        return size <= self.memory.floor

    def warn_batch_coupled(self, module: object) -> None:
        """Warn once per module that splitting changes batch statistics in training."""
        if not isinstance(module, torch.nn.Module) or not module.training:
            return
        if module in self._warned:
            return
        self._warned.add(module)
        coupled = [
            type(m).__name__
            for m in module.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
        ]
        if coupled:
            warnings.warn(
                f"{self.name}: splitting a batch for a module in training mode changes "
                f"the statistics of its batch-coupled layers ({', '.join(sorted(set(coupled)))}); "
                "call .eval() for inference, or keep batches that fit",
                RuntimeWarning,
                stacklevel=_caller_stacklevel(),
            )


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside torchmemguard (rare path only)."""
    package = os.path.dirname(__file__)
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame = frame.f_back
        level += 1
    return level
