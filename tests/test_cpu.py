"""The CPU: the process read from the system, and its address-space cap."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from torchmemguard import BudgetExceededError
from torchmemguard import _device as device
from torchmemguard._budget import refuse_below_held
from torchmemguard._device import Backend, Reading, host, malloc

GIB = 2**30
MIB = 2**20

needs_glibc = pytest.mark.skipif(not malloc.readable(), reason="needs glibc's mallinfo2")


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
    refuse_below_held(limit, 3 * GIB, strict=False, tightens=True)
    with pytest.raises(BudgetExceededError, match=r"2 GiB is below .* 3 GiB \(2147483648 < 3221"):
        refuse_below_held(limit, 2 * GIB, strict=False, tightens=True)


def test_a_cpu_cap_that_tightens_nothing_is_not_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "address_space", lambda: 3 * GIB)
    refuse_below_held(device.limit_for(torch.device("cpu")), 2 * GIB, strict=True, tightens=False)


# ---------------------------------------------------------------------------
# The reading, and what is computed from it


def test_the_cpu_reading_is_the_process_seen_from_malloc_and_the_system() -> None:
    reading = read()
    assert reading.device == "cpu"
    assert reading.total == host.capacity()
    assert reading.address_space is not None
    assert reading.resident is not None
    assert reading.address_space > reading.resident > 0
    assert reading.peak_resident is not None
    assert reading.peak_resident >= reading.resident
    assert reading.free is not None
    assert 0 < reading.free <= reading.total
    assert reading.active is None
    assert reading.peak_allocated is None
    assert reading.alloc_retries is None


@needs_glibc
def test_the_cpu_reading_counts_malloc_in_use_and_held_as_allocated_and_reserved() -> None:
    reading = read()
    assert reading.reserved is not None
    assert reading.allocated is not None
    assert 0 < reading.allocated <= reading.reserved < reading.address_space  # type: ignore[operator]
    assert reading.cached == reading.reserved - reading.allocated


@needs_glibc
def test_a_block_freed_inside_malloc_s_heap_is_counted_as_cached() -> None:
    # 1 MiB blocks come from the heap, where glibc keeps them once freed: below
    # the mmap threshold, which a 24 MiB block raises past them once freed.
    torch.ones(24 * MIB // 4)
    blocks = [torch.ones(MIB // 4) for _ in range(64)]
    before = read()
    del blocks[1:-1]  # the first and last stay: the heap cannot shrink from its top
    after = read()
    assert before.address_space == after.address_space  # nothing went back to the system
    assert after.cached is not None
    assert before.cached is not None
    assert after.cached >= before.cached + 60 * MIB
    assert after.allocated is not None
    assert before.allocated is not None
    assert after.allocated <= before.allocated - 60 * MIB


@needs_glibc
def test_emptying_the_cpu_cache_returns_malloc_s_free_memory_to_the_system() -> None:
    torch.ones(24 * MIB // 4)  # freed at once: raises glibc's mmap threshold
    blocks = [torch.ones(MIB // 4) for _ in range(64)]
    resident = host.process_memory()[1]
    del blocks[1:-1]
    device.empty_cache(torch.device("cpu"))
    after = host.process_memory()[1]
    assert resident is not None
    assert after is not None
    assert after <= resident - 48 * MIB


_HEAPS = """
import torch
from torchmemguard._device import backend
torch.ones(24 * 2**20 // 4)  # freed at once: raises a dynamic mmap threshold past 24 MiB
print(backend("cpu").fragments(torch.device("cpu")))
"""


@needs_glibc
@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({}, "True"),
        ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "False"),
        ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, "False"),
    ],
    ids=["glibc-defaults", "fixed-threshold", "fixed-by-tunable"],
)
def test_the_cpu_fragments_once_malloc_serves_large_blocks_from_its_heaps(
    variables: dict[str, str], expected: str
) -> None:
    # A fresh process of its own: glibc's threshold only ever rises.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("GLIBC_TUNABLES", None)
    env.update(variables)
    done = subprocess.run(
        [sys.executable, "-c", _HEAPS], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected


def test_the_cpu_reading_gives_no_budget_without_an_address_space_cap() -> None:
    if host.address_space_limit() != float("inf"):
        pytest.skip("this process runs under an address-space cap")
    assert read().budget is None


def test_the_room_is_what_is_available_within_the_address_space_cap() -> None:
    assert cpu().room(Reading("cpu", address_space=6 * GIB, free=8 * GIB)) == 8 * GIB
    capped = Reading("cpu", address_space=6 * GIB, free=8 * GIB, budget=10 * GIB)
    assert cpu().room(capped) == 4 * GIB
    assert cpu().room(Reading("cpu", address_space=6 * GIB)) is None


def test_the_room_leaves_out_what_malloc_keeps_free() -> None:
    reading = Reading(
        "cpu", allocated=GIB, reserved=3 * GIB, address_space=6 * GIB, free=8 * GIB, budget=7 * GIB
    )
    assert cpu().room(reading) == GIB


def test_the_report_names_every_number_it_has() -> None:
    reading = Reading(
        "cpu",
        allocated=GIB,
        reserved=2 * GIB,
        resident=3 * GIB,
        address_space=4 * GIB,
        free=3 * GIB,
        budget=8 * GIB,
    )
    assert cpu().describe(reading) == (
        "malloc in use 1 GiB, malloc free 1 GiB, resident 3 GiB, address space 4 GiB, "
        "available 3 GiB, cap (RLIMIT_AS) 8 GiB"
    )
    assert cpu().describe(Reading("cpu")) == "memory state unavailable"
