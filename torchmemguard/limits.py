"""Memory caps, one small interface per kind of device: part of the device layer.

Every cap is in bytes, ``math.inf`` meaning none, so that the tightest of
several caps is their minimum. An accelerator's cap is written as the
per-process memory fraction that its allocator turns back into exactly those
bytes, so that a cap read at entry is restored to the byte.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Protocol

import torch

from torchmemguard import host
from torchmemguard.errors import BudgetExceededError
from torchmemguard.units import format_bytes

_CAPPABLE = ("cuda", "xpu", "cpu")
# RLIMIT_AS takes at most a signed 64-bit count.
_LARGEST_ADDRESS_SPACE = 2**63 - 1
# What torchmemguard last set, for a torch that cannot read the fraction back.
_caps_set: dict[str, float] = {}


class Limit(Protocol):
    """How to read, set and check the memory cap of one device, in bytes."""

    device: torch.device

    def total(self) -> int:
        """The memory a fraction is taken of."""

    def read(self) -> float:
        """The cap in force; ``math.inf`` for none."""

    def write(self, cap: float) -> None:
        """Put ``cap`` in force."""

    def cap(self, fraction: float | None, size: int | None) -> float:
        """The cap for ``fraction`` of :meth:`total`, or for ``size`` bytes."""

    def check(self, cap: float, strict: bool, tightens: bool) -> None:
        """Raise :class:`BudgetExceededError` if the process already holds more than ``cap``."""

    def settle(self, cap: float) -> None:
        """Return cached memory above a new, tighter cap to the device."""


def _backend(kind: str) -> ModuleType | None:
    return getattr(torch, kind, None) if kind in ("cuda", "xpu") else None


def check_device(device: str | torch.device | int) -> torch.device:
    """``device`` as a torch.device that a memory cap can be put on, or a clear error."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a device: {exc}") from None
    if parsed.type not in _CAPPABLE:
        raise ValueError(
            f"device={device!r}: a memory budget can cap cuda, xpu and cpu devices, "
            f"not {parsed.type!r}"
        )
    backend = _backend(parsed.type)
    if backend is None:
        if not host.can_cap_address_space():
            raise ValueError(
                f"device={device!r}: a CPU budget needs RLIMIT_AS and /proc, which only Linux has"
            )
        return torch.device("cpu")
    if not backend.is_available():
        raise ValueError(f"device={device!r}: {parsed.type.upper()} is not available")
    count = backend.device_count()
    if parsed.index is not None and not 0 <= parsed.index < count:
        raise ValueError(
            f"device={device!r} does not exist: this machine has {count} "
            f"{parsed.type.upper()} device{'s' if count != 1 else ''}"
        )
    return parsed


def default_device() -> torch.device:
    """The current CUDA or XPU device if one is available, else the CPU."""
    for kind in ("cuda", "xpu"):
        backend = _backend(kind)
        if backend is not None and backend.is_available():
            return torch.device(kind)
    return torch.device("cpu")


def limit_for(device: torch.device) -> Limit:
    """The cap of ``device`` (checked by :func:`check_device`); the index is made explicit."""
    backend = _backend(device.type)
    if backend is None:
        return _AddressSpace()
    index = device.index
    if index is None:
        # Before the backend is initialised, its current device is the first one.
        index = backend.current_device() if backend.is_initialized() else 0
    return _Fraction(torch.device(device.type, index), backend)


class _Fraction:
    """An accelerator's per-process memory fraction, enforced by its caching allocator.

    The allocator keeps ``int(fraction * total_memory)`` bytes, where
    ``total_memory`` is the device's, and reads the fraction back as those
    bytes over ``total_memory``; a cap of the whole device is none.
    """

    def __init__(self, device: torch.device, backend: ModuleType) -> None:
        self.device = device
        self._backend = backend
        self._index = device.index
        self._total: int | None = None

    def total(self) -> int:
        if self._total is None:
            properties = self._backend.get_device_properties(self._index)
            self._total = int(properties.total_memory)
        return self._total

    def read(self) -> float:
        if not self._backend.is_initialized():
            return math.inf  # a fraction can only be set on an initialised device
        getter = getattr(self._backend, "get_per_process_memory_fraction", None)
        if getter is None:
            return _caps_set.get(str(self.device), math.inf)
        fraction = float(getter(self._index))
        return math.inf if fraction >= 1.0 else round(fraction * self.total())

    def write(self, cap: float) -> None:
        # Half a byte up, so that the allocator's truncation lands on ``cap``.
        fraction = 1.0 if cap == math.inf else min(1.0, (cap + 0.5) / self.total())
        self._backend.set_per_process_memory_fraction(fraction, self._index)
        _caps_set[str(self.device)] = cap

    def cap(self, fraction: float | None, size: int | None) -> float:
        total = self.total()
        cap = math.floor(fraction * total) if fraction is not None else size
        assert cap is not None
        return math.inf if cap >= total else cap

    def check(self, cap: float, strict: bool, tightens: bool) -> None:
        if not strict:
            return
        allocated = self._backend.memory_allocated(self._index)
        if allocated > cap:
            raise BudgetExceededError(
                f"memory_budget on {self.device}: {format_bytes(allocated)} is already "
                f"allocated, more than the cap of {format_bytes(cap)}. "
                "Free tensors before entering, or raise the budget."
            )

    def settle(self, cap: float) -> None:
        if self._backend.memory_reserved(self._index) > cap:
            with self._backend.device(self._index):
                self._backend.empty_cache()


class _AddressSpace:
    """The process's soft ``RLIMIT_AS``, measured against the memory available to it."""

    device = torch.device("cpu")

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

    def check(self, cap: float, strict: bool, tightens: bool) -> None:
        space = host.address_space()
        if tightens and space is not None and space > cap:
            raise BudgetExceededError(
                f"memory_budget on cpu: the cap of {format_bytes(cap)} is below the "
                f"process's current address space of {format_bytes(space)} "
                f"({int(cap)} < {space} bytes). A CPU budget caps address space "
                "(RLIMIT_AS), which already counts the libraries, thread stacks and "
                "allocator arenas: set it above the current address space."
            )

    def settle(self, cap: float) -> None:
        pass
