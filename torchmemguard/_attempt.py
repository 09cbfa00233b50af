"""The context one attempt of a guarded call runs in."""

from __future__ import annotations

import contextlib
from types import TracebackType

import torch

from torchmemguard import _device as devices
from torchmemguard._device.meter import Meter
from torchmemguard._gradients import BackwardWatch


class Attempt:
    """One attempt: without oneDNN once oneDNN failed in the call (``onednn_off``). A
    retry or a chunk (``measured``) also runs under a watch for ``backward()`` where
    gradients are enabled and ``watch`` allows it, with the peak memory it takes
    on ``device`` measured where it can be (:attr:`peak`, once it returned).

    Async calls pass ``watch=False``: a torch function mode belongs to a thread,
    which an awaiting coroutine shares with other tasks.
    """

    def __init__(
        self, onednn_off: bool, measured: bool, device: torch.device | None, watch: bool
    ) -> None:
        self._onednn_off = onednn_off
        self._measured = measured
        self._device = device
        self.watch = BackwardWatch() if measured and watch and torch.is_grad_enabled() else None
        self.peak: int | None = None  # bytes the attempt took at its peak, if measured
        self._meter: Meter | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Attempt:
        with self._stack as stack:
            if self._onednn_off:
                stack.enter_context(devices.without_onednn())
            if self.watch is not None:
                stack.enter_context(self.watch)
            if self._measured and self._device is not None:
                self._meter = devices.meter.start(self._device)
            self._stack = stack.pop_all()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        meter = self._meter
        try:
            return self._stack.__exit__(kind, exc, traceback)
        finally:
            if meter is not None:
                if kind is None:
                    self.peak = meter.stop()
                else:
                    meter.cancel()
