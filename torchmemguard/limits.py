"""Memory caps, one small interface per kind of device: part of the device layer.

A cap is held as the device's own setting: a fraction of the device for an
accelerator, bytes of address space for the CPU, so that the setting found at
entry can be restored exactly. Both grow with the memory allowed, so the
tightest of several settings is their minimum.
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
# What torchmemguard last set, for a torch that cannot read the fraction back.
_fractions_set: dict[str, float] = {}


class Limit(Protocol):
    """How to read, set and check the memory cap of one device."""

    device: torch.device

    def total(self) -> int:
        """The memory a fraction is taken of, in bytes."""

    def read(self) -> float:
        """The setting in force."""

    def write(self, setting: float) -> None:
        """Put ``setting`` in force."""

    def setting(self, fraction: float | None, size: int | None) -> float:
        """The setting for a cap of ``fraction`` of :meth:`total`, or of ``size`` bytes."""

    def is_cap(self, setting: float) -> bool:
        """Whether ``setting`` limits anything."""

    def in_bytes(self, setting: float) -> int:
        """The cap of ``setting`` in bytes."""

    def as_fraction(self, setting: float) -> float:
        """The cap of ``setting`` as a fraction of :meth:`total`."""

    def check(self, setting: float, strict: bool) -> None:
        """Raise :class:`BudgetExceededError` if the process already holds more."""

    def settle(self, setting: float) -> None:
        """Return cached memory above a new cap to the device."""


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
        return parsed
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
    """The current accelerator if one is available, else the CPU."""
    for kind in ("cuda", "xpu"):
        backend = _backend(kind)
        if backend is not None and backend.is_available():
            return torch.device(kind)
    if torch.backends.mps.is_available():
        return torch.device("mps")
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
    """An accelerator's per-process memory fraction, enforced by its caching allocator."""

    def __init__(self, device: torch.device, backend: ModuleType) -> None:
        self.device = device
        self._backend = backend
        self._index = device.index

    def total(self) -> int:
        return int(self._backend.mem_get_info(self._index)[1])

    def read(self) -> float:
        if not self._backend.is_initialized():
            return 1.0  # a fraction can only be set on an initialised device
        getter = getattr(self._backend, "get_per_process_memory_fraction", None)
        if getter is None:
            return _fractions_set.get(str(self.device), 1.0)
        return float(getter(self._index))

    def write(self, setting: float) -> None:
        self._backend.set_per_process_memory_fraction(setting, self._index)
        _fractions_set[str(self.device)] = setting

    def setting(self, fraction: float | None, size: int | None) -> float:
        if fraction is not None:
            return fraction
        assert size is not None
        return min(1.0, size / self.total())

    def is_cap(self, setting: float) -> bool:
        return setting < 1.0

    def in_bytes(self, setting: float) -> int:
        return int(setting * self.total())

    def as_fraction(self, setting: float) -> float:
        return setting

    def check(self, setting: float, strict: bool) -> None:
        if not strict:
            return
        allocated = self._backend.memory_allocated(self._index)
        cap = self.in_bytes(setting)
        if allocated > cap:
            raise BudgetExceededError(
                f"memory_budget on {self.device}: {format_bytes(allocated)} is already "
                f"allocated, more than the cap of {format_bytes(cap)} ({setting:.1%}). "
                "Free tensors before entering, or raise the budget."
            )

    def settle(self, setting: float) -> None:
        if self._backend.memory_reserved(self._index) > self.in_bytes(setting):
            with self._backend.device(self._index):
                self._backend.empty_cache()


class _AddressSpace:
    """The process's soft ``RLIMIT_AS``, measured against the memory available to it."""

    device = torch.device("cpu")

    def total(self) -> int:
        return host.capacity()

    def read(self) -> float:
        return host.address_space_limit()

    def write(self, setting: float) -> None:
        host.set_address_space_limit(setting)

    def setting(self, fraction: float | None, size: int | None) -> float:
        if fraction is not None:
            return math.floor(fraction * self.total())
        assert size is not None
        return size

    def is_cap(self, setting: float) -> bool:
        return setting != math.inf

    def in_bytes(self, setting: float) -> int:
        return int(setting)

    def as_fraction(self, setting: float) -> float:
        return setting / self.total()

    def check(self, setting: float, strict: bool) -> None:
        space = host.address_space()
        if space is not None and space > setting:
            raise BudgetExceededError(
                f"memory_budget on cpu: the cap of {format_bytes(setting)} is below the "
                f"process's current address space of {format_bytes(space)} "
                f"({int(setting)} < {space} bytes). A CPU budget caps address space "
                "(RLIMIT_AS), which already counts the libraries, thread stacks and "
                "allocator arenas: set it above the current address space."
            )

    def settle(self, setting: float) -> None:
        pass
