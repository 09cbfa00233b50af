"""Memory kept by a guarded function's calls: leaks found by name, one-off growth ignored."""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

import torchmemguard
from torchmemguard._device import malloc
from torchmemguard._observability import retention

MIB = 2**20
ROWS = MIB // 4  # float32 values in one MiB

pytestmark = pytest.mark.skipif(not malloc.readable(), reason="needs glibc's mallinfo2")


@pytest.fixture
def every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every call after the first is sampled: no period to wait for."""
    monkeypatch.setattr(retention, "PERIOD_S", 0.0)
    monkeypatch.setattr(retention, "FIRST_SAMPLE", 2)


def retained(registry: CollectorRegistry, function: str) -> float | None:
    value = registry.get_sample_value(
        "torchmemguard_retained_bytes", {"function": function, "device": "cpu"}
    )
    return value


def test_a_function_that_keeps_its_outputs_is_named_and_one_that_does_not_is_not(
    every_call: None, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    torchmemguard.install_metrics(registry)
    kept: list[torch.Tensor] = []
    cache: dict[int, torch.Tensor] = {}

    @torchmemguard.oom_safe
    def keeps(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        kept.append(y.clone())  # one MiB more with every call
        return y

    @torchmemguard.oom_safe
    def fills_once(x: torch.Tensor) -> torch.Tensor:
        # A warm-up and a cache that fills over the first calls, then stays; and
        # outputs that the caller keeps, of every size: none of it is a leak.
        if len(cache) < 4:
            cache[len(cache)] = torch.ones(ROWS)
        return x * 2

    batch = torch.randn(ROWS)
    outputs = []
    with caplog.at_level(logging.WARNING, logger="torchmemguard"):
        for call in range(80):
            keeps(batch)
            outputs.append(fills_once(torch.randn(ROWS * (1 + call % 3))))

    warnings = [r.getMessage() for r in caplog.records if "keeps memory" in r.getMessage()]
    assert len(warnings) == 1
    leaking = keeps.oom_guard.name  # type: ignore[attr-defined]
    assert warnings[0].startswith(f"{leaking} keeps memory after its calls return: about 1 MiB")
    # Every call but the first was sampled, each one keeping a MiB and some bytes.
    assert retained(registry, leaking) == pytest.approx(79 * MIB, rel=0.01)
    # The four blocks the cache took, from the second call on: three of them sampled.
    assert retained(registry, fills_once.oom_guard.name) == pytest.approx(3 * MIB, rel=0.01)  # type: ignore[attr-defined]


def test_an_output_made_by_the_call_or_passed_through_is_not_kept(every_call: None) -> None:
    registry = CollectorRegistry()
    torchmemguard.install_metrics(registry)

    @dataclasses.dataclass
    class Output:
        logits: torch.Tensor

    @torchmemguard.oom_safe
    def fresh(x: torch.Tensor) -> dict[str, Any]:
        return {"out": [x + 1, (x * 3)[: len(x) // 2]], "same": x, "model": Output(x - 1)}

    batch = torch.randn(ROWS)
    held = [fresh(batch) for _ in range(40)]  # the caller keeps every output
    assert len(held) == 40
    assert retained(registry, fresh.oom_guard.name) == 0  # type: ignore[attr-defined]


def test_steady_needs_a_full_window_mostly_rising_in_every_quarter() -> None:
    window, quarter = retention.WINDOW, retention.WINDOW // 4

    def steady(values: list[int]) -> bool:
        return retention._steady(collections.deque(values, maxlen=window))

    assert steady([MIB] * window)
    assert not steady([MIB] * (window - 1))
    # A rise that stopped: the last quarter kept nothing.
    assert not steady([MIB] * (window - quarter) + [0] * quarter)
    # Three in four rising, spread over the window: a leak among noise.
    assert steady([MIB, MIB, MIB, 0] * quarter)
    assert not steady([MIB, MIB, 0, 0] * quarter)
    # Rising in most samples but giving more back in one quarter.
    assert not steady([MIB] * (window - quarter) + [-8 * MIB] + [MIB] * (quarter - 1))


def test_samples_come_about_once_a_period_whatever_the_rate_of_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [0.0]
    monkeypatch.setattr(retention.time, "monotonic", lambda: clock[0])
    sampled = []
    begin = retention.Retention.begin

    def recorded(self: retention.Retention, *args: Any) -> retention.Sample | None:
        sampled.append(call)
        return begin(self, *args)

    monkeypatch.setattr(retention.Retention, "begin", recorded)

    @torchmemguard.oom_safe
    def fn(x: torch.Tensor) -> torch.Tensor:
        return x

    batch = torch.zeros(4)
    for call in range(1, 600):
        clock[0] += 0.01 if call <= 400 else 0.1
        fn(batch)
    # The first at FIRST_SAMPLE; the count of calls between samples doubles while
    # they come less than half a period apart, and halves once they come more
    # than two periods apart (from call 400, ten times slower).
    assert sampled == [
        8,
        9,
        11,
        15,
        23,
        39,
        71,
        135,
        199,
        263,
        327,
        391,
        455,
        487,
        503,
        519,
        535,
        551,
        567,
        583,
        599,
    ]
