"""Budgets: the asks of open blocks, the cap in force, and its exact restore.

The bookkeeping runs here against stand-ins for the final torch.cuda calls
(``fake_cuda``); budgets on the CPU cap the process, so they are tested in child
processes, in test_budget_cpu.py.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Iterator

import pytest
import torch

import torchmemguard
from torchmemguard import Budget, BudgetExceededError, current_budget, memory_budget
from torchmemguard import _budget as budget_module

from .conftest import FakeCuda

GIB = 2**30
TOTAL = 85_198_045_184  # an 80 GB card's total_memory: not a round number of bytes


def share(fraction: float) -> int:
    """The bytes that PyTorch's allocator keeps for ``fraction`` of the device."""
    return math.floor(fraction * TOTAL)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    fake = FakeCuda(total=TOTAL)
    fake.install(monkeypatch)
    return fake


@pytest.fixture(autouse=True)
def _no_block_left_open() -> Iterator[None]:
    yield
    assert budget_module._open == {}


def test_a_fraction_is_put_in_force_inside_and_no_cap_after(fake_cuda: FakeCuda) -> None:
    with memory_budget(0.8):
        assert fake_cuda.allowed[0] == share(0.8)
    assert fake_cuda.allowed[0] is None


def test_no_cap_is_restored_as_a_fraction_of_one(fake_cuda: FakeCuda) -> None:
    with memory_budget(0.8):
        pass
    assert fake_cuda.sets[-1] == (1.0, 0)


def test_a_cap_set_before_is_restored_to_the_byte(fake_cuda: FakeCuda) -> None:
    for allowed in range(share(0.6), share(0.6) + 40):
        fake_cuda.allowed[0] = allowed
        with memory_budget(0.5):
            assert fake_cuda.allowed[0] == share(0.5)
        assert fake_cuda.allowed[0] == allowed


def test_bytes_are_put_in_force_to_the_byte(fake_cuda: FakeCuda) -> None:
    for size in range(20 * GIB, 20 * GIB + 40):
        with memory_budget(bytes=size) as budget:
            assert fake_cuda.allowed[0] == size
        assert budget.bytes == size


def test_a_budget_never_loosens_a_cap_set_before(fake_cuda: FakeCuda) -> None:
    fake_cuda.allowed[0] = share(0.3)
    with memory_budget(0.8) as budget:
        assert fake_cuda.allowed[0] == share(0.3)
    assert budget.bytes == share(0.3)
    assert fake_cuda.sets == []


def test_a_cap_set_outside_during_a_block_is_kept_and_restored(fake_cuda: FakeCuda) -> None:
    with memory_budget(0.5):
        fake_cuda.set_fraction(0.3, 0)
        with memory_budget(0.4):
            assert fake_cuda.allowed[0] == int(0.3 * TOTAL)
    assert fake_cuda.allowed[0] == int(0.3 * TOTAL)


def test_an_outer_block_holds_when_a_cap_set_outside_is_looser(fake_cuda: FakeCuda) -> None:
    with memory_budget(0.5):
        fake_cuda.set_fraction(0.9, 0)
        with memory_budget(0.7) as inner:
            assert fake_cuda.allowed[0] == share(0.5)
        assert inner.bytes == share(0.5)
    assert fake_cuda.allowed[0] == int(0.9 * TOTAL)


def test_the_cap_is_restored_after_an_exception(fake_cuda: FakeCuda) -> None:
    with pytest.raises(KeyError), memory_budget(0.8):
        raise KeyError("inside")
    assert fake_cuda.allowed[0] is None


def test_an_exception_inside_passes_through_untouched(fake_cuda: FakeCuda) -> None:
    error = KeyError("inside")
    with pytest.raises(KeyError) as caught, memory_budget(0.8):
        raise error
    assert caught.value is error
    assert caught.value.__context__ is None


def test_a_budget_gives_its_cap_as_bytes_and_share(fake_cuda: FakeCuda) -> None:
    with memory_budget(bytes="20GiB") as budget:
        pass
    assert budget == Budget(torch.device("cuda:0"), 20 * GIB, 20 * GIB / TOTAL)


def test_bytes_above_the_device_total_are_the_whole_device(fake_cuda: FakeCuda) -> None:
    with memory_budget(bytes=200 * GIB) as budget:
        assert fake_cuda.allowed[0] is None
    assert budget == Budget(torch.device("cuda:0"), TOTAL, 1.0)


def test_an_inner_block_takes_the_tighter_cap(fake_cuda: FakeCuda) -> None:
    with memory_budget(0.8), memory_budget(0.5):
        assert fake_cuda.allowed[0] == share(0.5)


def test_the_outer_cap_is_back_when_the_inner_block_closes(fake_cuda: FakeCuda) -> None:
    with memory_budget(0.8):
        with memory_budget(0.5):
            pass
        assert fake_cuda.allowed[0] == share(0.8)


