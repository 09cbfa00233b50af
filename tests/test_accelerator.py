"""CUDA through stand-ins: caps as per-process fractions, and one reading per device."""

from __future__ import annotations

import math

import pytest
import torch

from torchmemguard import _device as device
from torchmemguard._device import Backend, Reading, accelerator

from .conftest import FakeCuda

GIB = 2**30


def cuda() -> Backend:
    found = device.backend("cuda")
    assert found is not None
    return found


# ---------------------------------------------------------------------------
# The cap


def test_a_fraction_is_read_back_from_torch_in_bytes(fake_cuda: FakeCuda) -> None:
    fake_cuda.allowed[1] = 30 * GIB
    assert device.limit_for(torch.device("cuda:1")).read() == 30 * GIB


def test_a_fraction_of_one_is_no_cap(fake_cuda: FakeCuda) -> None:
    assert device.limit_for(torch.device("cuda:1")).read() == math.inf


def test_without_a_getter_the_cap_last_set_is_read(
    fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(torch.cuda, "get_per_process_memory_fraction")
    monkeypatch.setattr(accelerator, "_caps_set", {})
    limit = device.limit_for(torch.device("cuda:0"))
    assert limit.read() == math.inf
    limit.write(4 * GIB)
    assert limit.read() == 4 * GIB
    assert device.limit_for(torch.device("cuda:1")).read() == math.inf


def test_a_cuda_cap_is_bytes_of_the_device_total(fake_cuda: FakeCuda) -> None:
    limit = device.limit_for(torch.device("cuda:0"))
    assert limit.cap(0.1, None) == 8 * GIB
    assert limit.cap(None, 8 * GIB + 1) == 8 * GIB + 1


def test_a_cuda_cap_of_the_whole_device_is_none(fake_cuda: FakeCuda) -> None:
    limit = device.limit_for(torch.device("cuda:0"))
    assert limit.cap(1.0, None) == math.inf
    assert limit.cap(None, 80 * GIB) == math.inf


def test_a_cap_is_written_as_the_fraction_that_truncates_to_it(fake_cuda: FakeCuda) -> None:
    limit = device.limit_for(torch.device("cuda:0"))
    limit.write(7)
    assert fake_cuda.sets == [(7.5 / (80 * GIB), 0)]


# ---------------------------------------------------------------------------
# Which devices are read


def test_no_cuda_device_is_read_before_cuda_is_initialised(fake_cuda: FakeCuda) -> None:
    fake_cuda.initialized = False
    assert cuda().in_use() == []
    assert cuda().read(torch.device("cuda:0")) is None


def test_only_cuda_devices_with_a_context_are_read(fake_cuda: FakeCuda) -> None:
    fake_cuda.contexts.discard(0)
    assert cuda().in_use() == [torch.device("cuda:1")]
    assert cuda().read(torch.device("cuda:0")) is None


def test_without_the_context_query_only_the_current_device_is_read(
    fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(torch._C, "_cuda_hasPrimaryContext")
    fake_cuda.current = 1
    assert cuda().in_use() == [torch.device("cuda:1")]


# ---------------------------------------------------------------------------
# The reading, and what is computed from it


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
    reading = cuda().read(torch.device("cuda:1"))
    assert fake_cuda.stats_calls == [1]
    assert reading == Reading(
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
    reading = cuda().read(torch.device("cuda:0"))
    assert reading is not None
    assert reading.budget == 40 * GIB


def test_the_room_is_free_memory_and_cache_within_the_cap() -> None:
    reading = Reading("cuda:0", allocated=20 * GIB, reserved=30 * GIB, free=50 * GIB)
    assert cuda().room(reading) == 60 * GIB
    assert cuda().room(Reading("cuda:0", allocated=20 * GIB, reserved=30 * GIB)) is None


def test_the_room_is_zero_once_the_cap_is_spent() -> None:
    reading = Reading("cuda:0", allocated=20 * GIB, reserved=30 * GIB, free=50, budget=10 * GIB)
    assert cuda().room(reading) == 0


def test_the_report_names_the_cap_and_its_share_of_the_device() -> None:
    reading = Reading(
        "cuda:0", allocated=GIB, reserved=2 * GIB, total=80 * GIB, free=70 * GIB, budget=20 * GIB
    )
    assert cuda().describe(reading) == (
        "allocated 1 GiB, reserved 2 GiB, total 80 GiB, free 70 GiB, cap 20 GiB (25%)"
    )


def test_the_cache_of_the_device_named_is_emptied(fake_cuda: FakeCuda) -> None:
    cuda().empty_cache(1)
    cuda().empty_cache(None)
    assert fake_cuda.emptied == [1, 0]


def test_an_uninitialised_cache_is_left_alone(fake_cuda: FakeCuda) -> None:
    fake_cuda.initialized = False
    cuda().empty_cache(0)
    assert fake_cuda.emptied == []
