"""What one piece of work takes at its peak on a device, measured around it."""

from __future__ import annotations

import threading

import torch

from torchmemguard.device.base import Backend
from torchmemguard.device.kinds import BACKENDS

_registry_lock = threading.Lock()
_busy: dict[str, threading.Lock] = {}


def _lock(name: str) -> threading.Lock:
    with _registry_lock:
        return _busy.setdefault(name, threading.Lock())


class Meter:
    """One measurement under way: :meth:`stop` gives the bytes taken at the peak.

    A device's peak statistic is the process's, so one measurement runs per
    device at a time; :func:`start` declines while another is under way.
    """

    __slots__ = ("_backend", "_device", "_lock", "_start")

    def __init__(self, backend: Backend, device: torch.device, lock: threading.Lock, start: int):
        self._backend = backend
        self._device = device
        self._lock = lock
        self._start = start

    def stop(self) -> int | None:
        """Bytes in use at the peak since :func:`start`, above those in use then."""
        try:
            peak = self._backend.peak(self._device)
        except Exception:  # a failed reading only means nothing was measured
            peak = None
        finally:
            self._lock.release()
        return None if peak is None else max(0, peak - self._start)

    def cancel(self) -> None:
        """End the measurement without a result (the work failed)."""
        self._lock.release()


def start(device: torch.device | None) -> Meter | None:
    """Start measuring the peak memory of ``device``; ``None`` where it cannot be measured
    now (an unknown device, one the process has not used, or another measurement
    under way).

    It resets the device's peak statistic (CUDA: ``torch.cuda.reset_peak_memory_stats``;
    the CPU: the peak resident set, ``VmHWM``).
    """
    known = _resolved(device)
    if known is None:
        return None
    found, resolved = known
    lock = _lock(str(resolved))
    if not lock.acquire(blocking=False):
        return None
    try:
        base = found.mark(resolved)
    except Exception:
        base = None
    if base is None:
        lock.release()
        return None
    return Meter(found, resolved, lock, base)


def measurable(device: torch.device | None) -> bool:
    """Whether the peak memory of ``device`` can be measured now (or is being measured)."""
    known = _resolved(device)
    if known is None:
        return False
    meter = start(device)
    if meter is not None:
        meter.cancel()
        return True
    return _lock(str(known[1])).locked()


def _resolved(device: torch.device | None) -> tuple[Backend, torch.device] | None:
    """The backend of ``device`` and the device it names exactly; None for an unknown one."""
    found = None if device is None else BACKENDS.get(device.type)
    if found is None or device is None:
        return None
    return found, found.resolve(device)
