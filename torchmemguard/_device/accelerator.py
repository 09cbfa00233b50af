"""CUDA and XPU: accelerators with a caching allocator, read through their torch module.

Nothing here initialises the device: before the process has used it, the
current device is index 0, nothing is read and no cache is emptied.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch

from torchmemguard._device.base import Limit, Reading, listed
from torchmemguard._units import format_bytes

# What torchmemguard last set, for a torch that cannot read the fraction back.
_caps_set: dict[str, float] = {}


class Accelerator:
    """A kind of device whose torch module has CUDA's memory API (``torch.cuda``, ``torch.xpu``).

    ``reads`` says whether its memory is read (for room, reports and metrics);
    where it is not, the device is still capped and its cache emptied.
    ``history`` says whether its allocator's history is recorded for snapshots.
    """

    def __init__(
        self, kind: str, module: ModuleType, reads: bool = True, history: bool = False
    ) -> None:
        self.kind = kind
        self._module = module
        self._reads = reads
        self.records_history = history

    def available(self) -> bool:
        return bool(self._module.is_available())

    def resolve(self, device: torch.device) -> torch.device:
        # The one place an index is chosen. Before the backend is initialised,
        # its current device is the first one, and asking would initialise it.
        index = device.index
        if index is None:
            index = self._module.current_device() if self._module.is_initialized() else 0
        return torch.device(self.kind, index)

    def _has_context(self, index: int) -> bool:
        """Whether the process has a context on ``index``: reading it would not create one."""
        if not self._reads or not self._module.is_initialized():
            return False
        query = getattr(torch._C, f"_{self.kind}_hasPrimaryContext", None)
        # Without the query, only the current device is known to have one.
        if query is None:
            return bool(index == self._module.current_device())
        return bool(query(index))

    def _readable(self, device: torch.device) -> int | None:
        """The index of ``device`` (resolved) where reading it creates no context; else None."""
        index = device.index
        return None if index is None or not self._has_context(index) else index

    def in_use(self) -> list[torch.device]:
        if not self._reads or not self._module.is_initialized():
            return []
        count = self._module.device_count()
        return [torch.device(self.kind, i) for i in range(count) if self._has_context(i)]

    def read(self, device: torch.device) -> Reading | None:
        """The allocator's statistics (one ``memory_stats`` call), the device's and the cap."""
        index = self._readable(device)
        if index is None:
            return None
        stats = self._module.memory_stats(index)
        free, total = self._module.mem_get_info(index)
        cap = self.limit(device).read()
        return Reading(
            device=str(device),
            allocated=stats.get("allocated_bytes.all.current", 0),
            reserved=stats.get("reserved_bytes.all.current", 0),
            active=stats.get("active_bytes.all.current", 0),
            inactive_split=stats.get("inactive_split_bytes.all.current", 0),
            peak_allocated=stats.get("allocated_bytes.all.peak", 0),
            total=total,
            free=free,
            budget=None if cap == math.inf else int(cap),
            alloc_retries=stats.get("num_alloc_retries", 0),
            ooms=stats.get("num_ooms", 0),
        )

    def mark(self, device: torch.device) -> int | None:
        """Bytes allocated now, after resetting the allocator's peak statistics to them."""
        index = self._readable(device)
        if index is None:
            return None
        self._module.reset_peak_memory_stats(index)
        allocated: int = self._module.memory_allocated(index)
        return allocated

    def peak(self, device: torch.device) -> int | None:
        index = self._readable(device)
        if index is None:
            return None
        peak: int = self._module.max_memory_allocated(index)
        return peak

    def allocated(self, device: torch.device) -> int | None:
        index = self._readable(device)
        if index is None:
            return None
        allocated: int = self._module.memory_allocated(index)
        return allocated

    def room(self, reading: Reading) -> int | None:
        """Free device memory and the allocator's cache, within any cap."""
        free, reserved, allocated = reading.free, reading.reserved, reading.allocated
        if free is None or reserved is None or allocated is None:
            return None
        found = free + reserved - allocated
        if reading.budget is not None:
            found = min(found, reading.budget - allocated)
        return max(0, found)

    def fragments(self, device: torch.device) -> bool:
        """False: the caching allocator gives a large block a segment of its own when
        its cache has no block to fit it (see :meth:`room`)."""
        return False

    def allocator_summary(self, device: torch.device) -> str | None:
        """The allocator's own report (``torch.cuda.memory_summary``), where it has one."""
        report = getattr(self._module, "memory_summary", None)
        index = self._readable(device)
        if report is None or index is None:
            return None
        text: str = report(index, abbreviated=True)
        return text

    def record_history(self, max_entries: int | None) -> None:
        """Record every allocation and free, the last ``max_entries`` of them, with
        their Python stacks; ``None`` stops recording and drops the history.

        Python stacks only: C++ frames would make the snapshot, taken on the
        failing call's thread, slow to symbolise.
        """
        memory = self._module.memory
        if max_entries is None:
            memory._record_memory_history(enabled=None)
        else:
            memory._record_memory_history(
                enabled="all", context="all", stacks="python", max_entries=max_entries
            )

    def dump_snapshot(self, path: str) -> None:
        """Pickle the allocator's snapshot (its segments and history) into ``path``."""
        self._module.memory._dump_snapshot(path)

    def describe(self, reading: Reading) -> str:
        parts = listed(
            (
                ("allocated", reading.allocated),
                ("reserved", reading.reserved),
                ("total", reading.total),
                ("free", reading.free),
            )
        )
        if reading.budget is not None:
            share = f" ({reading.budget / reading.total:.0%})" if reading.total else ""
            parts.append(f"cap {format_bytes(reading.budget)}{share}")
        return ", ".join(parts)

    def empty_cache(self, index: int | None) -> None:
        if not self._module.is_initialized():
            return
        if index is None:
            self._module.empty_cache()
        else:
            with self._module.device(index):
                self._module.empty_cache()

    def check(self, device: torch.device, given: object) -> torch.device:
        if not self._module.is_available():
            raise ValueError(f"device={given!r}: {self.kind.upper()} is not available")
        count = self._module.device_count()
        if device.index is not None and not 0 <= device.index < count:
            raise ValueError(
                f"device={given!r} does not exist: this machine has {count} "
                f"{self.kind.upper()} device{'s' if count != 1 else ''}"
            )
        return device

    def limit(self, device: torch.device) -> Limit:
        return _Fraction(self.resolve(device), self._module)


