"""Allocator snapshots of unrecovered OOMs: opt in, one file per failure, a bounded directory.

CUDA is a stand-in (``fake_cuda``) whose allocator history is recorded by a fake
of ``torch.cuda.memory``: its dump pickles a snapshot into the real file system,
so that naming, writing and pruning run for real.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import torchmemguard
from torchmemguard._observability import snapshots

from .conftest import ChunkLimit, FakeCuda, rows
from .test_postmortem import fail_a_training_step, postmortems

CUDA_OOM = "CUDA out of memory."
CPU_OOM = "DefaultCPUAllocator: can't allocate memory"
NAME = re.compile(r"torchmemguard-oom-\d{8}T\d{6}\.\d{6}Z-pid(\d+)-([\w.]+)-\d+\.pickle")


class FakeHistory:
    """Stands in for ``torch.cuda.memory``'s history recording and snapshot dump.

    The dump pickles a snapshot of the recorded state into the file it is given,
    as torch's does; ``fail`` makes it write half a file, then raise.
    """

    def __init__(self) -> None:
        self.recorded: list[dict[str, Any]] = []
        self.fail: OSError | None = None

    @property
    def recording(self) -> bool:
        return bool(self.recorded) and self.recorded[-1]["enabled"] is not None

    def record(self, enabled: str | None = "all", **options: Any) -> None:
        self.recorded.append({"enabled": enabled, **options})

    def dump(self, filename: str) -> None:
        assert self.recording, "a snapshot without a recorded history"
        with open(filename, "wb") as f:
            if self.fail is not None:
                f.write(b"\x80\x04half a snapsh")
                raise self.fail
            pickle.dump({"segments": [{"total_size": 2**20}], "device_traces": [[]]}, f)


@pytest.fixture
def history(fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch) -> FakeHistory:
    fake = FakeHistory()
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", fake.record)
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", fake.dump)
    return fake


@pytest.fixture(autouse=True)
def _no_recording_left(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that fails half-way does not leave its recording to the next one
    (torch's own recording was never on: ``history`` stands in for it)."""
    monkeypatch.setattr(snapshots, "_active", None)


def fail_unrecovered(message: str = CUDA_OOM) -> None:
    """One guarded call that cannot fit, whatever the chunk."""
    with pytest.raises(torchmemguard.OutOfMemoryError):
        torchmemguard.oom_safe(max_retries=2)(ChunkLimit(0, message))(rows(4))


