"""What a guarded call reports as it goes: the guard's counters, the metrics, and the
warning that splitting changes a module's batch statistics.

A :class:`~torchmemguard._run.Run` reports through the small :class:`Events`
interface only; :class:`GuardEvents` is the guard's implementation of it. An
event only counts: what a call does next is never decided here. Nothing here
runs on the happy path: every event follows an out-of-memory error or a split.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Protocol

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

    def split(self, device: torch.device | None) -> None:
        """The call runs in chunks."""

    def merged(self, device: torch.device | None, largest: int) -> None:
        """A split call is merging the outputs of chunks of at most ``largest`` samples."""

    def peak(self, device: torch.device | None, peak: int) -> None:
        """The call's measured attempts took at most ``peak`` bytes at their peak."""

    def unrecovered(self, device: torch.device | None) -> None:
        """The call gives up with :class:`torchmemguard.OutOfMemoryError`."""


class GuardEvents:
    """The guard's counters and metrics."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stats = GuardStats()
        self._lock = threading.Lock()

    def oom(self, device: torch.device | None) -> None:
        self._count("ooms", device)

    def retry(self, device: torch.device | None) -> None:
        self._count("retries", device)

    def split(self, device: torch.device | None) -> None:
        self._count("split_calls", device)

    def merged(self, device: torch.device | None, largest: int) -> None:
        metrics.set_chunk_size(self.name, device, largest)

    def peak(self, device: torch.device | None, peak: int) -> None:
        metrics.set_peak(self.name, device, peak)

    def unrecovered(self, device: torch.device | None) -> None:
        self._count("unrecovered", device)

    def _count(self, counter: metrics.GuardCounter, device: torch.device | None) -> None:
        with self._lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        metrics.count(self.name, device, counter)


class CoupledWarning:
    """Warns once per module that splitting its batch changes the statistics of its
    batch-coupled layers (BatchNorm in training mode)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._warned: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()

    def __call__(self, module: object) -> None:
        """The call of ``module`` (a module, an instance or None) runs in chunks."""
        if not isinstance(module, torch.nn.Module) or not module.training:
            return
        with self._lock:
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