class _Fraction:
    """An accelerator's per-process memory fraction, enforced by its caching allocator.

    The allocator keeps ``int(fraction * total_memory)`` bytes, where
    ``total_memory`` is the device's, and reads the fraction back as those
    bytes over ``total_memory``; a cap of the whole device is none. A cap is
    written as the fraction that the allocator turns back into exactly those
    bytes, so that a cap read at entry is restored to the byte.
    """

    hard = False

    def __init__(self, device: torch.device, module: ModuleType) -> None:
        self.device = device
        self._module = module
        self._index = device.index
        self._total: int | None = None

    def total(self) -> int:
        if self._total is None:
            properties = self._module.get_device_properties(self._index)
            self._total = int(properties.total_memory)
        return self._total

    def read(self) -> float:
        if not self._module.is_initialized():
            return math.inf  # a fraction can only be set on an initialised device
        getter = getattr(self._module, "get_per_process_memory_fraction", None)
        if getter is None:
            return _caps_set.get(str(self.device), math.inf)
        fraction = float(getter(self._index))
        return math.inf if fraction >= 1.0 else round(fraction * self.total())

    def write(self, cap: float) -> None:
        # Half a byte up, so that the allocator's truncation lands on ``cap``.
        fraction = 1.0 if cap == math.inf else min(1.0, (cap + 0.5) / self.total())
        self._module.set_per_process_memory_fraction(fraction, self._index)
        _caps_set[str(self.device)] = cap

    def cap(self, fraction: float | None, size: int | None) -> float:
        total = self.total()
        cap = math.floor(fraction * total) if fraction is not None else size
        assert cap is not None
        return math.inf if cap >= total else cap

    def held(self) -> int | None:
        if not self._module.is_initialized():
            return None
        allocated: int = self._module.memory_allocated(self._index)
        return allocated

    def over(self, cap: float, held: int) -> str:
        return (
            f"memory_budget on {self.device}: {format_bytes(held)} is already "
            f"allocated, more than the cap of {format_bytes(cap)}. "
            "Free tensors before entering, or raise the budget."
        )

    def settle(self, cap: float) -> None:
        if self._module.memory_reserved(self._index) > cap:
            with self._module.device(self._index):
                self._module.empty_cache()
