"""memory_budget on real CUDA: the allocator's per-process fraction, set and restored."""

from __future__ import annotations

import threading

import torch

import torchmemguard

# torch >= 2.6 reads the fraction back; every test here needs it.
fraction = torch.cuda.get_per_process_memory_fraction


def total() -> int:
    return int(torch.cuda.get_device_properties(0).total_memory)


def test_a_budget_sets_the_fraction_and_restores_no_cap() -> None:
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
    with torchmemguard.memory_budget(0.5, device="cuda:0"):
        inside = fraction(0)
    assert int(inside * total()) == int(0.5 * total())
    assert fraction(0) == 1.0


def test_a_fraction_set_before_is_restored_exactly() -> None:
    torch.cuda.set_per_process_memory_fraction(0.7123456789, 0)
    before = fraction(0)
    try:
        with torchmemguard.memory_budget(0.25, device="cuda:0"):
            pass
        assert fraction(0) == before
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)


def test_bytes_are_put_in_force_to_the_byte() -> None:
    size = 3 * 2**30 + 12345
    with torchmemguard.memory_budget(bytes=size, device="cuda:0") as budget:
        allowed = round(fraction(0) * total())
    assert allowed == size
    assert budget.bytes == size


def test_nested_blocks_take_the_tighter_cap_and_give_the_outer_back() -> None:
    seen = []
    with torchmemguard.memory_budget(0.6, device="cuda:0"):
        seen.append(fraction(0))
        with torchmemguard.memory_budget(0.3, device="cuda:0"):
            seen.append(fraction(0))
            with torchmemguard.memory_budget(0.9, device="cuda:0"):
                seen.append(fraction(0))
        seen.append(fraction(0))
    seen.append(fraction(0))
    shares = [round(value, 6) for value in seen]
    assert shares == [0.6, 0.3, 0.3, 0.6, 1.0]


def test_threads_share_the_tightest_cap_until_each_closes() -> None:
    both_open = threading.Barrier(3)
    close = {0.6: threading.Event(), 0.3: threading.Event()}
    closed = {0.6: threading.Event(), 0.3: threading.Event()}

    def block(share: float) -> None:
        with torchmemguard.memory_budget(share, device="cuda:0"):
            both_open.wait()
            close[share].wait()
        closed[share].set()

    threads = [threading.Thread(target=block, args=(share,)) for share in (0.6, 0.3)]
    for thread in threads:
        thread.start()
    both_open.wait()
    seen = [fraction(0)]
    close[0.3].set()
    closed[0.3].wait()
    seen.append(fraction(0))
    close[0.6].set()
    for thread in threads:
        thread.join()
    seen.append(fraction(0))
    assert [round(value, 6) for value in seen] == [0.3, 0.6, 1.0]


def test_current_budget_reads_the_allocator() -> None:
    with torchmemguard.memory_budget(bytes="2GiB", device="cuda:0"):
        budget = torchmemguard.current_budget("cuda:0")
    assert budget is not None
    assert budget.bytes == 2 * 2**30
    assert torchmemguard.current_budget("cuda:0") is None


def test_strict_refuses_a_cap_below_what_is_allocated() -> None:
    held = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda:0")
    message = ""
    try:
        torchmemguard.memory_budget(bytes="64MiB", device="cuda:0", strict=True).__enter__()
    except torchmemguard.BudgetExceededError as exc:
        message = str(exc)
    finally:
        del held
    assert "already allocated" in message
    assert fraction(0) == 1.0
