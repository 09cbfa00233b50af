"""The post-mortem of an unrecovered out-of-memory error: one structured log record."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

import torchmemguard
from tests.conftest import ChunkLimit, rows
from tests.training_models import Scarce, batch, net


def postmortems(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [
        record.torchmemguard_postmortem  # type: ignore[attr-defined]
        for record in caplog.records
        if hasattr(record, "torchmemguard_postmortem")
    ]


def test_an_unrecovered_call_logs_one_record_with_its_batch_and_memory(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guarded = torchmemguard.oom_safe(ChunkLimit(16, "DefaultCPUAllocator: can't allocate memory"))
    guarded(rows(64))  # learns 16
    ooms_before = guarded.oom_guard.stats.ooms  # type: ignore[attr-defined]
    caplog.clear()
    guarded.__wrapped__.limit = 0  # type: ignore[attr-defined]  # nothing fits any more
    with (
        caplog.at_level(logging.ERROR, logger="torchmemguard"),
        pytest.raises(torchmemguard.OutOfMemoryError),
    ):
        guarded(rows(8))
    found = postmortems(caplog)
    assert len(found) == 1
    record = found[0]
    assert record["event"] == "torchmemguard.unrecovered_oom"
    assert record["function"] == "ChunkLimit"
    assert record["device"] == "cpu"
    assert record["batch"] == {
        "size": 8,
        "smallest_chunk": 1,
        "ooms": guarded.oom_guard.stats.ooms - ooms_before,
    }  # type: ignore[attr-defined]
    assert list(record["learned"].values()) == [1]  # type: ignore[attr-defined]
    memory = record["memory"]
    assert memory["device"] == "cpu"  # type: ignore[index]
    assert memory["reserved"] > 0  # type: ignore[index]  # the address space
    assert "VmRSS" in memory["status"]  # type: ignore[index]
    # The message holds the same record, as JSON.
    message = caplog.records[-1].getMessage()
    assert json.loads(message.removeprefix("torchmemguard post-mortem: "))["batch"]["size"] == 8


def test_a_call_that_recovers_logs_no_post_mortem(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="torchmemguard"):
        torchmemguard.oom_safe(ChunkLimit(16))(rows(64))
    assert postmortems(caplog) == []


def fail_a_training_step(caplog: pytest.LogCaptureFixture) -> dict[str, object]:
    """Run a training step whose every backward runs out of memory; its post-mortem."""
    model = net(scarce=Scarce(0, "backward"))
    model.norm.eval()
    step = torchmemguard.accumulate_gradients(model, lambda x, y: F.cross_entropy(model(x), y))
    with (
        caplog.at_level(logging.ERROR, logger="torchmemguard"),
        pytest.raises(torchmemguard.OutOfMemoryError),
    ):
        step(*batch(8))
    (record,) = postmortems(caplog)
    return record


def test_a_training_step_that_cannot_fit_logs_its_post_mortem(
    caplog: pytest.LogCaptureFixture,
) -> None:
    record = fail_a_training_step(caplog)
    assert record["batch"] == {"size": 8, "smallest_chunk": 1, "ooms": 5}
    assert record["device"] == "cuda"  # the device the injected error names


def test_the_memory_summary_of_an_unread_device_says_so() -> None:
    from torchmemguard import _device as device

    assert device.summary(torch.device("meta"))["unavailable"]
