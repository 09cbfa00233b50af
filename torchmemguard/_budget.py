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

from torchmemguard import _device as devices
from torchmemguard._decorators import is_coroutine_callable
from torchmemguard._errors import BudgetExceededError, gathered, raise_bad_arguments
from torchmemguard._units import format_bytes, parse_size

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
class _Caps:
    """The blocks open on one device."""

    limit: devices.Limit
    found: float  # the cap to restore when the last block closes
    in_force: float  # the cap torchmemguard last saw or put in force
    asks: dict[int, float] = field(default_factory=dict)

    def sync(self) -> float:
        """The live cap. One set outside since is the cap to restore at the end."""
        live = self.limit.read()
        if live != self.in_force:
            self.found = self.in_force = live
        return live

    def tightest(self, *more: float) -> float:
        return min([self.found, *self.asks.values(), *more])


_lock = threading.Lock()
_open: dict[str, _Caps] = {}
_tokens = itertools.count()
# The blocks entered with ``with`` in this thread or task, innermost last.
_entered: ContextVar[tuple[tuple[memory_budget, tuple[str, int]], ...]] = ContextVar(
    "torchmemguard_budgets", default=()
)


def _budget(limit: devices.Limit, cap: float) -> Budget:
    total = limit.total()
    if cap == math.inf:
        return Budget(limit.device, total, 1.0)
    return Budget(limit.device, int(cap), cap / total)


def _enter(limit: devices.Limit, ask: float, strict: bool) -> tuple[str, int, float]:
    key = str(limit.device)
    with _lock:
        state = _open.get(key)
        if state is None:
            live = limit.read()
            state = _Caps(limit, found=live, in_force=live)
        else:
            live = state.sync()
        cap = state.tightest(ask)
        tightens = cap < live
        refuse_below_held(limit, cap, strict, tightens)
        if tightens:
            limit.write(cap)
        state.in_force = cap
        token = next(_tokens)
        state.asks[token] = ask
        _open[key] = state
    try:
        if tightens:
            limit.settle(cap)
    except BaseException:
        _exit(key, token)
        raise
    return key, token, cap


def refuse_below_held(limit: devices.Limit, cap: float, strict: bool, tightens: bool) -> None:
    """Refuse a cap below what the process holds: a hard cap (the CPU's), which would
    make every allocation fail, whenever it tightens; another only with ``strict``.
    A hard cap that tightens nothing leaves the process as it was."""
    if not (tightens if limit.hard else strict):
        return
    held = limit.held()
    if held is not None and held > cap:
        raise BudgetExceededError(limit.over(cap, held))


def _exit(key: str, token: int) -> None:
    with _lock:
        state = _open[key]
        live = state.sync()
        ask = state.asks.pop(token)
        cap = state.tightest()
        if cap != live:
            try:
                state.limit.write(cap)
            except BaseException:
                state.asks[token] = ask  # still in force, so still open
                raise
        state.in_force = cap
        if not state.asks:
            del _open[key]


def _checked(
    fraction: object, size: object, device: str | torch.device | int | None, strict: object
) -> tuple[float | None, int | None, torch.device | None]:
    """The arguments of a budget, checked: every problem in one error (TypeError when
    one has the wrong type, else ValueError)."""
    wrong_type: list[str] = []
    wrong_value: list[str] = []
    if fraction is None and size is None:
        wrong_type.append("memory_budget needs a fraction or bytes, got neither")
    elif fraction is not None and size is not None:
        wrong_type.append(
            f"memory_budget takes a fraction or bytes, not both "
            f"(got fraction={fraction!r}, bytes={size!r})"
        )
    wrong = wrong_type, wrong_value
    found_fraction = None if fraction is None else gathered(*wrong, _fraction, fraction)
    found_size = None if size is None else gathered(*wrong, parse_size, size, "bytes")
    found_device = None if device is None else gathered(*wrong, devices.check_device, device)
    if not isinstance(strict, bool):
        wrong_type.append(f"strict must be True or False, got {strict!r}")
    raise_bad_arguments(wrong_type, wrong_value)
    return found_fraction, found_size, found_device


def _fraction(fraction: object) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise TypeError(
            f"fraction must be a number in (0, 1], got {fraction!r} ({type(fraction).__name__})"
        )
    if not 0 < fraction <= 1:  # also refuses NaN
        raise ValueError(f"fraction={fraction!r} must be in (0, 1]")
    return float(fraction)


