"""Prometheus metrics: the devices' memory at scrape time, and what the guards did.

Nothing is registered at import: :func:`install_metrics` does it. Guards report
their events through :func:`count` and the ``set_`` functions, and the ASGI
middleware its refusals through :func:`count_refused`; each costs one check
until metrics are installed, and runs only when a guard catches an
out-of-memory error, splits a call or samples one, or a module is guarded,
never on the happy path.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

# Label values are bounded whatever the service does: functions and devices
# past these counts are reported as "other".
MAX_FUNCTIONS = 100
MAX_DEVICES = 32
OTHER = "other"

# The guard counters, by their attribute names on GuardStats and _GuardMetrics.
GuardCounter = Literal["ooms", "retries", "split_calls", "unrecovered"]
# Why torchmemguard.asgi.ShedOnOutOfMemory refused a request.
RefusalReason = Literal["body_too_large", "out_of_memory", "no_room"]
REFUSAL_REASONS: tuple[RefusalReason, ...] = ("body_too_large", "out_of_memory", "no_room")

_lock = threading.Lock()
# Weakly: a registry that its owner dropped (a test's, say) stops being counted.
_installed: dict[int, tuple[weakref.ref[CollectorRegistry], _GuardMetrics]] = {}
_functions: set[str] = set()
_devices: set[str] = set()


class _GuardMetrics:
    """The guard counters of one registry, and the refused requests, as ordinary labelled metrics.

    Unlike the collectors' gauges, they also work in prometheus_client's
    multiprocess mode.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Gauge

        labels = ("function", "device")
        self.ooms = Counter(
            "torchmemguard_oom", "Out-of-memory errors caught by guards.", labels, registry=registry
        )
        self.retries = Counter(
            "torchmemguard_retries",
            "Attempts made by guards after an out-of-memory error.",
            labels,
            registry=registry,
        )
        self.split_calls = Counter(
            "torchmemguard_split_calls",
            "Guarded calls that ran in chunks.",
            labels,
            registry=registry,
        )
        self.unrecovered = Counter(
            "torchmemguard_unrecovered",
            "Guarded calls that still ran out of memory (torchmemguard.OutOfMemoryError).",
            labels,
            registry=registry,
        )
        self.chunk_size = Gauge(
            "torchmemguard_chunk_size",
            "The largest chunk that fitted in the guard's latest split call, in samples.",
            labels,
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.retained = Gauge(
            "torchmemguard_retained_bytes",
            "Memory the guard's calls kept after they returned, estimated from sampled calls.",
            labels,
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.peak = Gauge(
            "torchmemguard_peak_bytes",
            "The most memory a chunk of the guard's latest measured call took at its peak, "
            "above what was in use when it began.",
            labels,
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.model = Gauge(
            "torchmemguard_model_bytes",
            "The parameters and buffers of a guarded module, on each device.",
            labels,
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.refused = Counter(
            "torchmemguard_requests_refused",
            "HTTP requests refused by torchmemguard.asgi.ShedOnOutOfMemory, by reason.",
            ("reason",),
            registry=registry,
        )
        for reason in REFUSAL_REASONS:  # every reason present from the start, at 0
            self.refused.labels(reason)


def install_metrics(registry: CollectorRegistry | None = None) -> None:
    """Register torchmemguard's metrics in ``registry`` (default: prometheus_client's).

    Installing again in the same registry does nothing. The memory gauges are
    read from the devices at scrape time, for every CUDA device the process has
    a context on and for the process itself (``device="cpu"``); CUDA is never
    initialised by a scrape. GPU utilisation and temperature are added where
    ``nvidia-ml-py`` is installed. The guard counters count from installation on.
    """
    from prometheus_client import REGISTRY
    from prometheus_client import CollectorRegistry as Registry

    from torchmemguard._device import nvml
    from torchmemguard._observability.collectors import GpuCollector, MemoryCollector

    if registry is None:
        registry = REGISTRY
    if not isinstance(registry, Registry):
        raise TypeError(f"registry must be a prometheus_client CollectorRegistry, got {registry!r}")
    with _lock:
        found = _installed.get(id(registry))
        if found is not None and found[0]() is registry:
            return
        guard_metrics = _GuardMetrics(registry)
        registry.register(MemoryCollector())
        if nvml.module() is not None:
            registry.register(GpuCollector())
        _installed[id(registry)] = (weakref.ref(registry), guard_metrics)


def start_metrics_server(port: int, addr: str = "127.0.0.1") -> tuple[Any, threading.Thread]:
    """Install the metrics and serve prometheus_client's registry on ``addr:port``.

    For services without an HTTP server of their own. ``port=0`` picks a free
    port. It returns the server and its thread, as
    ``prometheus_client.start_http_server`` does: ``server.server_port`` is the
    port, and ``server.shutdown()`` stops it.
    """
    from prometheus_client import REGISTRY, start_http_server

    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port must be an int, got {port!r}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port={port} must be in 0..65535")
    if not isinstance(addr, str) or not addr:
        raise TypeError(f"addr must be a host address string, got {addr!r}")
    install_metrics(REGISTRY)
    server, thread = start_http_server(port, addr=addr, registry=REGISTRY)
    return server, thread


def _label(value: str, seen: set[str], limit: int) -> str:
    if value in seen:
        return value
    if len(seen) >= limit:
        return OTHER
    seen.add(value)
    return value


def _labels(function: str, device: torch.device | None) -> tuple[str, str]:
    with _lock:
        return (
            _label(function, _functions, MAX_FUNCTIONS),
            _label("unknown" if device is None else str(device), _devices, MAX_DEVICES),
        )


def _sinks() -> list[_GuardMetrics]:
    with _lock:
        for key in [key for key, (ref, _) in _installed.items() if ref() is None]:
            del _installed[key]
        return [guard_metrics for _, guard_metrics in _installed.values()]


def count(function: str, device: torch.device | None, counter: GuardCounter) -> None:
    """Add one to a guard's ``counter``."""
    if not _installed:
        return
    labels = _labels(function, device)
    for guard_metrics in _sinks():
        getattr(guard_metrics, counter).labels(*labels).inc()
        if counter == "ooms":
            # Present from the first OOM on, so that an alert sees its first rise.
            guard_metrics.unrecovered.labels(*labels)


def count_refused(reason: RefusalReason) -> None:
    """Add one to the requests refused for ``reason``."""
    if not _installed:
        return
    for guard_metrics in _sinks():
        guard_metrics.refused.labels(reason).inc()


def set_chunk_size(function: str, device: torch.device | None, size: int) -> None:
    """Set the chunk size that fitted in a guard's latest split call."""
    _set("chunk_size", function, device, size)


def set_retained(function: str, device: torch.device, retained: int) -> None:
    """Set the memory a guard's calls kept after they returned, estimated."""
    _set("retained", function, device, retained)


def set_peak(function: str, device: torch.device | None, peak: int) -> None:
    """Set the bytes a guard's latest measured call took at its peak."""
    _set("peak", function, device, peak)


def set_model_bytes(function: str, device: torch.device, held: int) -> None:
    """Set the bytes of a guarded module's parameters and buffers on ``device``."""
    _set("model", function, device, held)


# The guard gauges, by their attribute names on _GuardMetrics.
_GuardGauge = Literal["chunk_size", "retained", "peak", "model"]


def _set(gauge: _GuardGauge, function: str, device: torch.device | None, value: int) -> None:
    if not _installed:
        return
    labels = _labels(function, device)
    for guard_metrics in _sinks():
        getattr(guard_metrics, gauge).labels(*labels).set(value)
