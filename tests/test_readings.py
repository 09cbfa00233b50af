"""Readings of device memory for the metrics: CUDA through stand-ins, the CPU for real."""

from __future__ import annotations

import sys

import pytest
import torch

from torchmemguard import host, readings

from .conftest import FakeCuda, FakeNvml

GIB = 2**30


def test_no_cuda_device_is_read_before_cuda_is_initialised(fake_cuda: FakeCuda) -> None:
    fake_cuda.initialized = False
    assert readings.cuda_devices() == []


def test_only_cuda_devices_with_a_context_are_read(fake_cuda: FakeCuda) -> None:
    fake_cuda.contexts.discard(0)
    assert readings.cuda_devices() == [1]


def test_without_the_context_query_only_the_current_device_is_read(
    fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(torch._C, "_cuda_hasPrimaryContext")
    fake_cuda.current = 1
    assert readings.cuda_devices() == [1]


def test_a_cuda_reading_takes_one_stats_call_and_the_device_info(fake_cuda: FakeCuda) -> None:
    fake_cuda.stats[1] = {
        "allocated_bytes.all.current": 3 * GIB,
        "reserved_bytes.all.current": 5 * GIB,
        "active_bytes.all.current": 4 * GIB,
        "inactive_split_bytes.all.current": GIB,
        "allocated_bytes.all.peak": 6 * GIB,
        "num_alloc_retries": 7,
        "num_ooms": 2,
    }
    fake_cuda.reserved[1] = 20 * GIB  # the whole device: free is 60 of 80 GiB
    reading = readings.read_cuda(1)
    assert fake_cuda.stats_calls == [1]
    assert reading == readings.Reading(
        device="cuda:1",
        allocated=3 * GIB,
        reserved=5 * GIB,
        active=4 * GIB,
        inactive_split=GIB,
        peak_allocated=6 * GIB,
        total=80 * GIB,
        free=60 * GIB,
        budget=None,
        alloc_retries=7,
        ooms=2,
    )
    assert reading.used_ratio == 0.25


def test_a_cuda_reading_gives_the_cap_in_force(fake_cuda: FakeCuda) -> None:
    fake_cuda.allowed[0] = 40 * GIB
    assert readings.read_cuda(0).budget == 40 * GIB


def test_no_used_ratio_without_a_total() -> None:
    assert readings.Reading(device="x", free=3).used_ratio is None


def test_the_cpu_reading_is_the_process_seen_from_the_system() -> None:
    reading = readings.read_cpu()
    assert reading.device == "cpu"
    assert reading.total == host.capacity()
    assert reading.reserved is not None
    assert reading.allocated is not None
    assert reading.reserved > reading.allocated > 0
    assert reading.peak_allocated is not None
    assert reading.peak_allocated >= reading.allocated
    assert reading.free is not None
    assert 0 < reading.free <= reading.total
    assert reading.active is None
    assert reading.alloc_retries is None


def test_the_cpu_reading_gives_no_budget_without_an_address_space_cap() -> None:
    if host.address_space_limit() != float("inf"):
        pytest.skip("this process runs under an address-space cap")
    assert readings.read_cpu().budget is None


def test_gpu_signals_come_from_nvml_matched_by_uuid(fake_nvml: FakeNvml) -> None:
    assert readings.nvml.signals(1) == (0.37, 61.0)
    assert readings.nvml.signals(1) == (0.37, 61.0)
    assert fake_nvml.uuids == ["GPU-uuid-1"]


def test_no_gpu_signals_without_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    monkeypatch.setattr(readings, "nvml", readings._Nvml())
    assert readings.nvml.signals(0) is None


def test_nvml_that_does_not_start_is_logged_and_left_out(
    fake_nvml: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    fake_nvml.fail_init = True
    assert readings.nvml.signals(0) is None
    assert "NVML is installed but did not start: NVML Shared Library Not Found" in caplog.text