class memory_budget:  # lower case: used like a function, as contextlib.suppress is
    """Cap the memory this process may take from ``device`` while a block runs.

    Give ``fraction`` of the device's memory, in (0, 1], or ``bytes``: an int, or
    a string such as ``"6GiB"`` or ``"512 MB"``. ``device=None`` is the current
    CUDA or XPU device if one is available, else the CPU.

    An allocation past the cap raises an out-of-memory error, which
    :func:`~torchmemguard.oom_safe` recovers from by splitting the batch. Use it
    as ``with memory_budget(0.8):`` (it gives the :class:`Budget` in force) or as
    a decorator of a function or ``async def``. The cap in force is the tightest
    of every block open on the device, in any thread or task, and of the cap
    found when the first one opened, which is restored to the byte when the last
    one closes. A cap set outside torchmemguard while blocks are open is kept,
    and restored at the end instead.

    On CUDA and XPU the cap is the allocator's per-process memory fraction; a
    ``bytes`` cap as large as the device is no cap. A block that tightens the
    cap empties the cache when more than the cap is reserved. With
    ``strict=True``, entering raises :class:`~torchmemguard.BudgetExceededError`
    when more than the cap in force is already allocated.

    On the CPU the cap is the address-space limit ``RLIMIT_AS`` (Linux only),
    and ``fraction`` is taken of the memory available to the process (physical
    RAM or the cgroup limit, the smaller), measured when the budget is first
    entered. Address space counts every mapping (shared libraries, thread
    stacks, allocator arenas), not only tensors, so a cap below the current
    address space is refused with :class:`~torchmemguard.BudgetExceededError`.
    """

    def __init__(
        self,
        fraction: float | None = None,
        *,
        bytes: int | str | None = None,  # shadows the builtin, which is not needed here
        device: str | torch.device | int | None = None,
        strict: bool = False,
    ) -> None:
        self.fraction, self.bytes, self.device = _checked(fraction, bytes, device, strict)
        self.strict = strict
        self._asks: dict[str, float] = {}  # the cap asked for, per device, in bytes
        self._held: list[tuple[str, int]] = []  # blocks open through ``with``

    def __repr__(self) -> str:
        cap = f"{self.fraction!r}" if self.bytes is None else f"bytes={self.bytes}"
        return f"memory_budget({cap}, device={self.device!r}, strict={self.strict})"

    def _start(self) -> tuple[devices.Limit, str, int, float]:
        device = self.device
        if device is None:
            device = devices.check_device(devices.default_device())
        limit = devices.limit_for(device)
        ask = self._asks.get(str(limit.device))
        if ask is None:
            ask = self._asks[str(limit.device)] = limit.cap(self.fraction, self.bytes)
        key, token, cap = _enter(limit, ask, self.strict)
        return limit, key, token, cap

    def __enter__(self) -> Budget:
        limit, key, token, cap = self._start()
        with _lock:
            self._held.append((key, token))
        _entered.set((*_entered.get(), (self, (key, token))))
        return _budget(limit, cap)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        entered = _entered.get()
        entry = None
        for position in range(len(entered) - 1, -1, -1):
            if entered[position][0] is self:
                entry = entered[position][1]
                _entered.set(entered[:position] + entered[position + 1 :])
                break
        with _lock:
            if entry is None and self._held:
                # Left in another thread or task (an async fixture's teardown, a
                # generator closed elsewhere): close this budget's latest block.
                entry = self._held[-1]
            if entry is None or entry not in self._held:
                raise RuntimeError(f"{self!r} was exited more often than it was entered")
            self._held.remove(entry)
        _exit(*entry)

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
                _, key, token, _ = self._start()
                try:
                    return await run(*args, **kwargs)
                finally:
                    _exit(key, token)

            return cast(Callable[P, R], within_async)

        @functools.wraps(func)
        def within(*args: P.args, **kwargs: P.kwargs) -> R:
            _, key, token, _ = self._start()
            try:
                return func(*args, **kwargs)
            finally:
                _exit(key, token)

        return within


def current_budget(device: str | torch.device | int | None = None) -> Budget | None:
    """The memory cap in force on ``device`` (default as for :class:`memory_budget`).

    It reports a cap set outside torchmemguard too (a ``ulimit -v``, a fraction
    set through torch), and ``None`` when there is none. It never initialises
    CUDA: a device the process has not used has no cap.
    """
    checked = devices.check_device(devices.default_device() if device is None else device)
    limit = devices.limit_for(checked)
    with _lock:
        cap = limit.read()
        if str(limit.device) not in _open and cap == math.inf:
            return None
        return _budget(limit, cap)
