"""What one guarded callable keeps between calls, and its call loops.

:class:`Guard` holds the options, the batch plan, the size memory and the
counters. Its sync and async loops only call and report back: every decision
(what to try next, when to give up) belongs to :class:`~torchmemguard._run.Run`.
A call whose batch is known to fit skips the run altogether, after a look at
the leading sizes of its first batch argument.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import torch

from torchmemguard import _inplace as inplace
from torchmemguard._arguments import BatchPlan, BoundBatch, Unsplittable
from torchmemguard._classify import is_oom
from torchmemguard._events import CoupledWarning, GuardEvents, GuardStats, Refusal
from torchmemguard._knowledge import Knowledge
from torchmemguard._layout import Layout
from torchmemguard._merging import Merger
from torchmemguard._observability import footprint, retention
from torchmemguard._options import Options
from torchmemguard._run import BACKWARD_REFUSAL, Run
from torchmemguard._structures import BROADCAST

# What the quick look answers for a call that runs as it is.
_AS_IS = object()


class Guard:
    """Everything one guarded callable keeps between calls."""

    def __init__(
        self,
        fn: Callable[..., Any],
        options: Options,
        module: torch.nn.Module | None = None,
        lists: bool = True,
        name: str | None = None,
        layout: Layout | None = None,
        warn_coupled: bool | None = None,
        known: Knowledge | None = None,
    ) -> None:
        self.name = name or getattr(fn, "__qualname__", None) or type(fn).__qualname__
        self.options = options
        self.known = known or Knowledge(options)
        self.memory = self.known.memory
        self._runs_whole = self.memory.runs_whole  # bound once: the look is on the hot path
        self.layout = layout or Layout(dim=options.batch_dim or 0)
        self.plan = BatchPlan(
            fn, options.batch_args, options.whole_args, lists, options.split, self.layout
        )
        self.module = module
        # With the rows checked, a batch-coupled module is refused, not warned about.
        warn = not options.check_rows if warn_coupled is None else warn_coupled
        self.events = GuardEvents(self.name)
        self.warn_coupled = CoupledWarning(self.name) if warn else None
        # How chunk outputs are checked and merged; None for a user's merge hook.
        merge = options.merge
        self.merger: Merger | None = (
            merge
            if isinstance(merge, Merger)
            else Merger(dim_of=self.layout.output_dim)
            if merge is None
            else None
        )
        self.checks = self.known.checks
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
        self._versions = inplace.versions  # careful_versions once an inference tensor came
        self.retention = retention.Retention(self.name)
        self._until_sample = retention.FIRST_SAMPLE  # calls until the next sampled one

    def merger_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Merger | None:
        """How the chunk outputs of a call with these arguments are checked and merged."""
        return self.merger

    def refusal_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Refusal | None:
        """Why a call with these arguments is not retried or split, if it is not."""
        return self.refusal

    @property
    def refusal(self) -> Refusal | None:
        """Why calls are no longer retried or split, if they are not."""
        return self.known.refusal

    @refusal.setter
    def refusal(self, refusal: Refusal | None) -> None:
        self.known.refusal = refusal

    @property
    def runs_backward(self) -> bool:
        """Whether a retry or chunk of a call tried ``backward()``."""
        return self.refusal is BACKWARD_REFUSAL

    def run(
        self,
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        quick: Hashable = None,
        failed: BaseException | None = None,
        versions: list[int] | None = None,
    ) -> Run:
        """A run of one call: a fresh one, or one that took the OOM ``failed`` whole, with
        ``versions`` the in-place change counts of its arguments before it ran."""
        batch = self._bind(instance, args, kwargs)
        return Run(
            batch,
            memory=self.memory,
            options=self.options,
            events=self.events,
            refuse=self.known.refuse,
            coupled=self.warn_coupled,
            merger=self.merger_for(args, kwargs),
            refusal=self.refusal_for(args, kwargs),
            checks=self.checks,
            quick=quick,
            failed=failed,
            versions=versions,
        )

    def holds(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any], most: int) -> int:
        """The samples of a batch shaped like this call's that the size memory expects to
        fit, at most ``most``: ``most`` where nothing was learned that says otherwise, or
        the call cannot be split."""
        try:
            found = self._bind(instance, args, kwargs).shape()
        except Exception:  # arguments the guard could not split: it would run them whole
            return most
        if isinstance(found, Unsplittable):
            return most
        return self.memory.start(dataclasses.replace(found[0], n=most))

    def _bind(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> BoundBatch:
        """The batch plan bound to a call of ``instance`` (None for a plain call)."""
        owner = self.module if self.module is not None else instance
        scope = None if self.module is not None else _scope(instance)
        return self.plan.bind(self.plan.skip(instance), args, kwargs, owner, scope)

    def call(
        self,
        wrapped: Callable[..., Any],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Call ``wrapped`` under the guard (the wrapt wrapper of sync callables)."""
        self._until_sample -= 1
        if self._until_sample <= 0:
            sample = self._sample(args, kwargs)
            output = self.call(wrapped, instance, args, kwargs)
            if sample is not None:
                self.retention.end(sample, output)
            return output
        quick = self._look(instance, args, kwargs) if self.memory.entries else _AS_IS
        if quick is _AS_IS:
            try:
                before = self._versions(args, kwargs)
            except RuntimeError:  # an inference tensor
                before = self._careful(args, kwargs)
            try:
                return wrapped(*args, **kwargs)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                run = self.run(instance, args, kwargs, failed=exc, versions=before)
        else:
            run = self.run(instance, args, kwargs, quick)
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
        self._until_sample -= 1
        if self._until_sample <= 0:
            sample = self._sample(args, kwargs)
            output = await self.acall(wrapped, instance, args, kwargs)
            if sample is not None:
                self.retention.end(sample, output)
            return output
        quick = self._look(instance, args, kwargs) if self.memory.entries else _AS_IS
        if quick is _AS_IS:
            try:
                before = self._versions(args, kwargs)
            except RuntimeError:  # an inference tensor
                before = self._careful(args, kwargs)
            try:
                return await wrapped(*args, **kwargs)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                run = self.run(instance, args, kwargs, failed=exc, versions=before)
        else:
            run = self.run(instance, args, kwargs, quick)
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

    def _sample(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> retention.Sample | None:
        """Begin sampling this call for memory it keeps (see
        :mod:`~torchmemguard._observability.retention`); the countdown starts again,
        one more for the call itself, which goes through :meth:`call` once more."""
        sample = self.retention.begin(args, kwargs, self.module)
        self._until_sample = self.retention.every + 1
        if self.module is not None:
            footprint.report(self.module)
        return sample

    def _careful(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[int]:
        """The in-place change counts of a call that holds an inference tensor, which keeps
        none: from now on every call's are read with care, so none raises again."""
        self._versions = inplace.careful_versions
        return inplace.careful_versions(args, kwargs)

    def _look(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        """``_AS_IS`` for a call known to fit as it is, else the quick key of its batch
        (None where the look is not conclusive).

        A quick look, once something was learned, at the first argument that sets
        the batch size: its whole shape is the key. A batch runs as it is when a
        batch of the same shape ran whole since the last failure. Anything else
        takes the full run, which is guarded either way.
        """
        size: Any = 1
        shape: Any = ()
        for position, keyword in self._places[instance is not None]:
            value: Any = args[position] if position < len(args) else kwargs.get(keyword or "")
            try:
                shape = value.shape
                size = shape[0]
            except (AttributeError, IndexError, TypeError):
                if not (self.plan.lists and isinstance(value, list)):
                    return None
                size = len(value)
                shape = (list, size)
            if size != BROADCAST:  # else look further (is_broadcast, inlined: the hot path)
                break
        key = shape if instance is None or self.module is not None else (id(instance), shape)
        if self._runs_whole(key):
            return _AS_IS
        return key

    def state(self) -> GuardState:
        """The read-only view users see as ``oom_guard``."""
        return GuardState(self)


class GuardState:
    """What a guarded callable has learned and counted: its ``oom_guard``.

    Read-only, except :meth:`clear`.
    """

    __slots__ = ("_guard",)

    def __init__(self, guard: Guard) -> None:
        self._guard = guard

    @property
    def name(self) -> str:
        """The guarded callable's name, as the metrics label it."""
        return self._guard.name

    @property
    def options(self) -> Options:
        """The options the guard was made with."""
        return self._guard.options

    @property
    def stats(self) -> GuardStats:
        """The counters now: OOMs caught, retries, split calls, unrecovered calls."""
        return dataclasses.replace(self._guard.events.stats)

    @property
    def runs_backward(self) -> bool:
        """Whether a retry or chunk of a call ran ``backward()``: calls then run whole."""
        return self._guard.runs_backward

    @property
    def refusal(self) -> str | None:
        """Why the guard no longer retries or splits calls, if it does not: they call
        ``backward()``, or their rows depend on each other. Calls then run whole, and
        one that runs out of memory raises :class:`torchmemguard.SplitRefusedError`."""
        return None if self._guard.refusal is None else self._guard.refusal[0]

    def learned(self) -> dict[Hashable, int]:
        """The chunk size in use for each call shape remembered, oldest first, keyed by
        :class:`torchmemguard.ShapeKey`."""
        return self._guard.memory.learned()

    def clear(self) -> None:
        """Forget the learned sizes, the rows checked and any refusal, which every guard of
        the same callable shares; keep the counters."""
        self._guard.refusal = None
        if self._guard.checks is not None:
            self._guard.checks.clear()
        self._guard.memory.clear()

    def __repr__(self) -> str:
        return f"<oom_guard of {self.name}: {self.stats}, {len(self.learned())} shapes learned>"


def _scope(owner: object) -> Hashable:
    """The part of a memory key that tells instances of a class apart."""
    return None if owner is None or isinstance(owner, type) else id(owner)
