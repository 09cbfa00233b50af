"""What every device backend offers, and the one reading its answers come from."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from torchmemguard._units import format_bytes


@dataclass(frozen=True)
class Reading:
    """One device's memory, in bytes; ``None`` where the device has no such number.

    allocated is what the allocator has handed out and not freed, reserved what
    it holds (allocated and its cache), on CUDA and on the CPU alike. The CPU
    adds what the system sees of the process: its address space (what a CPU
    budget caps), its resident set and that set's peak.
    """

    device: str
    allocated: int | None = None
    reserved: int | None = None
    active: int | None = None
    inactive_split: int | None = None
    peak_allocated: int | None = None
    total: int | None = None
    free: int | None = None
    budget: int | None = None
    alloc_retries: int | None = None
    ooms: int | None = None
    address_space: int | None = None
    resident: int | None = None
    peak_resident: int | None = None

    @property
    def cached(self) -> int | None:
        """Held by the allocator and free in it: what its next allocations reuse."""
        if self.reserved is None or self.allocated is None:
            return None
        return max(0, self.reserved - self.allocated)

    @property
    def used_ratio(self) -> float | None:
        """Used over total for the whole device, all processes included."""
        if self.total is None or self.free is None or self.total <= 0:
            return None
        return (self.total - self.free) / self.total

    @property
    def budget_used_ratio(self) -> float | None:
        """What the cap counts over the cap: reserved (CPU: address space) over the budget."""
        capped = self.reserved if self.address_space is None else self.address_space
        if self.budget is None or capped is None or self.budget <= 0:
            return None
        return capped / self.budget


class Limit(Protocol):
    """How to read, set and check the memory cap of one device, in bytes.

    Every cap is in bytes, ``math.inf`` meaning none, so that the tightest of
    several caps is their minimum.
    """

    device: torch.device
    # Whether a cap below what the process holds breaks it: every allocation would
    # fail at once (an address-space cap), rather than only until memory is freed.
    hard: bool

    def total(self) -> int:
        """The memory a fraction is taken of."""

    def read(self) -> float:
        """The cap in force; ``math.inf`` for none."""

    def write(self, cap: float) -> None:
        """Put ``cap`` in force."""

    def cap(self, fraction: float | None, size: int | None) -> float:
        """The cap for ``fraction`` of :meth:`total`, or for ``size`` bytes."""

    def held(self) -> int | None:
        """What the cap counts that the process holds now; ``None`` where unknown."""

    def over(self, cap: float, held: int) -> str:
        """Why a cap of ``cap`` bytes is below the ``held`` bytes, and what to do, in words."""

    def settle(self, cap: float) -> None:
        """Return cached memory above a new, tighter cap to the device."""


class Backend(Protocol):
    """One kind of device: its memory and its cache.

    Room and description are computed from a :class:`Reading`, the same one the
    metrics report, so that every number about a device is read one way. No
    method may initialise the device: one the process has not used yet is left
    alone, and reads as ``None``.

    What only some kinds can do is a protocol of its own, which a backend
    implements or not (checked with ``isinstance``): :class:`Capper` (a
    budget), :class:`Summarizer` (the allocator's summary) and
    :class:`HistoryRecorder` (the allocator's history).
    """

    kind: str

    def available(self) -> bool:
        """Whether this machine has such a device."""

    def resolve(self, device: torch.device) -> torch.device:
        """``device`` with its index made explicit, without initialising anything."""

    def in_use(self) -> list[torch.device]:
        """The devices that the process uses now and that can be read."""

    def read(self, device: torch.device) -> Reading | None:
        """The memory of ``device`` (resolved); ``None`` where it cannot be read now."""

    def room(self, reading: Reading) -> int | None:
        """Bytes the process could still take, from ``reading``; ``None`` where unknown."""

    def fragments(self, device: torch.device) -> bool:
        """Whether the allocator now serves large blocks from heaps where freed
        blocks fragment, so that a chunk may not find room its reading shows."""

    def describe(self, reading: Reading) -> str:
        """``reading`` in one line, for error messages."""

    def empty_cache(self, index: int | None) -> None:
        """Release cached blocks of device ``index`` (``None``: the current one), if in use."""

    def mark(self, device: torch.device) -> int | None:
        """Start a new peak: reset the peak memory statistic of ``device`` (resolved) and
        return the bytes in use now; ``None`` where no peak can be measured."""

    def peak(self, device: torch.device) -> int | None:
        """The most bytes in use on ``device`` since :meth:`mark`; ``None`` where unknown."""

    def allocated(self, device: torch.device) -> int | None:
        """Bytes the allocator of ``device`` (resolved) has handed out and not freed now,
        without resetting anything; ``None`` where unknown."""


@runtime_checkable
class Capper(Protocol):
    """A backend whose devices a memory budget can cap."""

    def check(self, device: torch.device, given: object) -> torch.device:
        """``device`` as its cap applies to it, or a ValueError that names ``given``."""

    def limit(self, device: torch.device) -> Limit:
        """The cap of ``device`` (resolved and checked)."""


@runtime_checkable
class Summarizer(Protocol):
    """A backend whose allocator can describe its state in text, for a post-mortem."""

    def allocator_summary(self, device: torch.device) -> str | None:
        """The allocator's own summary of ``device`` (resolved); ``None`` where unavailable."""


@runtime_checkable
class HistoryRecorder(Protocol):
    """A backend whose allocator can record its history and write a snapshot of it.

    The history is the process's, for every device of the kind: torch keeps one.
    """

    records_history: bool  # whether torchmemguard records this kind's history

    def available(self) -> bool:
        """Whether this machine has such a device."""

    def record_history(self, max_entries: int | None) -> None:
        """Record the allocator's last ``max_entries`` events; ``None`` stops recording."""

    def dump_snapshot(self, path: str) -> None:
        """Write the allocator's state and recorded history to ``path``, pickled."""


def listed(fields: Iterable[tuple[str, int | None]]) -> list[str]:
    """``label size`` for each field of a reading that has a value, for a description."""
    return [f"{label} {format_bytes(value)}" for label, value in fields if value is not None]
