"""The device layer: the only code that asks torch's device modules and the system about memory.

Each kind of device has one small backend (:mod:`~torchmemguard._device.accelerator`
for CUDA and XPU, :mod:`~torchmemguard._device.mps`, :mod:`~torchmemguard._device.cpu`),
and every number about a device comes from one :class:`Reading` of it: the room
the guard sizes chunks by, the report in an error message and the metrics. The
rest of torchmemguard goes through the names here and is device-agnostic.

Nothing here initialises a device: a backend that the process has not used yet
is left alone.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from torchmemguard._device import fragmentation, host, meter
from torchmemguard._device.base import (
    Backend,
    Capper,
    HistoryRecorder,
    Limit,
    Reading,
    Summarizer,
)
from torchmemguard._device.kinds import BACKENDS, backend
from torchmemguard._device.nvidia import Nvml
from torchmemguard._device.oom import TorchOutOfMemoryError
from torchmemguard._device.recovery import empty_cache, recover, recoveries, without_onednn

__all__ = [
    "Backend",
    "HistoryRecorder",
    "Limit",
    "Reading",
    "TorchOutOfMemoryError",
    "address_space_capped",
    "backend",
    "backends",
    "check_device",
    "default_device",
    "describe",
    "dump_snapshot",
    "empty_cache",
    "fragments",
    "history_kind",
    "limit_for",
    "meter",
    "nvml",
    "record_history",
    "recover",
    "recoveries",
    "room",
    "summary",
    "without_onednn",
]

nvml = Nvml()
"""GPU utilisation and temperature of CUDA devices, where ``nvidia-ml-py`` is installed."""

_UNREAD = "memory state unavailable for this device"


def backends() -> list[Backend]:
    """Every backend, in the order the metrics report their devices."""
    return list(BACKENDS.values())


def _read(device: torch.device) -> tuple[Backend, Reading] | None:
    """The backend of ``device`` and its one reading; ``None`` where it cannot be read now."""
    found = BACKENDS.get(device.type)
    reading = None if found is None else found.read(found.resolve(device))
    return None if found is None or reading is None else (found, reading)


def room(device: torch.device | None) -> int | None:
    """Bytes the process could still take on ``device`` now; ``None`` where unknown.

    On CUDA: free device memory and the allocator's cache, within any cap. On
    the CPU: memory still available, within any address-space cap.
    """
    if device is None:
        return None
    try:
        found = _read(device)
        return None if found is None else found[0].room(found[1])
    except Exception:  # a reading that fails only means the room is unknown
        return None


def fragments(device: torch.device) -> bool:
    """Whether ``device``'s allocator serves large blocks from heaps that fragment now;
    False where unknown."""
    found = BACKENDS.get(device.type)
    try:
        return found is not None and found.fragments(found.resolve(device))
    except Exception:  # a check that fails only means nothing is known
        return False


def allocated(device: torch.device) -> int | None:
    """Bytes handed out on ``device`` and not freed now; None where unknown."""
    found = BACKENDS.get(device.type)
    try:
        return None if found is None else found.allocated(found.resolve(device))
    except Exception:  # a reading that fails only means nothing is known
        return None


def describe(device: torch.device | None) -> str:
    """The memory state of ``device`` in one line, for error messages (the CPU's if None),
    with its fragmentation where there is much."""
    try:
        found = _read(torch.device("cpu") if device is None else device)
        if found is None:
            return _UNREAD
        backend, reading = found
        text = backend.describe(reading)
        split = fragmentation.found(reading, backend.kind)
        return text if split is None else f"{text}; {fragmentation.sentence(split)}"
    except Exception as exc:  # a report must never hide the error it explains
        return f"memory state unavailable ({exc!r})"


def summary(device: torch.device | None) -> dict[str, Any]:
    """Everything known of ``device``'s memory now, for a post-mortem (the CPU's if None):
    the fields of its reading, and on CUDA the allocator's own summary."""
    device = torch.device("cpu") if device is None else device
    try:
        found = _read(device)
    except Exception as exc:  # a post-mortem must never hide the error it explains
        return {"device": str(device), "unavailable": repr(exc)}
    if found is None:
        return {"device": str(device), "unavailable": _UNREAD}
    backend, reading = found
    fields = {name: value for name, value in vars(reading).items() if value is not None}
    split = fragmentation.found(reading, backend.kind)
    if split is not None:
        fields["fragmentation"] = split
    if device.type == "cpu":
        fields["status"] = host.status()  # every kB field of /proc/self/status
    if isinstance(backend, Summarizer):
        with contextlib.suppress(Exception):
            fields["allocator_summary"] = backend.allocator_summary(backend.resolve(device))
    return fields


