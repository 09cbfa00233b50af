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
from torchmemguard import budget as budget_module

from .conftest import FakeCuda

GIB = 2**30


@pytest.fixture(autouse=True)
def _no_block_left_open() -> Iterator[None]:
    yield
    assert budget_module._open == {}


def test_fraction_is_set_inside_and_no_cap_is_restored_after(fake_cuda: FakeCuda) -> None:
    with memory_budget(0.8):
        assert fake_cuda.fractions[0] == 0.8
    assert fake_cuda.fractions[0] == 1.0
    assert fake_cuda.sets == [(0.8, 0), (1.0, 0)]


def test_a_fraction_set_before_is_restored_exactly(fake_cuda: FakeCuda) -> None:
    fake_cuda.fractions[0] = 0.6172839506172839
    with memory_budget(0.5):
        assert fake_cuda.fractions[0] == 0.5
    assert fake_cuda.fractions[0] == 0.6172839506172839


def test_a_budget_never_loosens_a_cap_set_before(fake_cuda: FakeCuda) -> None:
    fake_cuda.fractions[0] = 0.3
    with memory_budget(0.8) as budget:
        assert fake_cuda.fractions[0] == 0.3
        assert budget.fraction == 0.3
    assert fake_cuda.sets == []


def test_the_cap_is_restored_after_an_exception(fake_cuda: FakeCuda) -> None:
    error = KeyError("inside")
    with pytest.raises(KeyError) as caught, memory_budget(0.8):
        raise error
    assert caught.value is error
    assert fake_cuda.fractions[0] == 1.0


def test_bytes_become_a_fraction_of_the_device_total(fake_cuda: FakeCuda) -> None:
    with memory_budget(bytes="20GiB") as budget:
        assert fake_cuda.fractions[0] == 20 / 80
    assert budget == Budget(torch.device("cuda:0"), 20 * GIB, 0.25)


def test_bytes_above_the_device_total_cap_at_the_whole_device(fake_cuda: FakeCuda) -> None:
    with memory_budget(bytes=200 * GIB) as budget:
        assert budget.fraction == 1.0
        assert budget.bytes == 80 * GIB


def test_an_inner_block_takes_the_tighter_cap_and_gives_the_outer_one_back(
    fake_cuda: FakeCuda,
) -> None:
    with memory_budget(0.8):
        with memory_budget(0.5):
            assert fake_cuda.fractions[0] == 0.5
        assert fake_cuda.fractions[0] == 0.8
    assert fake_cuda.fractions[0] == 1.0


def test_an_inner_block_never_loosens_the_outer_one(fake_cuda: FakeCuda) -> None:
    with memory_budget(0.5), memory_budget(0.9) as inner:
        assert fake_cuda.fractions[0] == 0.5
        assert inner.fraction == 0.5
    assert fake_cuda.sets == [(0.5, 0), (1.0, 0)]


def test_the_same_budget_object_can_be_entered_again_inside_itself(fake_cuda: FakeCuda) -> None:
    budget = memory_budget(0.5)
    with budget:
        with budget:
            assert fake_cuda.fractions[0] == 0.5
        assert fake_cuda.fractions[0] == 0.5
    assert fake_cuda.fractions[0] == 1.0


def test_blocks_closed_out_of_order_leave_the_tightest_open_one(fake_cuda: FakeCuda) -> None:
    outer, inner = memory_budget(0.5), memory_budget(0.8)
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    assert fake_cuda.fractions[0] == 0.8
    inner.__exit__(None, None, None)
    assert fake_cuda.fractions[0] == 1.0


def test_exit_without_enter_is_an_error(fake_cuda: FakeCuda) -> None:
    with pytest.raises(RuntimeError, match=r"memory_budget\(0.5.*not entered"):
        memory_budget(0.5).__exit__(None, None, None)


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
    seen = [fake_cuda.fractions[0]]
    close[0.5].set()
    closed[0.5].wait()
    seen.append(fake_cuda.fractions[0])
    close[0.8].set()
    for thread in threads:
        thread.join()
    seen.append(fake_cuda.fractions[0])
    assert seen == [0.5, 0.8, 1.0]


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
    assert fake_cuda.sets == [(0.5, 0), (1.0, 0)]


def test_each_device_keeps_its_own_cap(fake_cuda: FakeCuda) -> None:
    with memory_budget(0.5, device="cuda:1"), memory_budget(0.7, device="cuda:0"):
        assert fake_cuda.fractions == {0: 0.7, 1: 0.5}
    assert fake_cuda.fractions == {0: 1.0, 1: 1.0}


def test_no_device_means_the_current_cuda_device(fake_cuda: FakeCuda) -> None:
    fake_cuda.current = 1
    with memory_budget(0.5) as budget:
        assert budget.device == torch.device("cuda:1")
        assert fake_cuda.fractions[1] == 0.5


def test_the_cache_is_emptied_on_entry_when_more_than_the_cap_is_reserved(
    fake_cuda: FakeCuda,
) -> None:
    fake_cuda.reserved[1] = 50 * GIB
    with memory_budget(0.5, device="cuda:1"):
        assert fake_cuda.emptied == [1]
    with memory_budget(0.75, device="cuda:1"):
        assert fake_cuda.emptied == [1]


