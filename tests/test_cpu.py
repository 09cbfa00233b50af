"""The CPU: the process read from the system, and its address-space cap."""

from __future__ import annotations

import pytest
import torch

from torchmemguard import BudgetExceededError, device
from torchmemguard.device import Backend, Reading, host

GIB = 2**30


def cpu() -> Backend:
    found = device.backend("cpu")
    assert found is not None
    return found


def read() -> Reading:
    reading = cpu().read(torch.device("cpu"))
    assert reading is not None
    return reading


# ---------------------------------------------------------------------------
# The cap


def test_a_cpu_cap_is_bytes_of_the_memory_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "capacity", lambda: 10 * GIB)
    limit = device.limit_for(torch.device("cpu"))
    assert limit.cap(0.25, None) == 2.5 * GIB
    assert limit.cap(None, 123) == 123


def test_a_cpu_cap_too_large_for_rlimit_is_the_largest_it_takes() -> None:
    assert device.limit_for(torch.device("cpu")).cap(None, 2**70) == 2**63 - 1


def test_a_cpu_cap_below_the_address_space_is_refused_with_both_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(host, "address_space", lambda: 3 * GIB)
    limit = device.limit_for(torch.device("cpu"))
    limit.check(3 * GIB, strict=False, tightens=True)
    with pytest.raises(BudgetExceededError, match=r"2 GiB is below .* 3 GiB \(2147483648 < 3221"):
        limit.check(2 * GIB, strict=False, tightens=True)


def test_a_cpu_cap_that_tightens_nothing_is_not_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "address_space", lambda: 3 * GIB)
    device.limit_for(torch.device("cpu")).check(2 * GIB, strict=True, tightens=False)


# ---------------------------------------------------------------------------
# The reading, and what is computed from it


def test_the_cpu_reading_is_the_process_seen_from_the_system() -> None:
    reading = read()
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
    assert read().budget is None


def test_the_room_is_what_is_available_within_the_address_space_cap() -> None:
    assert cpu().room(Reading("cpu", reserved=6 * GIB, free=8 * GIB)) == 8 * GIB
    assert cpu().room(Reading("cpu", reserved=6 * GIB, free=8 * GIB, budget=10 * GIB)) == 4 * GIB
    assert cpu().room(Reading("cpu", reserved=6 * GIB)) is None


def test_the_report_names_every_number_it_has() -> None:
    reading = Reading("cpu", allocated=GIB, reserved=4 * GIB, free=3 * GIB, budget=8 * GIB)
    assert cpu().describe(reading) == (
        "resident 1 GiB, address space 4 GiB, available 3 GiB, cap (RLIMIT_AS) 8 GiB"
    )
    assert cpu().describe(Reading("cpu")) == "memory state unavailable"
