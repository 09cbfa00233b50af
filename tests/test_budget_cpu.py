"""``memory_budget`` on the CPU: the soft ``RLIMIT_AS`` it sets and restores.

A CPU budget lowers the address-space limit of the whole process, so every
block is entered in a child process (see ``tests/realcap.py``), never in
pytest's own. Each ``_child_*`` function runs in a child, records what it saw
as JSON, and several tests check one behaviour each on what one child saw.
Limits are reported as ``[soft, hard]`` with ``None`` for no limit.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import pytest

from tests.realcap import MIB, prepare_child, run_child, vm_size

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="needs RLIMIT_AS and /proc (Linux)"
    ),
]

_HERE = "tests.test_budget_cpu"
GIB = 2**30
Limits = list[int | None]


def _rlimit() -> Limits:
    """The process's ``RLIMIT_AS`` as ``[soft, hard]``, ``None`` meaning no limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    return [None if value == resource.RLIM_INFINITY else value for value in (soft, hard)]


def _set_rlimit(soft: int, hard: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class _Marker(ValueError):
    """The exception raised inside a block, to see it come out unchanged."""


def _raise_inside(budget_bytes: int) -> dict[str, Any]:
    """Raise inside a block; what came out, and the limit seen inside and after."""
    from torchmemguard import memory_budget

    raised = _Marker("raised inside the budget")
    inside: Limits = []
    caught: BaseException | None = None
    try:
        with memory_budget(bytes=budget_bytes):
            inside = _rlimit()
            raise raised
    except BaseException as exc:
        caught = exc
    return {
        "inside": inside,
        "after": _rlimit(),
        "same_object": caught is raised,
        "type": type(caught).__qualname__,
        "message": str(caught),
        "context_is_none": caught is not None and caught.__context__ is None,
        "cause_is_none": caught is not None and caught.__cause__ is None,
    }


# ---------------------------------------------------------------------------
# Set exactly, restored exactly: from no limit, and from a limit of one's own


def _child_from_no_limit() -> dict[str, Any]:
    prepare_child()
    from torchmemguard import memory_budget

    before = _rlimit()
    with memory_budget(bytes=16 * GIB):
        inside = _rlimit()
    return {
        "before": before,
        "inside": inside,
        "after": _rlimit(),
        "exception": _raise_inside(16 * GIB),
    }


def _child_from_own_limit() -> dict[str, Any]:
    prepare_child()
    from torchmemguard import memory_budget

    _set_rlimit(64 * GIB, 128 * GIB)
    before = _rlimit()
    with memory_budget(bytes=16 * GIB):
        tighter = _rlimit()
    after_tighter = _rlimit()
    with memory_budget(bytes=96 * GIB):
        looser = _rlimit()
    return {
        "before": before,
        "tighter": tighter,
        "after_tighter": after_tighter,
        "looser": looser,
        "after_looser": _rlimit(),
        "exception": _raise_inside(16 * GIB),
    }


@pytest.fixture(scope="module")
def from_no_limit() -> dict[str, Any]:
    return run_child(f"{_HERE}:_child_from_no_limit")


@pytest.fixture(scope="module")
def from_own_limit() -> dict[str, Any]:
    return run_child(f"{_HERE}:_child_from_own_limit")


def test_bytes_budget_sets_the_soft_limit_exactly(from_no_limit: dict[str, Any]) -> None:
    assert from_no_limit["before"] == [None, None], from_no_limit
    assert from_no_limit["inside"] == [16 * GIB, None], from_no_limit


def test_no_limit_is_restored_after_the_block(from_no_limit: dict[str, Any]) -> None:
    assert from_no_limit["after"] == [None, None], from_no_limit


def test_own_soft_limit_is_restored_after_the_block_not_lifted(
    from_own_limit: dict[str, Any],
) -> None:
    assert from_own_limit["before"] == [64 * GIB, 128 * GIB], from_own_limit
    assert from_own_limit["tighter"][0] == 16 * GIB, from_own_limit
    assert from_own_limit["after_tighter"] == [64 * GIB, 128 * GIB], from_own_limit


def test_hard_limit_is_left_as_it_was(from_own_limit: dict[str, Any]) -> None:
    hards = [from_own_limit[key][1] for key in ("tighter", "after_tighter", "looser")]
    assert hards == [128 * GIB] * 3, from_own_limit


def test_budget_larger_than_the_limit_in_force_does_not_loosen_it(
    from_own_limit: dict[str, Any],
) -> None:
    assert from_own_limit["looser"] == [64 * GIB, 128 * GIB], from_own_limit
    assert from_own_limit["after_looser"] == [64 * GIB, 128 * GIB], from_own_limit


def test_exception_inside_the_block_propagates_unchanged(
    from_no_limit: dict[str, Any], from_own_limit: dict[str, Any]
) -> None:
    for run in (from_no_limit["exception"], from_own_limit["exception"]):
        assert run["same_object"], run
        assert run["type"] == "_Marker", run
        assert run["message"] == "raised inside the budget", run
        assert run["context_is_none"], run
        assert run["cause_is_none"], run


def test_limit_is_restored_after_an_exception_inside_the_block(
    from_no_limit: dict[str, Any], from_own_limit: dict[str, Any]
) -> None:
    assert from_no_limit["exception"]["inside"] == [16 * GIB, None], from_no_limit
    assert from_no_limit["exception"]["after"] == [None, None], from_no_limit
    assert from_own_limit["exception"]["inside"] == [16 * GIB, 128 * GIB], from_own_limit
    assert from_own_limit["exception"]["after"] == [64 * GIB, 128 * GIB], from_own_limit


# ---------------------------------------------------------------------------
# A fraction of the memory available to the process


def _budget_json(budget: Any) -> dict[str, Any] | None:
    if budget is None:
        return None
    return {"device": str(budget.device), "bytes": budget.bytes, "fraction": budget.fraction}


def _child_fraction() -> dict[str, Any]:
    prepare_child()
    from torchmemguard import current_budget, memory_budget
    from torchmemguard._device import host

    capacity = host.capacity()
    before = _budget_json(current_budget())
    with memory_budget(0.5) as entered:
        inside = _rlimit()
        reported = _budget_json(current_budget())
    return {
        "capacity": capacity,
        "before": before,
        "entered": _budget_json(entered),
        "inside": inside,
        "reported": reported,
        "after": _budget_json(current_budget()),
        "after_limit": _rlimit(),
    }


@pytest.fixture(scope="module")
def fraction_run() -> dict[str, Any]:
    return run_child(f"{_HERE}:_child_fraction")


def test_fraction_budget_sets_the_soft_limit_to_that_fraction_of_capacity(
    fraction_run: dict[str, Any],
) -> None:
    assert fraction_run["inside"] == [fraction_run["capacity"] // 2, None], fraction_run


def test_current_budget_reports_the_fraction_budget_in_force(
    fraction_run: dict[str, Any],
) -> None:
    expected = fraction_run["capacity"] // 2
    for budget in (fraction_run["entered"], fraction_run["reported"]):
        assert budget is not None, fraction_run
        assert budget["device"] == "cpu", fraction_run
        assert budget["bytes"] == expected, fraction_run
        assert budget["fraction"] == pytest.approx(0.5, abs=1e-9), fraction_run


def test_current_budget_is_none_outside_any_budget(fraction_run: dict[str, Any]) -> None:
    assert fraction_run["before"] is None, fraction_run
    assert fraction_run["after"] is None, fraction_run
    assert fraction_run["after_limit"] == [None, None], fraction_run


# ---------------------------------------------------------------------------
# Nested blocks take the tightest cap


def _child_nesting() -> dict[str, Any]:
    prepare_child()
    from torchmemguard import memory_budget

    seen: dict[str, Any] = {}
    with memory_budget(bytes=20 * GIB):
        seen["outer"] = _rlimit()[0]
        with memory_budget(bytes=16 * GIB):
            seen["tighter_inner"] = _rlimit()[0]
        seen["after_tighter_inner"] = _rlimit()[0]
        with memory_budget(bytes=30 * GIB) as looser:
            seen["looser_inner"] = _rlimit()[0]
            seen["looser_inner_budget"] = looser.bytes
        seen["after_looser_inner"] = _rlimit()[0]
    seen["after_outer"] = _rlimit()[0]
    return seen


@pytest.fixture(scope="module")
def nesting_run() -> dict[str, Any]:
    return run_child(f"{_HERE}:_child_nesting")


def test_tighter_inner_block_caps_and_outer_cap_returns_after_it(
    nesting_run: dict[str, Any],
) -> None:
    assert nesting_run["outer"] == 20 * GIB, nesting_run
    assert nesting_run["tighter_inner"] == 16 * GIB, nesting_run
    assert nesting_run["after_tighter_inner"] == 20 * GIB, nesting_run


def test_looser_inner_block_keeps_the_outer_cap(nesting_run: dict[str, Any]) -> None:
    assert nesting_run["looser_inner"] == 20 * GIB, nesting_run
    assert nesting_run["looser_inner_budget"] == 20 * GIB, nesting_run
    assert nesting_run["after_looser_inner"] == 20 * GIB, nesting_run
    assert nesting_run["after_outer"] is None, nesting_run


# ---------------------------------------------------------------------------
# Blocks open in several threads at once


def _two_threads(first_to_close: int) -> dict[str, Any]:
    """Threads 0 (20 GiB) and 1 (16 GiB) open blocks together; ``first_to_close`` closes first."""
    import threading

    from torchmemguard import memory_budget

    caps = (20 * GIB, 16 * GIB)
    start = threading.Barrier(2, timeout=30)
    all_open = threading.Barrier(3, timeout=30)
    release = [threading.Event(), threading.Event()]
    errors: list[str] = []

    def hold(index: int) -> None:
        try:
            start.wait()
            with memory_budget(bytes=caps[index]):
                all_open.wait()
                if not release[index].wait(timeout=30):
                    raise TimeoutError(f"thread {index} was never released")
        except BaseException as exc:
            errors.append(f"thread {index}: {exc!r}")
            print(errors[-1], file=sys.stderr)
            all_open.abort()

    threads = [threading.Thread(target=hold, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    all_open.wait()
    both_open = _rlimit()[0]
    release[first_to_close].set()
    threads[first_to_close].join(timeout=30)
    one_open = _rlimit()[0]
    release[1 - first_to_close].set()
    threads[1 - first_to_close].join(timeout=30)
    return {"both_open": both_open, "one_open": one_open, "none_open": _rlimit(), "errors": errors}


def _child_threads() -> dict[str, Any]:
    prepare_child()
    return {"tighter_closes_first": _two_threads(1), "looser_closes_first": _two_threads(0)}


@pytest.fixture(scope="module")
def threads_run() -> dict[str, Any]:
    return run_child(f"{_HERE}:_child_threads")


def test_blocks_open_in_two_threads_take_the_tightest_cap(threads_run: dict[str, Any]) -> None:
    for run in threads_run.values():
        assert not run["errors"], threads_run
        assert run["both_open"] == 16 * GIB, threads_run


def test_cap_of_the_remaining_thread_applies_when_the_tighter_thread_closes(
    threads_run: dict[str, Any],
) -> None:
    run = threads_run["tighter_closes_first"]
    assert run["one_open"] == 20 * GIB, threads_run
    assert run["none_open"] == [None, None], threads_run


def test_tighter_cap_stays_when_the_looser_thread_closes_first(
    threads_run: dict[str, Any],
) -> None:
    run = threads_run["looser_closes_first"]
    assert run["one_open"] == 16 * GIB, threads_run
    assert run["none_open"] == [None, None], threads_run


# ---------------------------------------------------------------------------
# As a decorator: functions, coroutines, and a cancelled task


def _child_decorators() -> dict[str, Any]:
    prepare_child()
    import asyncio
    import contextlib

    from torchmemguard import memory_budget

    @memory_budget(bytes=16 * GIB)
    def sync_limit() -> Limits:
        return _rlimit()

    @memory_budget(bytes=12 * GIB)
    async def async_limit() -> Limits:
        await asyncio.sleep(0)
        return _rlimit()

    seen: dict[str, Any] = {"sync_inside": sync_limit(), "sync_after": _rlimit()}
    seen["async_inside"] = asyncio.run(async_limit())
    seen["async_after"] = _rlimit()

    @memory_budget(bytes=14 * GIB)
    async def wait_forever(entered: asyncio.Event) -> None:
        entered.set()
        await asyncio.Event().wait()

    async def cancel_inside() -> dict[str, Any]:
        entered = asyncio.Event()
        task = asyncio.create_task(wait_forever(entered))
        await asyncio.wait_for(entered.wait(), timeout=30)
        inside = _rlimit()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return {"inside": inside, "after": _rlimit(), "cancelled": task.cancelled()}

    seen["cancelled_task"] = asyncio.run(cancel_inside())
    return seen


@pytest.fixture(scope="module")
def decorators_run() -> dict[str, Any]:
    return run_child(f"{_HERE}:_child_decorators")


def test_decorated_function_runs_under_the_cap_and_restores_it(
    decorators_run: dict[str, Any],
) -> None:
    assert decorators_run["sync_inside"] == [16 * GIB, None], decorators_run
    assert decorators_run["sync_after"] == [None, None], decorators_run


def test_decorated_coroutine_runs_under_the_cap_and_restores_it(
    decorators_run: dict[str, Any],
) -> None:
    assert decorators_run["async_inside"] == [12 * GIB, None], decorators_run
    assert decorators_run["async_after"] == [None, None], decorators_run


def test_task_cancelled_inside_a_decorated_coroutine_restores_the_limit(
    decorators_run: dict[str, Any],
) -> None:
    run = decorators_run["cancelled_task"]
    assert run["cancelled"], decorators_run
    assert run["inside"] == [14 * GIB, None], decorators_run
    assert run["after"] == [None, None], decorators_run


# ---------------------------------------------------------------------------
# A cap below the current address space is refused


def _child_refused() -> dict[str, Any]:
    prepare_child()
    from torchmemguard import BudgetExceededError, memory_budget
    from torchmemguard._device import host

    space = host.address_space()
    assert space is not None
    cap = space - 64 * MIB
    before = _rlimit()
    error: dict[str, Any] | None = None
    try:
        with memory_budget(bytes=cap):
            pass
    except BudgetExceededError as exc:
        error = {"message": str(exc)}
    except BaseException as exc:
        error = {"unexpected": repr(exc)}
    return {"space": space, "cap": cap, "before": before, "after": _rlimit(), "error": error}


@pytest.fixture(scope="module")
def refused_run() -> dict[str, Any]:
    return run_child(f"{_HERE}:_child_refused")


def test_cap_below_the_address_space_raises_budget_exceeded_with_both_sizes(
    refused_run: dict[str, Any],
) -> None:
    error = refused_run["error"]
    assert error is not None, f"the cap was accepted: {refused_run}"
    assert "message" in error, f"not a BudgetExceededError: {refused_run}"
    numbers = re.search(r"\((\d+) < (\d+) bytes\)", error["message"])
    assert numbers, error
    cap, space = int(numbers[1]), int(numbers[2])
    assert cap == refused_run["cap"], error
    # The space was read again at entry: allow for what the child mapped in between.
    assert space > cap, error
    assert abs(space - refused_run["space"]) < 32 * MIB, refused_run


def test_refused_cap_leaves_the_limit_unchanged(refused_run: dict[str, Any]) -> None:
    assert refused_run["before"] == [None, None], refused_run
    assert refused_run["after"] == [None, None], refused_run


# ---------------------------------------------------------------------------
# @oom_safe inside a budget, on a model that meets real allocator errors

# (4096, 256) in, 4096 hidden: a chunk of c rows peaks at about c * 32 KiB (the
# hidden layer and its ReLU), so 1024 rows take 33 MiB, 2048 take 65 and the
# whole batch 129. The headroom leaves room for 1024-row chunks with a margin,
# and is far below what the whole batch needs.
_HEADROOM_MIB = 48
RTOL = 1e-5
ATOL = 1e-5


def _child_oom_safe(headroom_mib: int) -> dict[str, Any]:
    prepare_child()
    import gc

    import torch

    import torchmemguard
    from tests.realcap import describe_error

    model = torch.nn.Sequential(
        torch.nn.Linear(256, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 256)
    ).eval()

    @torchmemguard.oom_safe
    def infer(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = model(x)
        return out

    x = torch.randn(4096, 256)
    with torch.no_grad():
        reference = torch.cat([model(chunk) for chunk in x.split(512)])
    gc.collect()
    cap = vm_size() + headroom_mib * MIB
    unguarded_error = None
    with torch.no_grad(), torchmemguard.memory_budget(bytes=cap):
        inside = _rlimit()
        try:
            model(x)
        except RuntimeError as exc:
            unguarded_error = describe_error(exc)
        output = infer(x)
    stats = infer.oom_guard.stats  # type: ignore[attr-defined]
    return {
        "cap": cap,
        "inside": inside,
        "after": _rlimit(),
        "unguarded_error": unguarded_error,
        "allclose": torch.allclose(output, reference, rtol=RTOL, atol=ATOL),
        "max_abs_diff": (output - reference).abs().max().item(),
        "shape": list(output.shape),
        "ooms": stats.ooms,
        "split_calls": stats.split_calls,
    }


@pytest.fixture(scope="module")
def oom_safe_run() -> dict[str, Any]:
    return run_child(f"{_HERE}:_child_oom_safe", _HEADROOM_MIB)


def test_budget_makes_the_unguarded_full_batch_fail_with_a_real_allocator_oom(
    oom_safe_run: dict[str, Any],
) -> None:
    assert oom_safe_run["inside"][0] == oom_safe_run["cap"], oom_safe_run
    error = oom_safe_run["unguarded_error"]
    assert error is not None, f"the full batch fitted in the budget: {oom_safe_run}"
    assert "DefaultCPUAllocator: can't allocate memory" in error["message"], error
    assert error["is_oom"], error


def test_oom_safe_call_in_a_budget_returns_the_reference_after_real_ooms(
    oom_safe_run: dict[str, Any],
) -> None:
    assert oom_safe_run["ooms"] >= 1, f"no OOM was caught: {oom_safe_run}"
    assert oom_safe_run["split_calls"] == 1, oom_safe_run
    assert oom_safe_run["shape"] == [4096, 256], oom_safe_run
    assert oom_safe_run["allclose"], f"output differs from the reference: {oom_safe_run}"


def test_limit_is_restored_after_the_oom_safe_budget(oom_safe_run: dict[str, Any]) -> None:
    assert oom_safe_run["after"] == [None, None], oom_safe_run
