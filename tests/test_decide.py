"""The decision core on its own, driven with a fake device layer and recorded events."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from tests.conftest import Recorded
from torchmemguard import _decide as decide
from torchmemguard._decide import GiveUp, Progress
from torchmemguard._fitting import CallShape
from torchmemguard._sizing import SizeMemory

CUDA1 = torch.device("cuda:1")
SHAPE = CallShape(64, ("key",), "group", 512)


class FakeDevices:
    """A device layer that records what it is asked, with a recovery count per device."""

    def __init__(self, measurable: bool = False) -> None:
        self.generations: dict[Any, int] = {}
        self.recovered: list[tuple[Any, int, bool]] = []
        self._measurable = measurable

    def recoveries(self, device: torch.device | None) -> int:
        return self.generations.get(device, 0)

    def recover(self, device: torch.device | None, seen: int, collect: bool) -> None:
        self.recovered.append((device, seen, collect))
        self.generations[device] = self.generations.get(device, 0) + 1

    def measurable(self, device: torch.device | None) -> bool:
        return self._measurable

    def describe(self, device: torch.device | None) -> str:
        return f"{device} is full"


def ran_out(progress: Progress, events: Recorded, message: str = "CUDA out of memory.") -> None:
    decide.noted(progress, torch.OutOfMemoryError(message), events)


def test_an_oom_that_names_no_index_is_recovered_on_the_batch_s_device() -> None:
    progress, events, devices = Progress(64, 64, CUDA1), Recorded(), FakeDevices()
    ran_out(progress, events)
    assert (progress.ran_out, progress.ooms) == (CUDA1, 1)
    progress.pending = devices.recoveries(progress.ran_out)
    decide.recover(progress, SizeMemory(), SHAPE, events, devices, min_chunk=1)
    assert devices.recovered == [(CUDA1, 0, False)]
    assert events.seen == [("oom", CUDA1), ("retry", CUDA1)]
    decide.recover(progress, SizeMemory(), SHAPE, events, devices, min_chunk=1)
    assert len(devices.recovered) == 1  # nothing pending: nothing recovered again


def test_a_failure_halves_through_the_size_memory_until_the_smallest_gets_a_last_try() -> None:
    memory, progress, events = SizeMemory(), Progress(4, 4), Recorded()
    sizes = []
    stop = None
    while stop is None:
        size = progress.chunk
        sizes.append(size)
        ran_out(progress, events)
        smaller = decide.shrunk(memory, SHAPE, size, min_chunk=1)
        stop = decide.verdict(progress, size, smaller, max_retries=16)
    assert sizes == [4, 2, 1, 1]
    assert stop == GiveUp("even the smallest chunk ran out of memory")
    assert (progress.smallest, progress.collected) == (1, True)


def test_too_many_errors_give_up_with_their_count() -> None:
    progress = Progress(64, 64)
    progress.ooms = 4
    assert decide.verdict(progress, 64, 32, max_retries=3) == GiveUp(
        "gave up after 4 out-of-memory errors"
    )


def test_the_last_try_is_recovered_with_a_full_collection() -> None:
    progress, events, devices = Progress(1, 1, CUDA1), Recorded(), FakeDevices()
    ran_out(progress, events)
    assert decide.verdict(progress, 1, 1, max_retries=16) is None
    progress.pending = devices.recoveries(progress.ran_out)
    decide.recover(progress, SizeMemory(), SHAPE, events, devices, min_chunk=1)
    assert devices.recovered == [(CUDA1, 0, True)]


def test_a_measurable_device_gets_a_probe_chunk_after_the_first_failure() -> None:
    memory = SizeMemory(room=lambda device: 100 * 2**20)
    progress, events, devices = Progress(64, 64, CUDA1), Recorded(), FakeDevices(measurable=True)
    ran_out(progress, events)
    decide.verdict(progress, 64, decide.shrunk(memory, SHAPE, 64, 1), max_retries=16)
    progress.pending = 0
    decide.recover(progress, memory, SHAPE, events, devices, min_chunk=1)
    assert progress.chunk == 4  # a 16th of the 64 that failed
    decide.recover(progress, memory, SHAPE, events, FakeDevices(measurable=False), min_chunk=1)
    assert progress.chunk == 4


def test_a_chunk_that_failed_in_the_call_is_never_tried_again() -> None:
    memory, progress, events = SizeMemory(), Progress(64, 64), Recorded()
    ran_out(progress, events)
    decide.verdict(progress, 64, decide.shrunk(memory, SHAPE, 64, 1), max_retries=16)
    memory.entries[SHAPE.key].limit = 100  # as if another thread had raised the shared limit
    decide.fitted(progress, memory, SHAPE, 32, None, min_chunk=1)
    assert progress.chunk == 63


def test_a_call_that_gives_up_is_reported_once_with_its_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    progress, events = Progress(8, 8, CUDA1), Recorded()
    ran_out(progress, events)
    progress.smallest = 2
    with caplog.at_level(logging.ERROR, logger="torchmemguard"):
        message = decide.unrecovered(
            "step", progress, CUDA1, SizeMemory(), events, FakeDevices(), "why"
        )
    assert message == "step ran out of memory on cuda:1: why. Memory: cuda:1 is full."
    assert events.seen[-1] == ("unrecovered", CUDA1)
    (record,) = [r.torchmemguard_postmortem for r in caplog.records]  # type: ignore[attr-defined]
    assert record["batch"] == {"size": 8, "smallest_chunk": 2, "ooms": 1}
