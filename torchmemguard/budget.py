"""``memory_budget``: cap the memory the process may take from a device, for a block.

Every open block asks for a cap on its device; the cap in force is the tightest
of those asks and of the cap found when the first block opened. Blocks may nest,
and may be open in several threads or asyncio tasks at once: as each one closes
the cap is recomputed, and when the last one closes the cap found at the start
is restored exactly.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import threading
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, cast

import torch

from torchmemguard import limits
from torchmemguard.decorators import is_coroutine_callable
from torchmemguard.units import format_bytes, parse_size

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Budget:
    """A memory cap in force on ``device``: ``bytes``, and ``fraction`` of the device.

    For the CPU the cap is on address space and ``fraction`` is taken of the
    memory available to the process (physical RAM or the cgroup limit).
    """

    device: torch.device
    bytes: int
    fraction: float

    def __str__(self) -> str:
        return f"{format_bytes(self.bytes)} ({self.fraction:.1%}) of {self.device}"


@dataclass
class _Device:
    """The blocks open on one device."""

    limit: limits.Limit
    found: float  # the setting in force when the first block opened
    in_force: float
    asks: dict[int, float] = field(default_factory=dict)


_lock = threading.Lock()
_open: dict[str, _Device] = {}
_tokens = itertools.count()
# The blocks entered with ``with`` in this thread or task, innermost last.
_entered: ContextVar[tuple[tuple[memory_budget, tuple[str, int]], ...]] = ContextVar(
    "torchmemguard_budgets", default=()
)


def _budget(limit: limits.Limit, setting: float) -> Budget:
    return Budget(limit.device, limit.in_bytes(setting), limit.as_fraction(setting))


def _enter(limit: limits.Limit, ask: float, strict: bool) -> tuple[str, int, Budget]:
    key = str(limit.device)
    with _lock:
        state = _open.get(key)
        if state is None:
            found = limit.read()
            state = _Device(limit, found=found, in_force=found)
        setting = min(state.in_force, ask)
        if setting != state.in_force:  # only a block that tightens the cap answers for it
            limit.check(setting, strict)
            limit.write(setting)
            state.in_force = setting
        token = next(_tokens)
        state.asks[token] = ask
        _open[key] = state
    try:
        limit.settle(setting)
    except BaseException:
        _exit(key, token)
        raise
    return key, token, _budget(limit, setting)


def _exit(key: str, token: int) -> None:
    with _lock:
        state = _open[key]
        del state.asks[token]
        setting = min(state.found, *state.asks.values()) if state.asks else state.found
        if not state.asks:
            del _open[key]
        if setting != state.in_force:
            state.in_force = setting
            state.limit.write(setting)


def _check_fraction(fraction: object) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise TypeError(
            f"fraction must be a number in (0, 1], got {fraction!r} ({type(fraction).__name__})"
        )
    if math.isnan(fraction) or not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction!r} must be in (0, 1]")
    return float(fraction)


class memory_budget:  # lower case: used like a function, as contextlib.suppress is
    """Cap the memory this process may take from ``device`` while a block runs.

    Give ``fraction`` of the device's memory, in (0, 1], or ``bytes``: an int, or
    a string such as ``"6GiB"`` or ``"512 MB"``. ``device=None`` is the current
    accelerator if one is available, else the CPU.

    An allocation past the cap raises an out-of-memory error, which
    :func:`~torchmemguard.oom_safe` recovers from by splitting the batch. Use it
    as ``with memory_budget(0.8):`` (it gives the :class:`Budget` in force) or as
    a decorator of a function or ``async def``. Blocks nest, and an inner block
    never loosens an outer one, nor a cap that was in force before.

    On CUDA and XPU the cap is the allocator's per-process memory fraction; a
    ``bytes`` cap larger than the device is the whole device. Entering empties
    the cache when more than the cap is reserved, and with ``strict=True``
    raises :class:`~torchmemguard.BudgetExceededError` when more than the cap is
    already allocated.

    On the CPU the cap is the address-space limit ``RLIMIT_AS`` (Linux only),
    and ``fraction`` is taken of the memory available to the process: physical
    RAM or the cgroup limit, whichever is smaller. Address space counts every
    mapping (shared libraries, thread stacks, allocator arenas), not only
    tensors, so a cap below the current address space is refused with
    :class:`~torchmemguard.BudgetExceededError`.
    """

    def __init__(
        self,
        fraction: float | None = None,
        *,
        bytes: int | str | None = None,  # shadows the builtin, which is not needed here
        device: str | torch.device | int | None = None,
        strict: bool = False,
    ) -> None:
        if fraction is None and bytes is None:
            raise TypeError("memory_budget needs a fraction or bytes, got neither")
        if fraction is not None and bytes is not None:
            raise TypeError(
                f"memory_budget takes a fraction or bytes, not both "
                f"(got fraction={fraction!r}, bytes={bytes!r})"
            )
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be True or False, got {strict!r}")
        self.fraction = None if fraction is None else _check_fraction(fraction)
        self.bytes = None if bytes is None else parse_size(bytes, "bytes")
        self.device = None if device is None else limits.check_device(device)
        self.strict = strict

    def __repr__(self) -> str:
        cap = f"{self.fraction!r}" if self.bytes is None else f"bytes={self.bytes}"
        return f"memory_budget({cap}, device={self.device!r}, strict={self.strict})"

    def _open(self) -> tuple[str, int, Budget]:
        device = self.device
        if device is None:
            device = limits.check_device(limits.default_device())
        limit = limits.limit_for(device)
        return _enter(limit, limit.setting(self.fraction, self.bytes), self.strict)

    def __enter__(self) -> Budget:
        key, token, budget = self._open()
        _entered.set((*_entered.get(), (self, (key, token))))
        return budget

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        entered = _entered.get()
        for position in range(len(entered) - 1, -1, -1):
            if entered[position][0] is self:
                _entered.set(entered[:position] + entered[position + 1 :])
                _exit(*entered[position][1])
                return
        raise RuntimeError(f"{self!r} was exited in a thread or task where it was not entered")

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        """Run each call of ``func`` (a function or ``async def``) within this budget."""
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError(
                f"memory_budget cannot decorate the generator function {func.__qualname__}: "
                "its body runs after the call has returned. Use `with memory_budget(...):` "
                "inside it."
            )
        if is_coroutine_callable(func):
            run = cast(Callable[..., Awaitable[Any]], func)

            @functools.wraps(func)
            async def within_async(*args: Any, **kwargs: Any) -> Any:
                key, token, _ = self._open()
                try:
                    return await run(*args, **kwargs)
                finally:
                    _exit(key, token)

            return cast(Callable[P, R], within_async)

        @functools.wraps(func)
        def within(*args: P.args, **kwargs: P.kwargs) -> R:
            key, token, _ = self._open()
            try:
                return func(*args, **kwargs)
            finally:
                _exit(key, token)

        return within


def current_budget(device: str | torch.device | int | None = None) -> Budget | None:
    """The memory cap in force on ``device`` (default as for :class:`memory_budget`).

    It reports a cap set outside torchmemguard too (a ``ulimit -v``, a fraction
    set through torch), and ``None`` when there is none.
    """
    checked = limits.check_device(limits.default_device() if device is None else device)
    limit = limits.limit_for(checked)
    with _lock:
        state = _open.get(str(limit.device))
        setting = limit.read()
        if state is None and not limit.is_cap(setting):
            return None
        return _budget(limit, setting)
