"""What each device holds now, read for the metrics: part of the device layer.

Nothing here initialises CUDA or creates a context: a device is read only once
the process has a context on it.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from torchmemguard import host, limits

logger = logging.getLogger("torchmemguard")


@dataclass(frozen=True)
class Reading:
    """One device's memory, in bytes; ``None`` where the device has no such number."""

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

    @property
    def used_ratio(self) -> float | None:
        """Used over total for the whole device, all processes included."""
        if self.total is None or self.free is None or self.total <= 0:
            return None
        return (self.total - self.free) / self.total


def cuda_devices() -> list[int]:
    """The CUDA devices this process has a context on; none before CUDA is initialised."""
    if not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return []
    has_context = getattr(torch._C, "_cuda_hasPrimaryContext", None)
    if has_context is None:
        return [torch.cuda.current_device()]
    return [i for i in range(torch.cuda.device_count()) if has_context(i)]


def read_cuda(index: int) -> Reading:
    """The caching allocator's statistics (one ``memory_stats`` call) and the device's."""
    stats = torch.cuda.memory_stats(index)
    free, total = torch.cuda.mem_get_info(index)
    cap = limits.limit_for(torch.device("cuda", index)).read()
    return Reading(
        device=f"cuda:{index}",
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


def read_cpu() -> Reading:
    """The process seen from the operating system.

    allocated is the resident set size, peak_allocated its peak, reserved the
    address space (what a CPU budget caps), total the memory available to the
    process (RAM or the cgroup limit), free what it could still take, and
    budget the soft ``RLIMIT_AS``.
    """
    limit = host.address_space_limit() if host.can_cap_address_space() else math.inf
    total, free = host.capacity_and_headroom()
    status = host.status()
    return Reading(
        device="cpu",
        allocated=status.get("VmRSS"),
        reserved=status.get("VmSize"),
        peak_allocated=status.get("VmHWM"),
        total=total,
        free=None if free is None else min(free, total),
        budget=None if limit == math.inf else int(limit),
    )


class _Nvml:
    """NVIDIA's management library, where ``nvidia-ml-py`` is installed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._module: ModuleType | None = None
        self._tried = False
        self._handles: dict[int, Any] = {}

    def module(self) -> ModuleType | None:
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    import pynvml  # type: ignore[import-not-found, unused-ignore]

                    pynvml.nvmlInit()
                    self._module = pynvml
                except ImportError:
                    pass
                except Exception as exc:
                    logger.warning("NVML is installed but did not start: %s", exc)
            return self._module

    def signals(self, index: int) -> tuple[float, float] | None:
        """GPU utilisation (0 to 1) and temperature (°C) of CUDA device ``index``."""
        nvml = self.module()
        if nvml is None:
            return None
        handle = self._handles.get(index)
        if handle is None:
            # NVML numbers devices its own way: match them by UUID, which
            # also holds under CUDA_VISIBLE_DEVICES.
            uuid = torch.cuda.get_device_properties(index).uuid
            handle = self._handles[index] = nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        utilization = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
        temperature = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
        return float(utilization), float(temperature)


nvml = _Nvml()
