"""What one piece of work takes at its peak on a device, measured around it."""

from __future__ import annotations

import threading

import torch

from torchmemguard._device.base import Backend
from torchmemguard._device.kinds import BACKENDS


class _Attempts:
    """The guarded attempts under way on one device, and whether its peak was ever read."""

    __slots__ = ("markable", "running", "started")

    def __init__(self) -> None:
        self.running = 0  # attempts under way
        self.started = 0  # attempts started, ever
        self.markable = False  # a measurement has been started on it


_lock = threading.Lock()  # guards _devices and their counts
_devices: dict[str, _Attempts] = {}


class Meter:
    """One retry or chunk under way on a device: :meth:`stop` gives the bytes it took
    at its peak, where they could be measured.

    A device's peak statistic is the process's: a measurement is taken only by
    an attempt that starts alone on its device, and given only where no other
    attempt started before it ended.
    """

    __slots__ = ("_backend", "_device", "_start", "_started", "_state")

    def __init__(
        self,
        backend: Backend,
        device: torch.device,
        state: _Attempts,
        start: int | None,
        started: int,
    ) -> None:
        self._backend = backend
        self._device = device
        self._state = state
        self._start = start
        self._started = started

    @property
    def measuring(self) -> bool:
        """Whether the attempt's peak is being measured."""
        return self._start is not None

    def stop(self) -> int | None:
        """Bytes in use at the peak since :func:`start`, above those in use then; None
        where they were not measured, or another attempt ran meanwhile."""
        try:
            peak = None if self._start is None else self._backend.peak(self._device)
        except Exception:  # a failed reading only means nothing was measured
            peak = None
        alone = self._end()
        if peak is None or self._start is None or not alone:
            return None
        return max(0, peak - self._start)

    def cancel(self) -> None:
        """End the attempt without a result (it failed)."""
        self._end()

    def _end(self) -> bool:
        """Note the attempt's end; whether no other attempt started since it began."""
        with _lock:
            self._state.running -= 1
            return self._state.started == self._started


def start(device: torch.device | None) -> Meter | None:
    """Note a retry or chunk starting on ``device``, and measure its peak memory where
    it can be: where the device's kind is known (else ``None``), the process has
    used the device, and no other attempt is under way on it.

    A measurement resets the device's peak statistic (CUDA:
    ``torch.cuda.reset_peak_memory_stats``; the CPU: the peak resident set,
    ``VmHWM``).
    """
    known = _resolved(device)
    if known is None:
        return None
    backend, resolved = known
    with _lock:
        state = _devices.setdefault(str(resolved), _Attempts())
        state.running += 1
        state.started += 1
        started, alone = state.started, state.running == 1
    base = None
    if alone:
        try:
            base = backend.mark(resolved)
        except Exception:
            base = None
        state.markable = state.markable or base is not None
    return Meter(backend, resolved, state, base, started)


def measurable(device: torch.device | None) -> bool:
    """Whether the peak memory of ``device`` can be measured: once a measurement was
    started on it, or, before, when one can be started now."""
    known = _resolved(device)
    if known is None:
        return False
    with _lock:
        state = _devices.get(str(known[1]))
    if state is not None and state.markable:
        return True
    meter = start(device)
    if meter is None:
        return False
    meter.cancel()
    return meter.measuring


def _resolved(device: torch.device | None) -> tuple[Backend, torch.device] | None:
    """The backend of ``device`` and the device it names exactly; None for an unknown one."""
    found = None if device is None else BACKENDS.get(device.type)
    if found is None or device is None:
        return None
    return found, found.resolve(device)
