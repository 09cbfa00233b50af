"""Timing calls in blocks, interleaved over rounds, with a progress bar where tqdm is installed."""

from __future__ import annotations

import gc
import itertools
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import TypeVar

Call = Callable[[], object]
K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def _no_sync() -> None:
    pass


def time_block(call: Call, calls: int, sync: Callable[[], None] = _no_sync) -> float:
    """Seconds for ``calls`` calls, the garbage collector off, as ``timeit`` has it.

    ``sync`` runs once after the calls (``torch.cuda.synchronize`` for CUDA work,
    which is asynchronous) and is timed with them.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in itertools.repeat(None, calls):
            call()
        sync()
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


def calls_per_block(call: Call, block: float, sync: Callable[[], None] = _no_sync) -> int:
    """How many calls fill ``block`` seconds (at least one), after two warm-up calls."""
    time_block(call, 2, sync)
    calls = 1
    while True:
        seconds = time_block(call, calls, sync)
        if seconds >= min(block, 0.02):
            return max(1, round(block * calls / seconds))
        calls *= 10


def progress(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    """``items``, with a tqdm progress bar on stderr where tqdm is installed."""
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:
        yield from items
        return
    yield from tqdm(items, total=total, desc=description, unit="round", leave=False)


def interleaved(
    calls: dict[K, Call],
    rounds: int,
    block: float,
    sync: Callable[[], None] = _no_sync,
    description: str = "",
) -> tuple[dict[K, list[float]], dict[K, int]]:
    """Microseconds per call of each of ``calls``, one sample per round; and each block's calls.

    Every round times one block of each call, in an order that rotates by one
    from round to round, so that no call always follows the same neighbour and
    a slow drift of the machine falls on all of them alike.
    """
    keys = list(calls)
    sizes = {key: calls_per_block(calls[key], block, sync) for key in keys}
    samples: dict[K, list[float]] = {key: [] for key in keys}
    for round_ in progress(range(rounds), rounds, description):
        shift = round_ % len(keys)
        for key in keys[shift:] + keys[:shift]:
            seconds = time_block(calls[key], sizes[key], sync)
            samples[key].append(seconds / sizes[key] * 1e6)
    return samples, sizes
