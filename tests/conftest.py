"""Fixtures shared by the test modules."""

from __future__ import annotations

import resource
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch


def rows(n: int, width: int = 3) -> torch.Tensor:
    """``n`` samples whose first column is the sample's index."""
    x = torch.zeros(n, width)
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    return x


class Recorded:
    """An Events implementation that only records what it is told."""

    name = "fake"

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def oom(self, device: torch.device | None) -> None:
        self.seen.append(("oom", device))

    def retry(self, device: torch.device | None) -> None:
        self.seen.append(("retry", device))

    def split(self, device: torch.device | None) -> None:
        self.seen.append(("split", device))

    def merged(self, device: torch.device | None, largest: int) -> None:
        self.seen.append(("merged", device, largest))

    def peak(self, device: torch.device | None, peak: int) -> None:
        self.seen.append(("peak", device, peak))

    def unrecovered(self, device: torch.device | None) -> None:
        self.seen.append(("unrecovered", device))


class ChunkLimit:
    """A per-sample function that runs out of memory above ``limit`` samples.

    It records the size of every attempt, and the rows it computed in attempts
    that succeeded, so tests can check the exact sequence of chunk sizes and
    that no sample is computed twice or dropped.
    """

    def __init__(self, limit: int, message: str = "CUDA out of memory.") -> None:
        self.limit = limit
        self.message = message
        self.sizes: list[int] = []
        self.rows: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(
                f"{self.message} Tried to allocate {x.shape[0]} samples; limit {self.limit}"
            )
        self.rows.extend(int(v) for v in (x[:, 0] if x.dim() > 1 else x))
        return x * 2 + 1


def oom_above(limit: int, n: int) -> None:
    """Raise CUDA's out-of-memory error for a batch of more than ``limit`` samples."""
    if n > limit:
        raise torch.OutOfMemoryError("CUDA out of memory.")


class ScarceModule(torch.nn.Module):
    """``inner``, run out of memory above ``limit`` samples along ``dim``; the batch sizes
    it was called with are in ``sizes``."""

    def __init__(self, inner: torch.nn.Module, limit: int, dim: int = 0) -> None:
        super().__init__()
        self.inner = inner
        self.limit = limit
        self.dim = dim
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.sizes.append(x.shape[self.dim])
        oom_above(self.limit, x.shape[self.dim])
        return self.inner(x, *args, **kwargs)


@pytest.fixture
def recoveries(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, bool]]:
    """Record each recovery that the guard performs (device, full collection)."""
    from torchmemguard import _device as device

    calls: list[tuple[object, bool]] = []
    real = device.recover

    def record(dev: torch.device | None, seen: int, collect: bool = False) -> None:
        calls.append((dev, collect))
        real(dev, seen, collect)

    monkeypatch.setattr(device, "recover", record)
    return calls


@pytest.fixture
def unmeasured(monkeypatch: pytest.MonkeyPatch) -> None:
    """No chunk's peak memory is measured: for tests whose out-of-memory errors are raised
    by the test itself and take no memory, so that their chunks are sized as on a
    device whose memory cannot be measured."""
    from torchmemguard import _device as device

    monkeypatch.setattr(device.meter, "start", lambda _device: None)
    monkeypatch.setattr(device.meter, "measurable", lambda _device: False)


