"""Caps, one interface per kind of device."""

from __future__ import annotations

import math

import pytest
import torch

from torchmemguard import BudgetExceededError, limits

from .conftest import FakeCuda

GIB = 2**30


def test_no_device_is_the_cpu_without_an_accelerator() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert limits.default_device() == torch.device("cpu")


def test_no_device_is_cuda_where_cuda_is_available(fake_cuda: FakeCuda) -> None:
    assert limits.default_device() == torch.device("cuda")


def test_a_cuda_limit_names_its_device_index(fake_cuda: FakeCuda) -> None:
    fake_cuda.current = 1
    assert limits.limit_for(torch.device("cuda")).device == torch.device("cuda:1")


def test_a_fraction_is_read_back_from_torch_in_bytes(fake_cuda: FakeCuda) -> None:
    fake_cuda.allowed[1] = 30 * GIB
    assert limits.limit_for(torch.device("cuda:1")).read() == 30 * GIB


def test_a_fraction_of_one_is_no_cap(fake_cuda: FakeCuda) -> None:
    assert limits.limit_for(torch.device("cuda:1")).read() == math.inf


def test_without_a_getter_the_cap_last_set_is_read(
    fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(torch.cuda, "get_per_process_memory_fraction")
    monkeypatch.setattr(limits, "_caps_set", {})
    limit = limits.limit_for(torch.device("cuda:0"))
    assert limit.read() == math.inf
    limit.write(4 * GIB)
    assert limit.read() == 4 * GIB
    assert limits.limit_for(torch.device("cuda:1")).read() == math.inf


def test_an_uninitialised_device_has_no_cap_and_stays_uninitialised(
    fake_cuda: FakeCuda,
) -> None:
    fake_cuda.initialized = False  # every call that would initialise CUDA now fails
    limit = limits.limit_for(torch.device("cuda"))
    assert limit.read() == math.inf
    assert limit.device == torch.device("cuda:0")


def test_a_cuda_cap_is_bytes_of_the_device_total(fake_cuda: FakeCuda) -> None:
    limit = limits.limit_for(torch.device("cuda:0"))
    assert limit.cap(0.1, None) == 8 * GIB
    assert limit.cap(None, 8 * GIB + 1) == 8 * GIB + 1


def test_a_cuda_cap_of_the_whole_device_is_none(fake_cuda: FakeCuda) -> None:
    limit = limits.limit_for(torch.device("cuda:0"))
    assert limit.cap(1.0, None) == math.inf
    assert limit.cap(None, 80 * GIB) == math.inf


def test_a_cap_is_written_as_the_fraction_that_truncates_to_it(fake_cuda: FakeCuda) -> None:
    limit = limits.limit_for(torch.device("cuda:0"))
    limit.write(7)
    assert fake_cuda.sets == [(7.5 / (80 * GIB), 0)]


def test_a_cpu_cap_is_bytes_of_the_memory_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits.host, "capacity", lambda: 10 * GIB)
    limit = limits.limit_for(torch.device("cpu"))
    assert limit.cap(0.25, None) == 2.5 * GIB
    assert limit.cap(None, 123) == 123


def test_a_cpu_cap_too_large_for_rlimit_is_the_largest_it_takes() -> None:
    assert limits.limit_for(torch.device("cpu")).cap(None, 2**70) == 2**63 - 1


def test_a_cpu_cap_below_the_address_space_is_refused_with_both_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(limits.host, "address_space", lambda: 3 * GIB)
    limit = limits.limit_for(torch.device("cpu"))
    limit.check(3 * GIB, strict=False, tightens=True)
    with pytest.raises(BudgetExceededError, match=r"2 GiB is below .* 3 GiB \(2147483648 < 3221"):
        limit.check(2 * GIB, strict=False, tightens=True)


def test_cpu_devices_are_capped_where_the_system_can(monkeypatch: pytest.MonkeyPatch) -> None:
    assert limits.check_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(limits.host, "can_cap_address_space", lambda: False)
    with pytest.raises(ValueError, match="device='cpu': a CPU budget needs RLIMIT_AS"):
        limits.check_device("cpu")


def test_a_cpu_cap_that_tightens_nothing_is_not_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits.host, "address_space", lambda: 3 * GIB)
    limits.limit_for(torch.device("cpu")).check(2 * GIB, strict=True, tightens=False)


def test_a_cpu_device_index_is_dropped() -> None:
    assert limits.check_device("cpu:3") == torch.device("cpu")


def test_an_mps_device_is_refused() -> None:
    with pytest.raises(ValueError, match="can cap cuda, xpu and cpu devices, not 'mps'"):
        limits.check_device("mps")