def test_strict_refuses_a_cap_below_what_is_allocated_and_changes_nothing(
    fake_cuda: FakeCuda,
) -> None:
    fake_cuda.allocated[0] = 50 * GIB
    with pytest.raises(BudgetExceededError, match=r"50 GiB is already allocated.*40 GiB"):
        memory_budget(0.5, strict=True).__enter__()
    assert fake_cuda.sets == []
    with memory_budget(0.5):  # without strict, the cap goes on
        assert fake_cuda.fractions[0] == 0.5


def test_a_failed_strict_entry_inside_a_block_keeps_the_outer_cap(fake_cuda: FakeCuda) -> None:
    fake_cuda.allocated[0] = 30 * GIB
    with memory_budget(0.8):
        with pytest.raises(BudgetExceededError):
            memory_budget(0.25, strict=True).__enter__()
        assert fake_cuda.fractions[0] == 0.8
    assert fake_cuda.fractions[0] == 1.0


def test_a_block_that_tightens_nothing_is_not_answerable_for_memory_held(
    fake_cuda: FakeCuda,
) -> None:
    fake_cuda.fractions[0] = 0.25
    fake_cuda.allocated[0] = 50 * GIB
    with memory_budget(0.9, strict=True) as budget:
        assert budget.fraction == 0.25


def test_a_decorated_function_runs_within_the_budget(fake_cuda: FakeCuda) -> None:
    @memory_budget(0.5)
    def inside(x: int) -> tuple[int, float | None]:
        return x, fake_cuda.fractions[0]

    assert inside(3) == (3, 0.5)
    assert fake_cuda.fractions[0] == 1.0
    assert inside.__name__ == "inside"


def test_a_decorated_function_may_call_itself(fake_cuda: FakeCuda) -> None:
    @memory_budget(0.5)
    def depth(n: int) -> int:
        return 0 if n == 0 else 1 + depth(n - 1)

    assert depth(5) == 5
    assert fake_cuda.sets == [(0.5, 0), (1.0, 0)]


def test_a_decorated_coroutine_runs_within_the_budget(fake_cuda: FakeCuda) -> None:
    @memory_budget(0.5)
    async def inside() -> float | None:
        await asyncio.sleep(0)
        return fake_cuda.fractions[0]

    assert asyncio.run(inside()) == 0.5
    assert fake_cuda.fractions[0] == 1.0


def test_cancelling_a_decorated_coroutine_restores_the_cap(fake_cuda: FakeCuda) -> None:
    started = asyncio.Event()

    @memory_budget(0.5)
    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    async def main() -> None:
        task = asyncio.create_task(forever())
        await started.wait()
        assert fake_cuda.fractions[0] == 0.5
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert fake_cuda.fractions[0] == 1.0


def test_tasks_interleaving_with_blocks_restore_the_cap(fake_cuda: FakeCuda) -> None:
    budget = memory_budget(0.5)
    seen: list[float | None] = []

    async def block(delay: float) -> None:
        with budget:
            await asyncio.sleep(delay)
            seen.append(fake_cuda.fractions[0])

    async def main() -> None:
        await asyncio.gather(block(0.02), block(0.01))

    asyncio.run(main())
    assert seen == [0.5, 0.5]
    assert fake_cuda.fractions[0] == 1.0


def test_a_callable_object_with_an_async_call_runs_within_the_budget(
    fake_cuda: FakeCuda,
) -> None:
    class Model:
        async def __call__(self) -> float | None:
            await asyncio.sleep(0)
            return fake_cuda.fractions[0]

    assert asyncio.run(memory_budget(0.5)(Model())()) == 0.5
    assert fake_cuda.fractions[0] == 1.0


def test_a_generator_function_is_refused() -> None:
    def chunks() -> Iterator[int]:
        yield 1

    with pytest.raises(TypeError, match=r"cannot decorate the generator function .*chunks"):
        memory_budget(0.5)(chunks)


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
    assert sizes == [8, 4, 4]
    assert fake_cuda.fractions[0] == 1.0


def test_current_budget_reports_the_cap_in_force(fake_cuda: FakeCuda) -> None:
    assert current_budget() is None
    with memory_budget(bytes="8GiB"):
        assert current_budget() == Budget(torch.device("cuda:0"), 8 * GIB, 0.1)
        assert current_budget("cuda:1") is None
    assert current_budget() is None


def test_current_budget_reports_a_cap_set_outside(fake_cuda: FakeCuda) -> None:
    fake_cuda.fractions[1] = 0.25
    assert current_budget("cuda:1") == Budget(torch.device("cuda:1"), 20 * GIB, 0.25)


def test_a_whole_device_budget_is_still_reported_while_open(fake_cuda: FakeCuda) -> None:
    with memory_budget(1.0):
        assert current_budget() == Budget(torch.device("cuda:0"), 80 * GIB, 1.0)


def test_current_budget_leaves_an_uninitialised_device_alone(fake_cuda: FakeCuda) -> None:
    fake_cuda.initialized = False
    fake_cuda.current = 1  # only readable once initialised
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
