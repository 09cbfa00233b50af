"""Prometheus collectors that read the devices at scrape time.

Each scrape builds fresh metric families from the device backends' readings
(:mod:`torchmemguard._device`): nothing runs between scrapes. A device that
fails to report is skipped and logged (once per device), and the others still
come out.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from torchmemguard import _device as devices
from torchmemguard._device import Reading

logger = logging.getLogger("torchmemguard")

_GAUGES = (
    (
        "memory_allocated_bytes",
        "allocated",
        "Memory the allocator has handed out and not freed (CPU: malloc's).",
    ),
    (
        "memory_reserved_bytes",
        "reserved",
        "Memory the allocator holds: allocated and its cache (CPU: malloc's).",
    ),
    (
        "memory_cached_bytes",
        "cached",
        "Memory the allocator holds free for its next allocations: reserved minus "
        "allocated (CPU: free in malloc's heaps).",
    ),
    ("memory_active_bytes", "active", "Memory in active allocator blocks."),
    (
        "memory_inactive_split_bytes",
        "inactive_split",
        "Memory cached in split blocks: fragmentation (CPU: free in malloc's heaps between "
        "blocks in use).",
    ),
    ("memory_peak_allocated_bytes", "peak_allocated", "Peak of allocated memory."),
    ("memory_total_bytes", "total", "Memory of the device (CPU: available to the process)."),
    ("memory_free_bytes", "free", "Memory free on the whole device, all processes included."),
    ("memory_used_ratio", "used_ratio", "Used over total for the whole device, 0 to 1."),
    ("memory_budget_bytes", "budget", "The memory cap in force (memory_budget, RLIMIT_AS)."),
    (
        "memory_budget_used_ratio",
        "budget_used_ratio",
        "Share of the memory cap in use: reserved over the cap (CPU: address space over "
        "RLIMIT_AS), 0 to 1; only under a cap.",
    ),
    (
        "memory_address_space_bytes",
        "address_space",
        "The process's address space (VmSize): what a CPU budget caps; CPU only.",
    ),
    ("memory_resident_bytes", "resident", "The process's resident set (VmRSS); CPU only."),
    (
        "memory_peak_resident_bytes",
        "peak_resident",
        "Peak of the resident set (VmHWM), since the last reset; CPU only.",
    ),
)
_COUNTERS = (
    ("allocator_retries", "alloc_retries", "Allocations retried after the cache was freed."),
    ("allocator_ooms", "ooms", "Out-of-memory errors raised by the allocator."),
)


class _Failures:
    """Logs the first failure of each device, so that a broken one cannot flood the log."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def log(self, device: str) -> None:
        """Log the exception being handled, if it is the device's first."""
        if device not in self._seen:
            self._seen.add(device)
            logger.warning("could not read %s for metrics", device, exc_info=True)

    def read(self, device: str, read: Callable[[], Reading | None]) -> Reading | None:
        """``read()``, or ``None`` (logged) where it fails."""
        try:
            return read()
        except Exception:
            self.log(device)
            return None


class MemoryCollector(Collector):
    """Memory of every device in use: the CUDA devices with a context, and the process."""

    def __init__(self) -> None:
        self._failures = _Failures()

    def readings(self) -> list[Reading]:
        """One reading per device that answered, backend by backend."""
        found = []
        for backend in devices.backends():
            try:
                in_use = backend.in_use()
            except Exception:
                self._failures.log(f"the {backend.kind.upper()} devices")
                continue
            for device in in_use:
                reading = self._failures.read(str(device), functools.partial(backend.read, device))
                if reading is not None:
                    found.append(reading)
        return found

    def describe(self) -> Iterator[Metric]:
        """The metric names, without reading any device (for the registry's checks)."""
        return self._families([])

    def collect(self) -> Iterator[Metric]:
        return self._families(self.readings())

    def _families(self, found: list[Reading]) -> Iterator[Metric]:
        kinds: list[tuple[type[GaugeMetricFamily | CounterMetricFamily], tuple[str, str, str]]]
        kinds = [(GaugeMetricFamily, metric) for metric in _GAUGES]
        kinds += [(CounterMetricFamily, metric) for metric in _COUNTERS]
        for kind, (name, field, doc) in kinds:
            family = kind(f"torchmemguard_{name}", doc, labels=["device"])
            for reading in found:
                value = getattr(reading, field)
                if value is not None:
                    family.add_metric([reading.device], value)
            yield family


class GpuCollector(Collector):
    """GPU utilisation and temperature from NVML, for the CUDA devices in use."""

    def __init__(self) -> None:
        self._failures = _Failures()

    def describe(self) -> Iterator[Metric]:
        """The metric names, without reading any device (for the registry's checks)."""
        return self._families({})

    def collect(self) -> Iterator[Metric]:
        signals: dict[str, tuple[float, float]] = {}
        cuda = devices.backend("cuda")
        try:
            in_use = [] if cuda is None else cuda.in_use()
        except Exception:
            in_use = []
        for device in in_use:
            try:
                found = devices.nvml.signals(device.index or 0)
            except Exception:
                self._failures.log(f"NVML for {device}")
                continue
            if found is not None:
                signals[str(device)] = found
        return self._families(signals)

    def _families(self, signals: dict[str, tuple[float, float]]) -> Iterator[Metric]:
        utilization = GaugeMetricFamily(
            "torchmemguard_gpu_utilization_ratio",
            "Share of the last sample period in which the GPU ran a kernel, 0 to 1.",
            labels=["device"],
        )
        temperature = GaugeMetricFamily(
            "torchmemguard_gpu_temperature_celsius", "GPU core temperature.", labels=["device"]
        )
        for device, (busy, degrees) in signals.items():
            utilization.add_metric([device], busy)
            temperature.add_metric([device], degrees)
        yield utilization
        yield temperature
