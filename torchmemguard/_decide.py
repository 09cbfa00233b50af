"""The decisions one guarded call or training step takes after each attempt.

A call (:class:`~torchmemguard._run.Run`) and a training step
(:class:`~torchmemguard._training.step.AccumulatingStep`) differ in what an
attempt is: a call runs its chunks one after another and keeps what fitted; a
step runs every micro-batch again, with its gradients put back and the size
agreed across ranks. What follows an attempt is the same for both, and is
decided here, once:

- :func:`noted`: an out-of-memory error, counted, and the device it names;
- :func:`shrunk`: the size to propose after it (the size memory's next chunk);
- :func:`verdict`: with the size agreed, go on or give up (too many errors, or
  even the smallest size ran out after one last try with a full collection);
- :func:`recover`: the recovery before the next attempt, carried out once the
  exception is gone;
- :func:`fitted`: what an attempt that fitted teaches the size memory;
- :func:`unrecovered`: the report of a call that gives up.

:class:`Progress` is the data they read and write, and nothing else. What they
need of the devices comes in as a :class:`Devices` object, so that a decision
is tested with fakes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from torchmemguard import _device as devices
from torchmemguard._classify import onednn_failed, oom_device, without_traceback
from torchmemguard._events import Events
from torchmemguard._fitting import CallShape
from torchmemguard._observability import postmortem
from torchmemguard._sizing import SizeMemory


class Devices(Protocol):
    """What the decisions ask of the device layer."""

    def recoveries(self, device: torch.device | None) -> int:
        """How many times ``device``'s memory was recovered: a recovery's generation."""

    def recover(self, device: torch.device | None, seen: int, collect: bool) -> None:
        """Recover ``device``'s memory, unless another recovery came after ``seen``."""

    def measurable(self, device: torch.device | None) -> bool:
        """Whether an attempt's peak memory on ``device`` can be measured."""

    def describe(self, device: torch.device | None) -> str:
        """``device``'s memory in one line."""


class _DeviceLayer:
    """The device layer itself, as :class:`Devices`."""

    def recoveries(self, device: torch.device | None) -> int:
        return devices.recoveries(device)

    def recover(self, device: torch.device | None, seen: int, collect: bool) -> None:
        devices.recover(device, seen, collect=collect)

    def measurable(self, device: torch.device | None) -> bool:
        return devices.meter.measurable(device)

    def describe(self, device: torch.device | None) -> str:
        return devices.describe(device)


DEVICES: Devices = _DeviceLayer()


@dataclass
class Progress:
    """What one call or step has been through: data only."""

    n: int  # samples in the batch
    chunk: int  # the size of the next attempt
    device: torch.device | None = None  # the batch's
    ooms: int = 0  # out-of-memory errors; a step counts the rounds in which a rank ran out
    smallest: int = 0  # the smallest attempt that ran out; n before any
    ceiling: int | None = None  # the smallest that ran out in this call: never retried
    collected: bool = False  # the last try, after a full garbage collection, was granted
    ran_out: torch.device | None = None  # the device of the last OOM
    last_oom: BaseException | None = None  # a copy of the last OOM, without its frames
    onednn_failed: bool = False  # oneDNN could not create a primitive
    pending: int | None = None  # the generation of a recovery to run before the next attempt
    measured: bool = False  # an attempt had its peak measured
    peak: int | None = None  # the most bytes a measured attempt took at its peak
    counted: bool = False  # this call counted towards growing the limit

    def __post_init__(self) -> None:
        self.smallest = self.smallest or self.n

    @property
    def where(self) -> torch.device | None:
        """The device the metrics name: the last OOM's, or before any, the batch's."""
        return self.ran_out if self.ooms else self.device


def noted(progress: Progress, exc: BaseException, events: Events) -> None:
    """Count the out-of-memory error ``exc``, and keep what a retry needs to know of it."""
    progress.ran_out = named(oom_device(exc), progress.device)
    progress.ooms += 1
    events.oom(progress.where)
    progress.last_oom = without_traceback(exc)
    progress.onednn_failed = progress.onednn_failed or onednn_failed(exc)