class FakeCuda:
    """Stands in for the final torch.cuda calls that budgets and metrics make.

    Two devices of ``total`` bytes. Like PyTorch's caching allocator, a
    per-process fraction is kept as ``int(fraction * total)`` bytes (``None``:
    no cap) and read back as those bytes over ``total``. Calls that would
    initialise CUDA fail while ``initialized`` is false. Every fraction set and
    every cache emptied is recorded, with its device.
    """

    def __init__(self, total: int = 80 * 2**30) -> None:
        self.total = total
        self.current = 0
        self.initialized = True
        self.allowed: dict[int, int | None] = {0: None, 1: None}
        self.allocated = {0: 0, 1: 0}
        self.reserved = {0: 0, 1: 0}
        self.sets: list[tuple[float, int]] = []
        self.emptied: list[int] = []
        self.contexts = {0, 1}  # devices with a primary context
        self.stats_calls: list[int] = []
        self.stats: dict[int, dict[str, int]] = {0: {}, 1: {}}
        self.peak = {0: 0, 1: 0}  # allocated at the peak since the last reset

    def _initialised(self) -> None:
        if not self.initialized:
            raise AssertionError("this call would initialise CUDA")

    def set_fraction(self, fraction: float, index: int) -> None:
        self._initialised()
        if not 0 <= fraction <= 1:
            raise ValueError(f"invalid fraction:{fraction}. Please set within [0, 1].")
        self.allowed[index] = None if fraction >= 1.0 else int(fraction * self.total)
        self.sets.append((fraction, index))

    def get_fraction(self, index: int) -> float:
        self._initialised()
        allowed = self.allowed[index]
        return 1.0 if allowed is None else allowed / self.total

    def properties(self, index: int) -> types.SimpleNamespace:
        self._initialised()
        return types.SimpleNamespace(total_memory=self.total, uuid=f"uuid-{index}")

    def mem_get_info(self, index: int) -> tuple[int, int]:
        self._initialised()
        return self.total - self.reserved[index], self.total

    def memory_stats(self, index: int) -> dict[str, int]:
        self._initialised()
        self.stats_calls.append(index)
        # torch.cuda.memory_allocated and memory_reserved are read from these.
        current = {
            "allocated_bytes.all.current": self.allocated[index],
            "reserved_bytes.all.current": self.reserved[index],
        }
        return {**current, **self.stats[index]}

    def current_device(self) -> int:
        self._initialised()
        return self.current

    def reset_peak(self, index: int) -> None:
        self._initialised()
        self.peak[index] = self.allocated[index]

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake = self

        class device:  # stands in for torch.cuda.device
            def __init__(self, index: int) -> None:
                self.index = index

            def __enter__(self) -> None:
                self.previous, fake.current = fake.current, self.index

            def __exit__(self, *exc: object) -> None:
                fake.current = self.previous

        for name, value in {
            "is_available": lambda: True,
            "is_initialized": lambda: fake.initialized,
            "device_count": lambda: len(fake.allowed),
            "current_device": self.current_device,
            "device": device,
            "get_device_properties": self.properties,
            "mem_get_info": self.mem_get_info,
            "memory_allocated": lambda index: fake.allocated[index],
            "memory_reserved": lambda index: fake.reserved[index],
            "empty_cache": lambda: fake.emptied.append(fake.current),
            "set_per_process_memory_fraction": self.set_fraction,
            "get_per_process_memory_fraction": self.get_fraction,
            "memory_stats": self.memory_stats,
            "reset_peak_memory_stats": self.reset_peak,
            "max_memory_allocated": lambda index: fake.peak[index],
        }.items():
            monkeypatch.setattr(torch.cuda, name, value)
        monkeypatch.setattr(
            torch._C, "_cuda_hasPrimaryContext", fake.contexts.__contains__, raising=False
        )


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    """Two stand-in CUDA devices; ``device=None`` then means ``cuda``."""
    fake = FakeCuda()
    fake.install(monkeypatch)
    return fake


@pytest.fixture(autouse=True)
def _address_space_limit_untouched() -> Iterator[None]:
    """No test may cap the pytest process itself: budgets on the CPU run in children."""
    before = resource.getrlimit(resource.RLIMIT_AS)
    yield
    after = resource.getrlimit(resource.RLIMIT_AS)
    if after != before:
        resource.setrlimit(resource.RLIMIT_AS, before)
        pytest.fail(f"the test changed the pytest process's RLIMIT_AS from {before} to {after}")


class FakeNvml(types.ModuleType):
    """Stands in for nvidia-ml-py's ``pynvml``: devices by UUID, 37% busy at 61 °C."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, fail_init: bool = False) -> None:
        super().__init__("pynvml")
        self.fail_init = fail_init
        self.uuids: list[str] = []

    def nvmlInit(self) -> None:  # the library's own names
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        self.uuids.append(uuid)
        return uuid

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(gpu=37, memory=10)

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        return 61


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch, fake_cuda: FakeCuda) -> FakeNvml:
    """A stand-in NVML, over the stand-in CUDA devices."""
    from torchmemguard import _device as device
    from torchmemguard._device.nvidia import Nvml

    module = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", module)
    monkeypatch.setattr(device, "nvml", Nvml())
    return module
