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


def test_a_fraction_is_read_back_from_torch(fake_cuda: FakeCuda) -> None:
    fake_cuda.fractions[1] = 0.375
    assert limits.limit_for(torch.device("cuda:1")).read() == 0.375


def test_without_a_getter_the_fraction_last_set_is_read(
    fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(torch.cuda, "get_per_process_memory_fraction")
    monkeypatch.setattr(limits, "_fractions_set", {})
    limit = limits.limit_for(torch.device("cuda:0"))
    assert limit.read() == 1.0
    limit.write(0.4)
    assert limit.read() == 0.4
    assert limits.limit_for(torch.device("cuda:1")).read() == 1.0


def test_an_uninitialised_device_has_no_cap(fake_cuda: FakeCuda) -> None:
    fake_cuda.initialized = False
    fake_cuda.fractions[0] = 0.5  # cannot have been set without initialising
    limit = limits.limit_for(torch.device("cuda"))
    assert limit.read() == 1.0
    assert limit.device == torch.device("cuda:0")


def test_a_cuda_setting_is_a_fraction_of_the_device(fake_cuda: FakeCuda) -> None:
    limit = limits.limit_for(torch.device("cuda:0"))
    assert limit.setting(0.3, None) == 0.3
    assert limit.setting(None, 8 * GIB) == 0.1
    assert limit.in_bytes(0.1) == 8 * GIB
    assert limit.is_cap(0.999)
    assert not limit.is_cap(1.0)


def test_a_cpu_setting_is_bytes_of_the_memory_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits.host, "capacity", lambda: 10 * GIB)
    limit = limits.limit_for(torch.device("cpu"))
    assert limit.setting(0.25, None) == 2.5 * GIB
    assert limit.setting(None, 123) == 123
    assert limit.as_fraction(5 * GIB) == 0.5
    assert limit.is_cap(5 * GIB)
    assert not limit.is_cap(math.inf)


def test_a_cpu_cap_below_the_address_space_is_refused_with_both_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(limits.host, "address_space", lambda: 3 * GIB)
    limit = limits.limit_for(torch.device("cpu"))
    limit.check(3 * GIB, strict=False)
    with pytest.raises(BudgetExceededError, match=r"2 GiB is below .* 3 GiB \(2147483648 < 3221"):
        limit.check(2 * GIB, strict=False)


def test_cpu_devices_are_capped_where_the_system_can(monkeypatch: pytest.MonkeyPatch) -> None:
    assert limits.check_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(limits.host, "can_cap_address_space", lambda: False)
    with pytest.raises(ValueError, match="device='cpu': a CPU budget needs RLIMIT_AS"):
        limits.check_device("cpu")


def test_an_mps_device_is_refused() -> None:
    with pytest.raises(ValueError, match="can cap cuda, xpu and cpu devices, not 'mps'"):
        limits.check_device("mps")
