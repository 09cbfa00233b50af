"""record_oom_snapshots on real CUDA: an unrecovered OOM leaves one allocator snapshot."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

import torchmemguard
from tests.gpu.models import MIB, batch, headroom_cap, postmortems


@torchmemguard.oom_safe
def needs_64_mib_per_sample(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[0], 64 * MIB, dtype=torch.uint8, device=x.device)


def _fail_unrecovered() -> dict[str, Any]:
    """One call whose single sample does not fit under its cap: its post-mortem."""
    x = batch(4)  # made before the cap
    with (
        postmortems() as records,
        torchmemguard.memory_budget(bytes=headroom_cap(16)),
        pytest.raises(torchmemguard.OutOfMemoryError),
    ):
        needs_64_mib_per_sample(x)
    (record,) = records
    return record


def test_an_unrecovered_oom_writes_one_snapshot_that_holds_the_oom() -> None:
    with (
        tempfile.TemporaryDirectory() as directory,
        torchmemguard.record_oom_snapshots(directory) as recorder,
    ):
        assert recorder.kind == "cuda"
        record = _fail_unrecovered()
        files = list(Path(directory).iterdir())
        assert [str(path) for path in files] == [record["snapshot"]]
        with files[0].open("rb") as f:
            snapshot = pickle.load(f)
    assert isinstance(snapshot, dict)
    assert snapshot["segments"]  # at least the one that holds the batch
    assert all("total_size" in segment for segment in snapshot["segments"])
    # The history was recorded: the allocator's OOMs are in it, with their size.
    ooms = [
        entry for trace in snapshot["device_traces"] for entry in trace if entry["action"] == "oom"
    ]
    assert ooms, sorted({entry["action"] for trace in snapshot["device_traces"] for entry in trace})
    assert all(entry["size"] >= 64 * MIB for entry in ooms)


def test_keep_bounds_the_snapshots_and_stopping_writes_no_more() -> None:
    with tempfile.TemporaryDirectory() as directory:
        with torchmemguard.record_oom_snapshots(directory, keep=2) as recorder:
            written = [_fail_unrecovered()["snapshot"] for _ in range(3)]
            assert None not in written
            assert sorted(str(path) for path in Path(directory).iterdir()) == sorted(written[1:])
            assert recorder.snapshots() == [Path(path) for path in written[1:]]
        assert not recorder.recording
        assert _fail_unrecovered()["snapshot"] is None
        assert sorted(str(path) for path in Path(directory).iterdir()) == sorted(written[1:])
        # Recording starts again once stopped.
        with torchmemguard.record_oom_snapshots(directory, keep=2):
            assert _fail_unrecovered()["snapshot"] is not None
        assert len(list(Path(directory).iterdir())) == 2