def shrunk(memory: SizeMemory, shape: CallShape, size: int, min_chunk: int) -> int:
    """The size to propose after an attempt of ``size`` ran out: the size memory's next,
    or ``size`` itself where it is already the smallest."""
    if size <= max(1, min_chunk):
        return size
    return max(min_chunk, memory.failed(shape, size))


@dataclass(frozen=True)
class GiveUp:
    """Why a call or step stops."""

    why: str


def verdict(
    progress: Progress, size: int, smaller: int, max_retries: int, unit: str = "chunk"
) -> GiveUp | None:
    """After an attempt of ``size`` ran out and ``smaller`` is next: give up, or go on.

    Too many errors end it; so does the smallest size running out again after
    one last try, granted here, after a full garbage collection.
    """
    progress.smallest = min(progress.smallest, size)
    progress.ceiling = min(progress.ceiling or size, size)
    if progress.ooms > max_retries:
        return GiveUp(f"gave up after {progress.ooms} out-of-memory errors")
    if smaller >= size:
        if progress.collected:
            return GiveUp(f"even the smallest {unit} ran out of memory")
        progress.collected = True
    progress.chunk = smaller
    return None


def recover(
    progress: Progress,
    memory: SizeMemory,
    shape: CallShape | None,
    events: Events,
    found: Devices,
    min_chunk: int,
    probe: bool = True,
) -> None:
    """Carry out the pending recovery: the device's memory, then the size memory's note
    of the room; with ``probe``, a first chunk small enough to be measured."""
    seen = progress.pending
    if seen is None:
        return
    progress.pending = None
    found.recover(progress.ran_out, seen, progress.collected)
    if shape is not None:
        measurable = probe and found.measurable(progress.ran_out)
        chunk = memory.recovered(shape, progress.ran_out, measurable)
        if chunk is not None and not progress.collected:
            progress.chunk = max(min_chunk, min(progress.chunk, chunk))
    events.retry(progress.where)


def fitted(
    progress: Progress,
    memory: SizeMemory,
    shape: CallShape,
    size: int,
    peak: int | None,
    min_chunk: int,
) -> None:
    """What an attempt of ``size`` that fitted teaches: the next chunk, never as large as
    one that ran out in this call."""
    renew = peak is not None and not progress.measured
    progress.measured = progress.measured or renew
    if peak is not None:
        progress.peak = max(peak, progress.peak or 0)
    if size >= progress.n:
        if progress.ooms:
            memory.fitted(shape, progress.n, False, peak, renew)
        return
    # Growth counts calls, not chunks: one call of many chunks is one success.
    limited = size == progress.chunk and not progress.counted
    progress.counted = progress.counted or limited
    chunk = memory.fitted(shape, size, limited, peak, renew)
    if progress.ceiling is not None:
        # Other threads may raise the shared limit: never retry what failed here.
        chunk = min(chunk, progress.ceiling - 1)
    progress.chunk = max(min_chunk, chunk)


def unrecovered(
    name: str,
    progress: Progress,
    device: torch.device | None,
    memory: SizeMemory,
    events: Events,
    found: Devices,
    why: str,
) -> str:
    """Report a call of ``name`` that gives up on ``device`` (metrics, post-mortem); the
    message of its error, up to the advice."""
    events.unrecovered(device)
    batch: dict[str, Any] = {"size": progress.n, "smallest_chunk": progress.smallest}
    batch["ooms"] = progress.ooms
    postmortem.report(name, device, batch, memory.learned(), why)
    return (
        f"{name} ran out of memory on {device or 'an unknown device'}: {why}. "
        f"Memory: {found.describe(device)}."
    )


def named(ran_out: torch.device | None, batch: torch.device | None) -> torch.device | None:
    """The device an OOM names, as exactly as known: ``cuda`` becomes the batch's ``cuda:1``,
    and an OOM that names none ran out on the batch's device."""
    if ran_out is None:
        return batch
    if ran_out.index is None and batch is not None and batch.type == ran_out.type:
        return batch
    return ran_out
