"""The events a run reports: through the small Events interface, to counters and metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

import torchmemguard
from tests.conftest import ChunkLimit, Recorded, rows
from torchmemguard._events import GuardEvents
from torchmemguard._guarded import Guard
from torchmemguard._options import Options


def drive(
    fn: Callable[[torch.Tensor], Any], x: torch.Tensor, events: Recorded, **options: Any
) -> Any:
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
        ("split", cuda),
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
    events = GuardEvents("counted")
    cuda = torch.device("cuda:0")
    events.oom(cuda)
    events.retry(cuda)
    events.split(cuda)
    events.unrecovered(cuda)
    events.merged(cuda, 7)
    assert (events.stats.ooms, events.stats.retries) == (1, 1)
    assert (events.stats.split_calls, events.stats.unrecovered) == (1, 1)
    labels = {"function": "counted", "device": "cuda:0"}
    for name in ("oom", "retries", "split_calls", "unrecovered"):
        assert registry.get_sample_value(f"torchmemguard_{name}_total", labels) == 1
    assert registry.get_sample_value("torchmemguard_chunk_size", labels) == 7


def test_events_that_only_record_leave_what_calls_do_unchanged() -> None:
    # Rows that depend on each other: the run refuses the callable, whatever the
    # events do with what they are told.
    def centred(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return x - x.mean(0)

    guard = Guard(centred, Options.of("test", {}))
    guard.events = Recorded()  # type: ignore[assignment]
    with pytest.raises(torchmemguard.SplitRefusedError):
        guard.call(centred, None, (rows(4),), {})
    assert guard.refusal is not None
    assert "depend on each other" in guard.refusal[0]
    assert guard.memory.learned() == {}  # calls run whole from now on
