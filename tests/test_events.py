"""The events a run reports: through the small Events interface, to counters and metrics."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

import torchmemguard
from tests.conftest import ChunkLimit, rows
from torchmemguard._events import GuardEvents
from torchmemguard._guarded import Guard
from torchmemguard._options import Options


class Recorded:
    """An Events implementation that only records what it is told."""

    name = "fake"

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def oom(self, device: torch.device | None) -> None:
        self.seen.append(("oom", device))

    def retry(self, device: torch.device | None) -> None:
        self.seen.append(("retry", device))

    def split(self, device: torch.device | None, owner: object) -> None:
        self.seen.append(("split", device, owner))

    def merged(self, device: torch.device | None, largest: int) -> None:
        self.seen.append(("merged", device, largest))

    def unrecovered(self, device: torch.device | None) -> None:
        self.seen.append(("unrecovered", device))

    def refused(self, refusal: tuple[str, str]) -> None:
        self.seen.append(("refused", refusal))


def drive(fn: ChunkLimit, x: torch.Tensor, events: Recorded, **options: Any) -> Any:
    """Call ``fn(x)`` under a guard whose runs report to ``events`` alone."""
    guard = Guard(fn, Options.of("test", options))
    guard.events = events  # type: ignore[assignment]
    return guard.call(fn, None, (x,), {})


def test_a_split_call_reports_each_event_in_order() -> None:
    events = Recorded()
    out = drive(ChunkLimit(2), rows(4), events)
    cuda = torch.device("cuda")  # the device the OOM's message names
    assert torch.equal(out, rows(4) * 2 + 1)
    assert events.seen == [
        ("oom", cuda),
        ("retry", cuda),
        ("split", cuda, None),
        ("merged", cuda, 2),
    ]


def test_a_run_that_gives_up_reports_unrecovered() -> None:
    events = Recorded()
    with pytest.raises(torchmemguard.OutOfMemoryError):
        drive(ChunkLimit(0), rows(2), events)
    assert [event[0] for event in events.seen] == [
        "oom", "retry", "split", "oom", "retry", "oom", "unrecovered",
    ]  # fmt: skip


def test_a_call_that_fits_reports_nothing() -> None:
    events = Recorded()
    drive(ChunkLimit(8), rows(4), events)
    assert events.seen == []


def test_guard_events_count_into_the_stats_and_the_metrics() -> None:
    registry = CollectorRegistry()
    torchmemguard.install_metrics(registry)
    learned: list[tuple[str, str]] = []
    events = GuardEvents("counted", learned.append)
    cuda = torch.device("cuda:0")
    events.oom(cuda)
    events.retry(cuda)
    events.split(cuda, None)
    events.unrecovered(cuda)
    events.merged(cuda, 7)
    events.refused(("why", "what to do"))
    assert (events.stats.ooms, events.stats.retries) == (1, 1)
    assert (events.stats.split_calls, events.stats.unrecovered) == (1, 1)
    labels = {"function": "counted", "device": "cuda:0"}
    for name in ("oom", "retries", "split_calls", "unrecovered"):
        assert registry.get_sample_value(f"torchmemguard_{name}_total", labels) == 1
    assert registry.get_sample_value("torchmemguard_chunk_size", labels) == 7
    assert learned == [("why", "what to do")]
