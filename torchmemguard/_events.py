"""What a guarded call reports as it goes: the guard's counters, and the metrics.

A :class:`~torchmemguard._run.Run` reports through the small :class:`Events`
interface only; :class:`GuardEvents` is the guard's implementation of it.
Nothing here runs on the happy path: every event follows an out-of-memory
error or a split.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from torchmemguard._observability import metrics


@dataclass
class GuardStats:
    """Counters of one guarded callable, since it was decorated."""

    ooms: int = 0  # out-of-memory errors caught
    retries: int = 0  # attempts made after an out-of-memory error
    split_calls: int = 0  # calls that ran in more than one chunk
    unrecovered: int = 0  # calls that failed with OutOfMemoryError in the end


# Why a guard no longer retries or splits a callable: what was found, and what to do.
Refusal = tuple[str, str]


class Events(Protocol):
    """What one call tells its guard; ``device`` is the device the metrics name."""

    name: str  # the guarded callable, for messages and metrics

    def oom(self, device: torch.device | None) -> None:
        """An out-of-memory error was caught."""

    def retry(self, device: torch.device | None) -> None:
        """An attempt follows an out-of-memory error, its memory recovered."""

    def split(self, device: torch.device | None, owner: object) -> None:
        """The call of ``owner`` (a module, an instance or None) runs in chunks."""

    def merged(self, device: torch.device | None, largest: int) -> None:
        """A split call is merging the outputs of chunks of at most ``largest`` samples."""

    def unrecovered(self, device: torch.device | None) -> None:
        """The call gives up with :class:`torchmemguard.OutOfMemoryError`."""

    def refused(self, refusal: Refusal) -> None:
        """The callable cannot be retried or split correctly (it runs ``backward()``, its
        rows depend on each other): from now on its calls run whole, as they are."""


class GuardEvents:
    """The guard's counters and metrics; ``on_refused`` learns that calls cannot be split."""

    def __init__(
        self, name: str, on_refused: Callable[[Refusal], None], warn_coupled: bool = True
    ) -> None:
        self.name = name
        self.stats = GuardStats()
        self._on_refused = on_refused
        self._warn_coupled = warn_coupled
        self._lock = threading.Lock()
        self._warned: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()

    def oom(self, device: torch.device | None) -> None:
        self._count("ooms", device)

    def retry(self, device: torch.device | None) -> None:
        self._count("retries", device)

    def split(self, device: torch.device | None, owner: object) -> None:
        self._count("split_calls", device)
        if self._warn_coupled:
            self._warn_batch_coupled(owner)

    def merged(self, device: torch.device | None, largest: int) -> None:
        metrics.set_chunk_size(self.name, device, largest)

    def unrecovered(self, device: torch.device | None) -> None:
        self._count("unrecovered", device)

    def refused(self, refusal: Refusal) -> None:
        self._on_refused(refusal)

    def _count(self, counter: metrics.GuardCounter, device: torch.device | None) -> None:
        with self._lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        metrics.count(self.name, device, counter)

    def _warn_batch_coupled(self, module: Any) -> None:
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