def test_an_inner_block_never_loosens_the_outer_one(fake_cuda: FakeCuda) -> None:
    with memory_budget(0.5), memory_budget(0.9) as inner:
        assert fake_cuda.allowed[0] == share(0.5)
    assert inner.bytes == share(0.5)


def test_the_same_budget_object_can_be_entered_again_inside_itself(fake_cuda: FakeCuda) -> None:
    budget = memory_budget(0.5)
    with budget:
        with budget:
            assert fake_cuda.allowed[0] == share(0.5)
        assert fake_cuda.allowed[0] == share(0.5)
    assert fake_cuda.allowed[0] is None


def test_blocks_closed_out_of_order_leave_the_tightest_open_one(fake_cuda: FakeCuda) -> None:
    outer, inner = memory_budget(0.5), memory_budget(0.8)
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    assert fake_cuda.allowed[0] == share(0.8)
    inner.__exit__(None, None, None)
    assert fake_cuda.allowed[0] is None


def test_exit_without_enter_is_an_error(fake_cuda: FakeCuda) -> None:
    with pytest.raises(RuntimeError, match=r"memory_budget\(0.5.*exited more often than"):
        memory_budget(0.5).__exit__(None, None, None)


def test_a_block_left_in_another_thread_is_closed(fake_cuda: FakeCuda) -> None:
    budget = memory_budget(0.5)
    budget.__enter__()
    closer = threading.Thread(target=budget.__exit__, args=(None, None, None))
    closer.start()
    closer.join()
    assert fake_cuda.allowed[0] is None


def test_a_block_left_in_another_task_is_closed(fake_cuda: FakeCuda) -> None:
    budget = memory_budget(0.5)

    async def main() -> None:
        await asyncio.create_task(asyncio.to_thread(budget.__enter__))
        await asyncio.create_task(asyncio.to_thread(budget.__exit__, None, None, None))

    asyncio.run(main())
    assert fake_cuda.allowed[0] is None


def test_threads_share_the_tightest_cap_recomputed_as_each_closes(fake_cuda: FakeCuda) -> None:
    both_open = threading.Barrier(3)
    close = {0.5: threading.Event(), 0.8: threading.Event()}
    closed = {0.5: threading.Event(), 0.8: threading.Event()}

    def block(fraction: float) -> None:
        with memory_budget(fraction):
            both_open.wait()
            close[fraction].wait()
        closed[fraction].set()

    threads = [threading.Thread(target=block, args=(f,)) for f in (0.5, 0.8)]
    for thread in threads:
        thread.start()
    both_open.wait()
    seen = [fake_cuda.allowed[0]]
    close[0.5].set()
    closed[0.5].wait()
    seen.append(fake_cuda.allowed[0])
    close[0.8].set()
    for thread in threads:
        thread.join()
    seen.append(fake_cuda.allowed[0])
    assert seen == [share(0.5), share(0.8), None]