def snapshot_of_one_failure(caplog: pytest.LogCaptureFixture, message: str = CUDA_OOM) -> Any:
    """The ``snapshot`` field of the post-mortem of one unrecovered call."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="torchmemguard"):
        fail_unrecovered(message)
    (record,) = postmortems(caplog)
    return record["snapshot"]


# ---------------------------------------------------------------------------
# Recording


def test_enabling_records_the_history_with_python_stacks_and_bounded_entries(
    history: FakeHistory, tmp_path: Path
) -> None:
    recorder = torchmemguard.record_oom_snapshots(tmp_path, max_entries=1000)
    assert history.recorded == [
        {"enabled": "all", "context": "all", "stacks": "python", "max_entries": 1000}
    ]
    assert recorder.recording
    assert recorder.kind == "cuda"
    assert recorder.directory == tmp_path


def test_the_directory_is_created_when_recording_starts(
    history: FakeHistory, tmp_path: Path
) -> None:
    torchmemguard.record_oom_snapshots(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()


def test_a_relative_directory_stays_where_it_was_given(
    history: FakeHistory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    recorder = torchmemguard.record_oom_snapshots("snapshots")
    monkeypatch.chdir(tmp_path.parent)
    assert recorder.directory == tmp_path / "snapshots"


# ---------------------------------------------------------------------------
# One snapshot per unrecovered OOM, named in the post-mortem


def test_an_unrecovered_cuda_oom_writes_one_snapshot_named_in_the_post_mortem(
    history: FakeHistory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torchmemguard.record_oom_snapshots(tmp_path)
    path = Path(snapshot_of_one_failure(caplog))
    assert list(tmp_path.iterdir()) == [path]
    match = NAME.fullmatch(path.name)
    assert match is not None, path.name
    assert match.groups() == (str(os.getpid()), "ChunkLimit")
    with path.open("rb") as f:
        assert pickle.load(f)["segments"] == [{"total_size": 2**20}]


def test_a_call_that_recovers_writes_no_snapshot(history: FakeHistory, tmp_path: Path) -> None:
    torchmemguard.record_oom_snapshots(tmp_path)
    torchmemguard.oom_safe(ChunkLimit(16, CUDA_OOM))(rows(64))
    assert list(tmp_path.iterdir()) == []


def test_an_unrecovered_oom_on_the_cpu_writes_no_snapshot(
    history: FakeHistory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torchmemguard.record_oom_snapshots(tmp_path)
    assert snapshot_of_one_failure(caplog, CPU_OOM) is None
    assert list(tmp_path.iterdir()) == []


def test_without_a_recording_the_post_mortem_names_no_snapshot(
    history: FakeHistory, caplog: pytest.LogCaptureFixture
) -> None:
    assert snapshot_of_one_failure(caplog) is None


def test_a_training_step_that_cannot_fit_writes_a_snapshot(
    history: FakeHistory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torchmemguard.record_oom_snapshots(tmp_path)
    record = fail_a_training_step(caplog)
    assert list(tmp_path.iterdir()) == [Path(record["snapshot"])]  # type: ignore[arg-type]


def test_a_function_name_becomes_a_file_name_inside_the_directory(
    history: FakeHistory, tmp_path: Path
) -> None:
    torchmemguard.record_oom_snapshots(tmp_path)
    found = snapshots.take("../up/<lambda> é", torch.device("cuda:1"))
    assert found is not None
    path = Path(found)
    assert path.parent == tmp_path
    match = NAME.fullmatch(path.name)
    assert match is not None, path.name
    assert match.group(2) == ".._up_lambda_"


# ---------------------------------------------------------------------------
# A bounded directory


def test_keep_bounds_the_snapshots_to_the_newest(
    history: FakeHistory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = torchmemguard.record_oom_snapshots(tmp_path, keep=2)
    written = [Path(snapshot_of_one_failure(caplog)) for _ in range(4)]
    assert sorted(tmp_path.iterdir()) == sorted(written[2:])
    assert recorder.snapshots() == written[2:]


def test_older_snapshots_of_other_processes_count_towards_keep(
    history: FakeHistory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = tmp_path / "torchmemguard-oom-20200101T000000.000000Z-pid1-forward-0.pickle"
    newer = tmp_path / "torchmemguard-oom-20200101T000000.000001Z-pid2-forward-0.pickle"
    old.write_bytes(b"old")
    newer.write_bytes(b"newer")
    torchmemguard.record_oom_snapshots(tmp_path, keep=2)
    written = Path(snapshot_of_one_failure(caplog))
    assert sorted(tmp_path.iterdir()) == sorted([newer, written])


def test_files_that_are_not_snapshots_are_never_removed(
    history: FakeHistory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    others = [
        tmp_path / "notes.txt",
        tmp_path / "torchmemguard-oom-notes.pickle",
        tmp_path / "torchmemguard-oom-20200101T000000.000000Z-pid1-forward-0.pickle.bak",
        tmp_path / "my-snapshot.pickle",
    ]
    for other in others:
        other.write_bytes(b"keep me")
    kept_dir = tmp_path / "torchmemguard-oom-20200101T000000.000000Z-pid1-forward-1.pickle"
    kept_dir.mkdir()  # a directory by that name is not a snapshot file
    torchmemguard.record_oom_snapshots(tmp_path, keep=1)
    newest = [Path(snapshot_of_one_failure(caplog)) for _ in range(3)][-1]
    assert sorted(tmp_path.iterdir()) == sorted([*others, kept_dir, newest])
    assert all(other.read_bytes() == b"keep me" for other in others)


# ---------------------------------------------------------------------------
# A snapshot that cannot be written never hides the OOM


def test_a_snapshot_that_cannot_be_written_is_a_warning_and_the_oom_is_still_raised(
    history: FakeHistory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torchmemguard.record_oom_snapshots(tmp_path)
    history.fail = OSError(errno.ENOSPC, "No space left on device")
    with (
        caplog.at_level(logging.WARNING, logger="torchmemguard"),
        pytest.raises(torchmemguard.OutOfMemoryError, match="ran out of memory on cuda") as info,
    ):
        torchmemguard.oom_safe(max_retries=2)(ChunkLimit(0, CUDA_OOM))(rows(4))
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    (record,) = postmortems(caplog)
    assert record["snapshot"] is None
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "could not write the allocator snapshot of ChunkLimit" in warning.getMessage()
    assert "No space left on device" in warning.getMessage()
    assert list(tmp_path.iterdir()) == []  # the half-written file is gone too


def test_a_directory_that_became_a_file_is_a_warning(
    history: FakeHistory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "snapshots"
    torchmemguard.record_oom_snapshots(directory)
    shutil.rmtree(directory)
    directory.write_bytes(b"in the way")
    assert snapshot_of_one_failure(caplog) is None
    assert any("could not write" in r.getMessage() for r in caplog.records)
    assert directory.read_bytes() == b"in the way"


def test_a_directory_removed_while_recording_is_created_again(
    history: FakeHistory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "snapshots"
    torchmemguard.record_oom_snapshots(directory)
    directory.rmdir()
    assert Path(snapshot_of_one_failure(caplog)).parent == directory


# ---------------------------------------------------------------------------
# Turning it off


def test_stopping_turns_the_history_off_and_writes_no_more_snapshots(
    history: FakeHistory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = torchmemguard.record_oom_snapshots(tmp_path)
    first = Path(snapshot_of_one_failure(caplog))
    recorder.stop()
    assert history.recorded[-1] == {"enabled": None}
    assert not recorder.recording
    assert snapshot_of_one_failure(caplog) is None
    assert list(tmp_path.iterdir()) == [first]  # what was written stays


def test_stopping_twice_turns_the_history_off_once(history: FakeHistory, tmp_path: Path) -> None:
    recorder = torchmemguard.record_oom_snapshots(tmp_path)
    recorder.stop()
    recorder.stop()
    assert [call["enabled"] for call in history.recorded] == ["all", None]


def test_a_with_block_stops_the_recording_at_its_end(
    history: FakeHistory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with torchmemguard.record_oom_snapshots(tmp_path) as recorder:
        assert snapshot_of_one_failure(caplog) is not None
    assert not recorder.recording
    assert not history.recording


def test_a_second_recording_is_refused_while_the_first_is_under_way(
    history: FakeHistory, tmp_path: Path
) -> None:
    first = torchmemguard.record_oom_snapshots(tmp_path / "first")
    with pytest.raises(RuntimeError, match=r"already recorded into .*first.*stop that"):
        torchmemguard.record_oom_snapshots(tmp_path / "second")
    assert first.recording
    assert len(history.recorded) == 1


def test_stopping_an_old_recording_leaves_the_new_one_alone(
    history: FakeHistory, tmp_path: Path
) -> None:
    old = torchmemguard.record_oom_snapshots(tmp_path)
    old.stop()
    new = torchmemguard.record_oom_snapshots(tmp_path)
    old.stop()
    assert new.recording
    assert history.recording


# ---------------------------------------------------------------------------
# Bad arguments, and devices without a history


def test_every_argument_of_the_wrong_type_is_named_at_once(
    history: FakeHistory,
) -> None:
    with pytest.raises(TypeError) as info:
        torchmemguard.record_oom_snapshots(
            3,  # type: ignore[arg-type]
            keep=2.5,  # type: ignore[arg-type]
            max_entries=True,
            device=[0],  # type: ignore[arg-type]
        )
    assert str(info.value) == (
        "directory must be a path, got 3; keep must be an int, got 2.5; "
        "max_entries must be an int, got True; "
        "device must be a device, its name or None, got [0]"
    )
    assert not history.recorded


def test_every_value_out_of_range_is_named_at_once(history: FakeHistory, tmp_path: Path) -> None:
    in_the_way = tmp_path / "file"
    in_the_way.write_text("")
    with pytest.raises(ValueError, match="exists and is not a directory") as info:
        torchmemguard.record_oom_snapshots(in_the_way, keep=0, max_entries=-1, device="cuda:7")
    assert str(info.value) == (
        f"directory={str(in_the_way)!r} exists and is not a directory; "
        "keep must be at least 1, got 0; max_entries must be at least 1, got -1; "
        "device='cuda:7' does not exist: this machine has 2 CUDA devices"
    )
    assert not history.recorded


def test_bad_arguments_create_no_directory(history: FakeHistory, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep"):
        torchmemguard.record_oom_snapshots(tmp_path / "new", keep=0)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("device", ["cpu", "mps", torch.device("meta")])
def test_a_device_without_an_allocator_history_is_refused(
    history: FakeHistory, tmp_path: Path, device: str | torch.device
) -> None:
    kind = torch.device(device).type
    with pytest.raises(
        ValueError, match=rf"allocator snapshots are recorded on cuda devices, not '{kind}'"
    ):
        torchmemguard.record_oom_snapshots(tmp_path, device=device)


def test_without_cuda_recording_is_refused(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match=r"device=None: .* \(CUDA is not available\)"):
        torchmemguard.record_oom_snapshots(tmp_path / "none")
    with pytest.raises(ValueError, match=r"device='cuda': CUDA is not available"):
        torchmemguard.record_oom_snapshots(tmp_path / "cuda", device="cuda")
    assert list(tmp_path.iterdir()) == []
    assert snapshots._active is None
