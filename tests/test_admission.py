"""Admission: sizes in while they fit, in arrival order, and what leaving the queue gives back."""

from __future__ import annotations

import asyncio

from torchmemguard._serving.admission import Admission


def test_size_larger_than_the_allowance_takes_all_of_it() -> None:
    assert Admission(10).share(30) == 10
    assert Admission(10).share(3) == 3


def test_request_cancelled_while_waiting_lets_the_next_one_in() -> None:
    async def run() -> tuple[int, bool]:
        admission = Admission(10)
        assert await admission.acquire(6, timeout=1)
        large = asyncio.create_task(admission.acquire(8, timeout=5))
        small = asyncio.create_task(admission.acquire(4, timeout=5))
        await asyncio.sleep(0.01)
        assert not small.done(), "the small request overtook the large one"
        large.cancel()
        admitted = await asyncio.wait_for(small, 1)
        return admission.in_flight, admitted

    assert asyncio.run(run()) == (10, True)


def test_timed_out_request_takes_nothing() -> None:
    async def run() -> tuple[bool, int]:
        admission = Admission(10)
        assert await admission.acquire(6, timeout=1)
        admitted = await admission.acquire(5, timeout=0.01)
        admission.release(6)
        return admitted, admission.in_flight

    assert asyncio.run(run()) == (False, 0)
