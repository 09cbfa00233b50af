"""The CPU: the process seen from malloc and the operating system, capped by ``RLIMIT_AS``."""

from __future__ import annotations

import math

import torch

from torchmemguard._device import host, malloc
from torchmemguard._device.base import Limit, Reading, listed
from torchmemguard._units import format_bytes

# RLIMIT_AS takes at most a signed 64-bit count.
_LARGEST_ADDRESS_SPACE = 2**63 - 1


class Cpu:
    """The process's memory: one device, ``cpu``, whatever index it is given."""

    kind = "cpu"

    def available(self) -> bool:
        return True

    def resolve(self, device: torch.device) -> torch.device:
        return torch.device("cpu")

    def in_use(self) -> list[torch.device]:
        return [torch.device("cpu")]

    def read(self, device: torch.device) -> Reading:
        """The process seen from malloc and from the operating system.

        allocated and reserved are malloc's bytes in use and held, and
        inactive_split its free bytes between blocks in use, where glibc tells
        them (see :mod:`~torchmemguard._device.malloc`); address_space is what
        a CPU budget caps, resident and peak_resident the resident set and
        its peak; total is the memory available to the process (RAM or the
        cgroup limit), free what it could still take, and budget the soft
        ``RLIMIT_AS``.
        """
        limit = host.address_space_limit() if host.can_cap_address_space() else math.inf
        total, free = host.capacity_and_headroom()
        space, resident, peak = host.process_memory()
        heap = malloc.heap()
        return Reading(
            device="cpu",
            allocated=None if heap is None else heap.in_use,
            reserved=None if heap is None else heap.held,
            inactive_split=None if heap is None else heap.split,
            total=total,
            free=None if free is None else min(free, total),
            budget=None if limit == math.inf else int(limit),
            address_space=space,
            resident=resident,
            peak_resident=peak,
        )

    def room(self, reading: Reading) -> int | None:
        """Memory still available, within any address-space cap.

        What malloc keeps free (``reading.cached``) is not counted: it serves
        only blocks below glibc's mmap threshold, which a fixed threshold keeps
        small, and it is cut into pieces that a large block may not fit in.
        Counted, it sized chunks that ran out of memory under a real cap, with
        glibc's defaults and with a fixed threshold alike. A reading that misses
        it does no harm: the size memory counts only a fall of the room below
        what a chunk that fitted left (see :mod:`torchmemguard._sizing`).
        """
        if reading.free is None:
            return None
        spare = reading.free
        if reading.budget is not None and reading.address_space is not None:
            spare = min(spare, reading.budget - reading.address_space)
        return max(0, spare)

    def fragments(self, device: torch.device) -> bool:
        """Whether malloc serves large blocks from its heaps now: with glibc's
        defaults, once a block of 256 KiB or more was freed (see
        :func:`~torchmemguard._device.malloc.heaps_hold_large_blocks`)."""
        return malloc.heaps_hold_large_blocks()

    def describe(self, reading: Reading) -> str:
        parts = listed(
            (
                ("malloc in use", reading.allocated),
                ("malloc free", reading.cached),
                ("resident", reading.resident),
                ("address space", reading.address_space),
                ("available", reading.free),
                ("cap (RLIMIT_AS)", reading.budget),
            )
        )
        return ", ".join(parts) or "memory state unavailable"

    def empty_cache(self, index: int | None) -> None:
        """Return malloc's free memory to the system (``malloc_trim``), where glibc can."""
        malloc.trim()

    def mark(self, device: torch.device) -> int | None:
        """The resident set now, after resetting its peak (``VmHWM``) to it.

        Resident memory stands for address space here: a block the allocator
        maps for a chunk is written by it, so it is resident as long as it is
        held, and reading the resident peak is what Linux offers. Free memory
        that malloc keeps resident would be reused without the resident set
        growing, so it is returned first (``malloc_trim``, a millisecond or two).
        """
        malloc.trim()
        if not host.reset_peak_resident():
            return None
        return host.process_memory()[1]

    def peak(self, device: torch.device) -> int | None:
        return host.process_memory()[2]

    def allocated(self, device: torch.device) -> int | None:
        """malloc's bytes in use, where glibc tells them."""
        heap = malloc.heap()
        return None if heap is None else heap.in_use

    def check(self, device: torch.device, given: object) -> torch.device:
        if not host.can_cap_address_space():
            raise ValueError(
                f"device={given!r}: a CPU budget needs RLIMIT_AS and /proc, which only Linux has"
            )
        return torch.device("cpu")

    def limit(self, device: torch.device) -> Limit:
        return _AddressSpace()


class _AddressSpace:
    """The process's soft ``RLIMIT_AS``, measured against the memory available to it."""

    device = torch.device("cpu")
    hard = True

    def total(self) -> int:
        return host.capacity()

    def read(self) -> float:
        return host.address_space_limit()

    def write(self, cap: float) -> None:
        host.set_address_space_limit(cap)

    def cap(self, fraction: float | None, size: int | None) -> float:
        cap = math.floor(fraction * self.total()) if fraction is not None else size
        assert cap is not None
        return min(cap, _LARGEST_ADDRESS_SPACE)

    def held(self) -> int | None:
        return host.address_space()

    def over(self, cap: float, held: int) -> str:
        return (
            f"memory_budget on cpu: the cap of {format_bytes(cap)} is below the "
            f"process's current address space of {format_bytes(held)} "
            f"({int(cap)} < {held} bytes). A CPU budget caps address space "
            "(RLIMIT_AS), which already counts the libraries, thread stacks and "
            "allocator arenas: set it above the current address space."
        )

    def settle(self, cap: float) -> None:
        pass