def address_space_capped() -> bool:
    """Whether an address-space cap (``RLIMIT_AS``) is in force on this process."""
    return host.address_space_capped()


def _parsed(device: str | torch.device | int) -> torch.device:
    """``device`` as a torch.device, or a ValueError that names it."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a device: {exc}") from None


def _cappers() -> dict[str, Capper]:
    return {kind: found for kind, found in BACKENDS.items() if isinstance(found, Capper)}


def check_device(device: str | torch.device | int) -> torch.device:
    """``device`` as a torch.device that a memory cap can be put on, or a clear error."""
    parsed = _parsed(device)
    found = _cappers().get(parsed.type)
    if found is None:
        kinds = list(_cappers())
        listed = ", ".join(kinds[:-1]) + f" and {kinds[-1]}" if len(kinds) > 1 else kinds[0]
        raise ValueError(
            f"device={device!r}: a memory budget can cap {listed} devices, not {parsed.type!r}"
        )
    return found.check(parsed, device)


def default_device() -> torch.device:
    """The current CUDA or XPU device if one is available, else the CPU."""
    for kind, found in BACKENDS.items():
        if kind != "cpu" and isinstance(found, Capper) and found.available():
            return torch.device(kind)
    return torch.device("cpu")


def limit_for(device: torch.device) -> Limit:
    """The cap of ``device`` (checked by :func:`check_device`); the index is made explicit."""
    found = BACKENDS[device.type]
    assert isinstance(found, Capper)
    return found.limit(found.resolve(device))


def _recorders() -> dict[str, HistoryRecorder]:
    return {
        kind: found
        for kind, found in BACKENDS.items()
        if isinstance(found, HistoryRecorder) and found.records_history
    }


def history_kind(device: str | torch.device | int | None) -> str:
    """The kind of device whose allocator history ``device`` names, or a ValueError
    that names ``device``: the first available one for ``None``.

    torch records one history per process for every device of a kind, so an
    index only has to exist.
    """
    recorders = _recorders()
    if device is None:
        for kind, each in recorders.items():
            if each.available():
                return kind
        kinds = " or ".join(kind.upper() for kind in recorders) or "no kind of device"
        raise ValueError(
            f"device=None: no device here records its allocator's history ({kinds} is "
            "not available)"
        )
    parsed = _parsed(device)
    found = recorders.get(parsed.type)
    if found is None:
        listed = " and ".join(recorders) or "no"
        raise ValueError(
            f"device={device!r}: allocator snapshots are recorded on {listed} devices, "
            f"not {parsed.type!r}"
        )
    if not found.available():
        raise ValueError(f"device={device!r}: {parsed.type.upper()} is not available")
    capper = BACKENDS[parsed.type]
    if isinstance(capper, Capper):
        capper.check(parsed, device)  # the index exists
    return parsed.type


def record_history(kind: str, max_entries: int | None) -> None:
    """Record the history of the allocator of devices of ``kind`` (checked by
    :func:`history_kind`), its last ``max_entries`` events; ``None`` stops."""
    _recorders()[kind].record_history(max_entries)


def dump_snapshot(kind: str, path: str) -> None:
    """Write a snapshot of the allocator of devices of ``kind`` to ``path``, pickled."""
    _recorders()[kind].dump_snapshot(path)
