"""The device layer's facade: room, reports, recovery and caps, each from its backend."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from torchmemguard import _device as device
from torchmemguard._device import Reading, host, kinds
from torchmemguard._observability import collectors

from .conftest import FakeCuda

GIB = 2**30


class FakeBackend:
    """A made-up kind of device whose every number comes from one reading."""

    kind = "hpu"

    def __init__(self) -> None:
        self.reads: list[torch.device] = []
        self.emptied: list[int | None] = []

    def available(self) -> bool:
        return True

    def resolve(self, device: torch.device) -> torch.device:
        return torch.device("hpu", 3 if device.index is None else device.index)

    def in_use(self) -> list[torch.device]:
        return [torch.device("hpu:3")]

    def read(self, device: torch.device) -> Reading:
        self.reads.append(device)
        return Reading(str(device), allocated=5 * GIB, free=7 * GIB, total=16 * GIB)

    def room(self, reading: Reading) -> int | None:
        return reading.free

    def fragments(self, device: torch.device) -> bool:
        return False

    def describe(self, reading: Reading) -> str:
        return f"{reading.device} holds {reading.allocated} bytes"

    def empty_cache(self, index: int | None) -> None:
        self.emptied.append(index)


@pytest.fixture
def fake_backend(monkeypatch: pytest.MonkeyPatch) -> FakeBackend:
    fake = FakeBackend()
    monkeypatch.setitem(kinds.BACKENDS, "hpu", fake)
    return fake


# ---------------------------------------------------------------------------
# A backend plugged in: everything the facade says comes from its reading


def test_the_room_of_a_plugged_in_device_comes_from_one_reading(
    fake_backend: FakeBackend,
) -> None:
    assert device.room(torch.device("hpu")) == 7 * GIB
    assert fake_backend.reads == [torch.device("hpu:3")]


def test_the_report_of_a_plugged_in_device_comes_from_one_reading(
    fake_backend: FakeBackend,
) -> None:
    assert device.describe(torch.device("hpu:1")) == f"hpu:1 holds {5 * GIB} bytes"
    assert fake_backend.reads == [torch.device("hpu:1")]


def test_recovery_empties_the_cache_of_a_plugged_in_device(fake_backend: FakeBackend) -> None:
    hpu = torch.device("hpu:2")
    device.recover(hpu, device.recoveries(hpu))
    assert fake_backend.emptied == [2]


def test_the_metrics_of_a_plugged_in_device_come_from_its_reading(
    fake_backend: FakeBackend,
) -> None:
    scraped = {
        sample.name: sample.value
        for family in collectors.MemoryCollector().collect()
        for sample in family.samples
        if sample.labels == {"device": "hpu:3"}
    }
    assert scraped == {
        "torchmemguard_memory_allocated_bytes": 5 * GIB,
        "torchmemguard_memory_total_bytes": 16 * GIB,
        "torchmemguard_memory_free_bytes": 7 * GIB,
        "torchmemguard_memory_used_ratio": 9 / 16,
    }
    assert fake_backend.reads == [torch.device("hpu:3")]


def test_a_plugged_in_device_that_cannot_be_capped_is_refused(fake_backend: FakeBackend) -> None:
    with pytest.raises(ValueError, match="can cap cuda, xpu and cpu devices, not 'hpu'"):
        device.check_device("hpu")


# ---------------------------------------------------------------------------
# Reports


def test_cpu_report_gives_resident_size_and_address_space() -> None:
    report = device.describe(torch.device("cpu"))
    assert "resident" in report
    assert "address space" in report
    assert "available" in report


def test_cpu_report_names_an_address_space_cap() -> None:
    code = (
        "import resource, torch\n"
        "from torchmemguard import _device as device\n"
        "resource.setrlimit(resource.RLIMIT_AS, (64 * 2**30, resource.RLIM_INFINITY))\n"
        "print(device.describe(torch.device('cpu')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert "cap (RLIMIT_AS) 64 GiB" in out


def test_report_of_an_unknown_device_says_so() -> None:
    assert device.describe(torch.device("meta")) == "memory state unavailable for this device"


def test_report_of_no_device_is_the_cpu_report() -> None:
    assert "resident" in device.describe(None)


def test_cuda_report_gives_the_allocator_and_the_device(fake_cuda: FakeCuda) -> None:
    fake_cuda.allocated[1], fake_cuda.reserved[1] = 3 * GIB, 5 * GIB
    assert device.describe(torch.device("cuda:1")) == (
        "allocated 3 GiB, reserved 5 GiB, total 80 GiB, free 75 GiB"
    )


def test_cuda_report_names_the_cap_in_force(fake_cuda: FakeCuda) -> None:
    fake_cuda.allowed[0] = 20 * GIB
    assert device.describe(torch.device("cuda")).endswith(", cap 20 GiB (25%)")


def test_cuda_report_names_a_cap_that_torch_cannot_read_back(
    fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(torch.cuda, "get_per_process_memory_fraction")
    monkeypatch.setattr(device.accelerator, "_caps_set", {})
    device.limit_for(torch.device("cuda:0")).write(20 * GIB)
    assert device.describe(torch.device("cuda:0")).endswith(", cap 20 GiB (25%)")


def test_cuda_report_before_cuda_is_initialised_says_so(fake_cuda: FakeCuda) -> None:
    fake_cuda.initialized = False
    assert device.describe(torch.device("cuda")) == "memory state unavailable for this device"


def test_a_report_that_fails_says_why(fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(index: int) -> dict[str, int]:
        raise RuntimeError("CUDA error: unspecified launch failure")

    monkeypatch.setattr(torch.cuda, "memory_stats", broken)
    assert device.describe(torch.device("cuda:0")) == (
        "memory state unavailable (RuntimeError('CUDA error: unspecified launch failure'))"
    )


# ---------------------------------------------------------------------------
# Room


def test_the_room_of_the_cpu_is_what_the_process_could_still_take() -> None:
    room = device.room(torch.device("cpu"))
    assert room is not None
    assert 0 < room <= host.capacity()


def test_the_room_of_a_cuda_device_is_free_memory_and_cache_within_the_cap(
    fake_cuda: FakeCuda,
) -> None:
    fake_cuda.reserved[0], fake_cuda.allocated[0] = 30 * 2**30, 20 * 2**30
    assert device.room(torch.device("cuda:0")) == 60 * 2**30  # 50 free + 10 cached
    fake_cuda.allowed[0] = 25 * 2**30
    assert device.room(torch.device("cuda:0")) == 5 * 2**30


def test_the_room_of_an_unread_device_is_unknown(fake_cuda: FakeCuda) -> None:
    fake_cuda.initialized = False
    assert device.room(torch.device("cuda:0")) is None
    assert device.room(torch.device("meta")) is None


def test_the_room_of_a_device_that_fails_to_read_is_unknown(
    fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: 1 / 0)
    assert device.room(torch.device("cuda:0")) is None


def test_the_room_of_no_device_is_unknown() -> None:
    assert device.room(None) is None


def test_no_used_ratio_without_a_total() -> None:
    assert Reading(device="x", free=3).used_ratio is None


# ---------------------------------------------------------------------------
# Which device: one index, never initialising CUDA


def test_no_device_is_the_cpu_without_an_accelerator() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert device.default_device() == torch.device("cpu")


def test_no_device_is_cuda_where_cuda_is_available(fake_cuda: FakeCuda) -> None:
    assert device.default_device() == torch.device("cuda")


def test_a_cuda_limit_names_its_device_index(fake_cuda: FakeCuda) -> None:
    fake_cuda.current = 1
    assert device.limit_for(torch.device("cuda")).device == torch.device("cuda:1")


def test_the_current_device_is_read_where_none_is_named(fake_cuda: FakeCuda) -> None:
    fake_cuda.current = 1
    device.room(torch.device("cuda"))
    assert fake_cuda.stats_calls == [1]


def test_an_uninitialised_device_has_no_cap_and_stays_uninitialised(
    fake_cuda: FakeCuda,
) -> None:
    fake_cuda.initialized = False  # every call that would initialise CUDA now fails
    limit = device.limit_for(torch.device("cuda"))
    assert limit.read() == math.inf
    assert limit.device == torch.device("cuda:0")


# ---------------------------------------------------------------------------
# Which devices can be capped


def test_cpu_devices_are_capped_where_the_system_can(monkeypatch: pytest.MonkeyPatch) -> None:
    assert device.check_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(host, "can_cap_address_space", lambda: False)
    with pytest.raises(ValueError, match="device='cpu': a CPU budget needs RLIMIT_AS"):
        device.check_device("cpu")


def test_a_cpu_device_index_is_dropped() -> None:
    assert device.check_device("cpu:3") == torch.device("cpu")


def test_an_mps_device_is_refused() -> None:
    with pytest.raises(ValueError, match="can cap cuda, xpu and cpu devices, not 'mps'"):
        device.check_device("mps")


def test_a_cuda_device_that_does_not_exist_is_refused(fake_cuda: FakeCuda) -> None:
    with pytest.raises(ValueError, match="device='cuda:2' does not exist: this machine has 2 CUDA"):
        device.check_device("cuda:2")


def test_the_address_space_is_capped_only_under_rlimit_as(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(host, "can_cap_address_space", lambda: True)
    monkeypatch.setattr(host, "address_space_limit", lambda: 4 * GIB)
    assert device.address_space_capped()
    monkeypatch.setattr(host, "address_space_limit", lambda: math.inf)
    assert not device.address_space_capped()


def test_the_torch_out_of_memory_error_is_the_one_torch_raises() -> None:
    assert issubclass(torch.OutOfMemoryError, device.TorchOutOfMemoryError)
