"""The collectors: fresh families on every scrape, and a scrape that never raises."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from torchmemguard import _device as device
from torchmemguard._observability import collectors

from .conftest import FakeCuda, FakeNvml

GIB = 2**30


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collectors.MemoryCollector())
    return registry


def value(registry: CollectorRegistry, name: str, device: str) -> float | None:
    return registry.get_sample_value(f"torchmemguard_{name}", {"device": device})


def test_each_cuda_device_in_use_is_read_once_per_scrape(
    fake_cuda: FakeCuda, registry: CollectorRegistry
) -> None:
    generate_latest(registry)
    generate_latest(registry)
    assert fake_cuda.stats_calls == [0, 1, 0, 1]


def test_cuda_gauges_are_the_allocator_statistics(
    fake_cuda: FakeCuda, registry: CollectorRegistry
) -> None:
    fake_cuda.stats[0] = {
        "allocated_bytes.all.current": 3 * GIB,
        "inactive_split_bytes.all.current": GIB,
        "num_alloc_retries": 4,
        "num_ooms": 1,
    }
    fake_cuda.reserved[0] = 76 * GIB
    assert value(registry, "memory_allocated_bytes", "cuda:0") == 3 * GIB
    assert value(registry, "memory_inactive_split_bytes", "cuda:0") == GIB
    assert value(registry, "memory_free_bytes", "cuda:0") == 4 * GIB
    assert value(registry, "memory_used_ratio", "cuda:0") == 0.95
    assert value(registry, "allocator_retries_total", "cuda:0") == 4
    assert value(registry, "allocator_ooms_total", "cuda:0") == 1


def test_the_budget_gauge_is_there_only_under_a_cap(
    fake_cuda: FakeCuda, registry: CollectorRegistry
) -> None:
    fake_cuda.allowed[1] = 20 * GIB
    assert value(registry, "memory_budget_bytes", "cuda:1") == 20 * GIB
    assert value(registry, "memory_budget_bytes", "cuda:0") is None


def test_the_budget_used_ratio_is_reserved_over_the_cap(
    fake_cuda: FakeCuda, registry: CollectorRegistry
) -> None:
    fake_cuda.allowed[1] = 20 * GIB
    fake_cuda.reserved[1] = 19 * GIB
    assert value(registry, "memory_budget_used_ratio", "cuda:1") == 0.95
    assert value(registry, "memory_budget_used_ratio", "cuda:0") is None  # no cap


def test_the_cpu_budget_used_ratio_is_the_address_space_over_rlimit_as(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchmemguard._device import host

    space = host.address_space()
    assert space is not None
    monkeypatch.setattr(host, "address_space_limit", lambda: 4 * space)
    ratio = value(registry, "memory_budget_used_ratio", "cpu")
    assert ratio is not None
    assert 0.2 < ratio < 0.3  # the address space moves a little between the two readings


def test_the_process_is_reported_as_the_cpu_device(registry: CollectorRegistry) -> None:
    total = value(registry, "memory_total_bytes", "cpu")
    ratio = value(registry, "memory_used_ratio", "cpu")
    assert total is not None
    assert total > 0
    assert ratio is not None
    assert 0 <= ratio <= 1
    assert value(registry, "memory_active_bytes", "cpu") is None


def test_a_device_that_fails_is_skipped_logged_once_and_the_rest_still_come_out(
    fake_cuda: FakeCuda,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = fake_cuda.memory_stats

    def broken(index: int) -> dict[str, int]:
        if index == 0:
            raise RuntimeError("CUDA error: unspecified launch failure")
        return real(index)

    monkeypatch.setattr("torch.cuda.memory_stats", broken)
    generate_latest(registry)
    assert value(registry, "memory_total_bytes", "cuda:0") is None
    assert value(registry, "memory_total_bytes", "cuda:1") == 80 * GIB
    assert value(registry, "memory_total_bytes", "cpu") is not None
    failures = [r for r in caplog.records if "could not read cuda:0" in r.getMessage()]
    assert len(failures) == 1
    assert "unspecified launch failure" in caplog.text


def test_a_failure_to_list_the_cuda_devices_leaves_the_cpu(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> list[int]:
        raise RuntimeError("CUDA driver version is insufficient")

    monkeypatch.setattr(device.backend("cuda"), "in_use", broken)
    assert value(registry, "memory_total_bytes", "cpu") is not None


def test_describing_the_collector_reads_no_device(fake_cuda: FakeCuda) -> None:
    names = {family.name for family in collectors.MemoryCollector().describe()}
    assert "torchmemguard_memory_used_ratio" in names
    assert "torchmemguard_allocator_ooms" in names
    assert fake_cuda.stats_calls == []


def test_gpu_utilisation_and_temperature_come_from_nvml(fake_nvml: FakeNvml) -> None:
    registry = CollectorRegistry()
    registry.register(collectors.GpuCollector())
    assert value(registry, "gpu_utilization_ratio", "cuda:1") == 0.37
    assert value(registry, "gpu_temperature_celsius", "cuda:0") == 61
