"""Apple's MPS: its cache is emptied after an out-of-memory error, and nothing more.

Its memory is not read and cannot be capped: a budget refuses it, and the
guard's room and reports on it are unknown.
"""

from __future__ import annotations

import torch

from torchmemguard._device.base import Reading


class Mps:
    """The ``mps`` device, through ``torch.mps``."""

    kind = "mps"

    def available(self) -> bool:
        return bool(torch.backends.mps.is_available())

    def resolve(self, device: torch.device) -> torch.device:
        return torch.device("mps", 0 if device.index is None else device.index)

    def in_use(self) -> list[torch.device]:
        return []

    def read(self, device: torch.device) -> Reading | None:
        return None

    def room(self, reading: Reading) -> int | None:
        return None

    def fragments(self, device: torch.device) -> bool:
        return False

    def describe(self, reading: Reading) -> str:
        return "memory state unavailable for this device"

    def empty_cache(self, index: int | None) -> None:
        if torch.backends.mps.is_available():
            torch.mps.empty_cache()

    def mark(self, device: torch.device) -> int | None:
        return None

    def peak(self, device: torch.device) -> int | None:
        return None

    def allocated(self, device: torch.device) -> int | None:
        if not torch.backends.mps.is_available():
            return None
        return int(torch.mps.current_allocated_memory())