def test_one_budget_object_used_by_many_threads_at_once(fake_cuda: FakeCuda) -> None:
    budget = memory_budget(0.5)
    all_in = threading.Barrier(8)

    def block() -> None:
        with budget:
            all_in.wait()

    threads = [threading.Thread(target=block) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [fraction for fraction, _ in fake_cuda.sets][1:] == [1.0]


def test_each_device_keeps_its_own_cap(fake_cuda: FakeCuda) -> None:
    with memory_budget(0.5, device="cuda:1"), memory_budget(0.7, device="cuda:0"):
        assert fake_cuda.allowed == {0: share(0.7), 1: share(0.5)}
    assert fake_cuda.allowed == {0: None, 1: None}


def test_no_device_means_the_current_cuda_device(fake_cuda: FakeCuda) -> None:
    fake_cuda.current = 1
    with memory_budget(0.5) as budget:
        assert fake_cuda.allowed[1] == share(0.5)
    assert budget.device == torch.device("cuda:1")


def test_the_cache_is_emptied_on_entry_when_more_than_the_cap_is_reserved(
    fake_cuda: FakeCuda,
) -> None:
    fake_cuda.reserved[1] = 50 * GIB
    with memory_budget(0.5, device="cuda:1"):
        assert fake_cuda.emptied == [1]


def test_the_cache_is_kept_when_the_cap_holds_what_is_reserved(fake_cuda: FakeCuda) -> None:
    fake_cuda.reserved[1] = 50 * GIB
    with memory_budget(0.75, device="cuda:1"):
        assert fake_cuda.emptied == []


def test_the_cache_is_kept_when_a_block_tightens_nothing(fake_cuda: FakeCuda) -> None:
    with memory_budget(0.5):
        fake_cuda.reserved[0] = 50 * GIB
        with memory_budget(0.5):
            assert fake_cuda.emptied == []


def test_a_block_whose_clean_up_fails_is_closed(
    fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "empty_cache", broken)
    fake_cuda.reserved[0] = 50 * GIB
    with pytest.raises(RuntimeError, match="illegal memory access"), memory_budget(0.5):
        pass
    assert fake_cuda.allowed[0] is None


def test_strict_refuses_a_cap_below_what_is_allocated(fake_cuda: FakeCuda) -> None:
    fake_cuda.allocated[0] = 50 * GIB
    with pytest.raises(BudgetExceededError, match=r"50 GiB is already allocated.*39.7 GiB"):
        memory_budget(0.5, strict=True).__enter__()


def test_a_refused_strict_entry_changes_nothing(fake_cuda: FakeCuda) -> None:
    fake_cuda.allocated[0] = 50 * GIB
    with pytest.raises(BudgetExceededError):
        memory_budget(0.5, strict=True).__enter__()
    assert fake_cuda.sets == []


def test_without_strict_the_cap_goes_on_over_what_is_allocated(fake_cuda: FakeCuda) -> None:
    fake_cuda.allocated[0] = 50 * GIB
    with memory_budget(0.5):
        assert fake_cuda.allowed[0] == share(0.5)


def test_strict_checks_the_cap_in_force_even_when_it_tightens_nothing(
    fake_cuda: FakeCuda,
) -> None:
    fake_cuda.allowed[0] = share(0.25)
    fake_cuda.allocated[0] = 50 * GIB
    with pytest.raises(BudgetExceededError):
        memory_budget(0.9, strict=True).__enter__()


def test_a_refused_strict_entry_inside_a_block_keeps_the_outer_cap(fake_cuda: FakeCuda) -> None:
    fake_cuda.allocated[0] = 30 * GIB
    with memory_budget(0.8):
        with pytest.raises(BudgetExceededError):
            memory_budget(0.25, strict=True).__enter__()
        assert fake_cuda.allowed[0] == share(0.8)


def test_a_decorated_function_runs_within_the_budget(fake_cuda: FakeCuda) -> None:
    @memory_budget(0.5)
    def inside(x: int) -> tuple[int, int | None]:
        return x, fake_cuda.allowed[0]

    assert inside(3) == (3, share(0.5))
    assert fake_cuda.allowed[0] is None


def test_a_decorated_function_keeps_its_name(fake_cuda: FakeCuda) -> None:
    @memory_budget(0.5)
    def inside() -> None:
        pass

    assert inside.__name__ == "inside"


def test_a_decorated_function_may_call_itself(fake_cuda: FakeCuda) -> None:
    @memory_budget(0.5)
    def depth(n: int) -> int:
        return 0 if n == 0 else 1 + depth(n - 1)

    assert depth(5) == 5
    assert fake_cuda.sets == [((share(0.5) + 0.5) / TOTAL, 0), (1.0, 0)]


def test_a_decorated_coroutine_runs_within_the_budget(fake_cuda: FakeCuda) -> None:
    @memory_budget(0.5)
    async def inside() -> int | None:
        await asyncio.sleep(0)
        return fake_cuda.allowed[0]

    assert asyncio.run(inside()) == share(0.5)
    assert fake_cuda.allowed[0] is None


def test_cancelling_a_decorated_coroutine_restores_the_cap(fake_cuda: FakeCuda) -> None:
    started = asyncio.Event()

    @memory_budget(0.5)
    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    async def main() -> None:
        task = asyncio.create_task(forever())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert fake_cuda.allowed[0] is None


def test_tasks_interleaving_with_blocks_restore_the_cap(fake_cuda: FakeCuda) -> None:
    budget = memory_budget(0.5)
    seen: list[int | None] = []

    async def block(delay: float) -> None:
        with budget:
            await asyncio.sleep(delay)
            seen.append(fake_cuda.allowed[0])

    async def main() -> None:
        await asyncio.gather(block(0.02), block(0.01))

    asyncio.run(main())
    assert seen == [share(0.5), share(0.5)]
    assert fake_cuda.allowed[0] is None


def test_a_callable_object_with_an_async_call_runs_within_the_budget(
    fake_cuda: FakeCuda,
) -> None:
    class Model:
        async def __call__(self) -> int | None:
            await asyncio.sleep(0)
            return fake_cuda.allowed[0]

    assert asyncio.run(memory_budget(0.5)(Model())()) == share(0.5)
    assert fake_cuda.allowed[0] is None


def test_a_generator_function_is_refused() -> None:
    def chunks() -> Iterator[int]:
        yield 1

    with pytest.raises(TypeError, match=r"cannot decorate the generator function .*chunks"):
        memory_budget(0.5)(chunks)


@pytest.mark.usefixtures("unmeasured")
def test_a_decorated_guarded_coroutine_recovers_within_the_budget(fake_cuda: FakeCuda) -> None:
    sizes: list[int] = []

    @memory_budget(0.5)
    @torchmemguard.oom_safe
    async def run(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        if x.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x + 1

    out = asyncio.run(run(torch.arange(8.0)))
    assert torch.equal(out, torch.arange(8.0) + 1)
    assert sizes == [8, 4, 4, 1, 1]  # 1, 1: the row check
    assert fake_cuda.allowed[0] is None


def test_current_budget_is_none_without_a_cap(fake_cuda: FakeCuda) -> None:
    assert current_budget() is None


def test_current_budget_reports_the_cap_in_force(fake_cuda: FakeCuda) -> None:
    with memory_budget(bytes="8GiB"):
        assert current_budget() == Budget(torch.device("cuda:0"), 8 * GIB, 8 * GIB / TOTAL)
        assert current_budget("cuda:1") is None


def test_current_budget_reports_a_cap_set_outside(fake_cuda: FakeCuda) -> None:
    fake_cuda.allowed[1] = 20 * GIB
    assert current_budget("cuda:1") == Budget(torch.device("cuda:1"), 20 * GIB, 20 * GIB / TOTAL)


def test_a_whole_device_budget_is_still_reported_while_open(fake_cuda: FakeCuda) -> None:
    with memory_budget(1.0):
        assert current_budget() == Budget(torch.device("cuda:0"), TOTAL, 1.0)


def test_current_budget_leaves_an_uninitialised_device_alone(fake_cuda: FakeCuda) -> None:
    fake_cuda.initialized = False  # every call that would initialise CUDA now fails
    assert current_budget() is None


def test_budget_reads_as_bytes_and_share() -> None:
    assert str(Budget(torch.device("cuda:0"), 20 * GIB, 0.25)) == "20 GiB (25.0%) of cuda:0"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({}, TypeError, "a fraction or bytes, got neither"),
        ({"fraction": 0.5, "bytes": 10}, TypeError, "not both .*fraction=0.5, bytes=10"),
        ({"fraction": math.nan}, ValueError, r"fraction=nan must be in \(0, 1\]"),
        ({"fraction": 0}, ValueError, r"fraction=0 must be in \(0, 1\]"),
        ({"fraction": -0.5}, ValueError, r"fraction=-0.5 must be in \(0, 1\]"),
        ({"fraction": 1.01}, ValueError, r"fraction=1.01 must be in \(0, 1\]"),
        ({"fraction": "0.5"}, TypeError, "fraction must be a number.*'0.5'"),
        ({"fraction": True}, TypeError, "fraction must be a number.*True"),
        ({"bytes": "6 GiBs"}, ValueError, "bytes='6 GiBs' is not a size"),
        ({"bytes": -1}, ValueError, "bytes=-1 must be a positive"),
        ({"bytes": "-2GB"}, ValueError, "bytes='-2GB' must be a positive"),
        ({"bytes": 6e9}, TypeError, "bytes must be an int or a size string.*6000000000.0"),
        ({"fraction": 0.5, "strict": 1}, TypeError, "strict must be True or False, got 1"),
        ({"fraction": 0.5, "device": "gpu"}, ValueError, "device='gpu' is not a device"),
        ({"fraction": 0.5, "device": "meta"}, ValueError, "device='meta'.*not 'meta'"),
    ],
)
def test_bad_arguments_are_named_in_the_error(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        memory_budget(**kwargs)  # type: ignore[arg-type]


def test_a_cuda_device_that_does_not_exist_is_refused(fake_cuda: FakeCuda) -> None:
    with pytest.raises(ValueError, match="device='cuda:2' does not exist: this machine has 2 CUDA"):
        memory_budget(0.5, device="cuda:2")


def test_cuda_without_cuda_is_refused() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="device='cuda': CUDA is not available"):
        memory_budget(0.5, device="cuda")


def test_the_repr_shows_the_arguments() -> None:
    assert repr(memory_budget(bytes="1KiB", device="cpu")) == (
        "memory_budget(bytes=1024, device=device(type='cpu'), strict=False)"
    )


def test_every_bad_argument_of_a_budget_is_named_at_once() -> None:
    with pytest.raises(TypeError) as found:
        torchmemguard.memory_budget(1.5, device="nowhere", strict=1)  # type: ignore[arg-type]
    message = str(found.value)
    assert "fraction=1.5 must be in (0, 1]" in message
    assert "device='nowhere'" in message
    assert "strict must be True or False, got 1" in message
    with pytest.raises(TypeError, match=r"not both.*fraction=0 must.*bytes='lots' is not"):
        torchmemguard.memory_budget(0, bytes="lots")
    with pytest.raises(ValueError, match=r"bytes='lots' is not a size.*device='nowhere'"):
        torchmemguard.memory_budget(bytes="lots", device="nowhere")
