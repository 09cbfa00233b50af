"""Recovery: cache emptying once per wave of errors, and runs without oneDNN."""

from __future__ import annotations

import pytest
import torch

from torchmemguard._device import recovery


def test_recovery_empties_the_cache_and_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    emptied: list[object] = []
    monkeypatch.setattr(recovery, "empty_cache", emptied.append)
    cpu = torch.device("cpu")
    seen = recovery.recoveries(cpu)
    recovery.recover(cpu, seen)
    assert emptied == [cpu]
    assert recovery.recoveries(cpu) == seen + 1


def test_recovery_is_skipped_when_another_thread_already_recovered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    emptied: list[object] = []
    monkeypatch.setattr(recovery, "empty_cache", emptied.append)
    cpu = torch.device("cpu")
    seen = recovery.recoveries(cpu)
    recovery.recover(cpu, seen)
    recovery.recover(cpu, seen)  # caught the same OOM wave, recovered by the first
    assert emptied == [cpu]


def test_full_collection_always_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    collected: list[int] = []
    monkeypatch.setattr(recovery.gc, "collect", lambda: collected.append(1) or 0)
    cpu = torch.device("cpu")
    seen = recovery.recoveries(cpu)
    recovery.recover(cpu, seen)
    recovery.recover(cpu, seen, collect=True)
    assert collected == [1]


def test_empty_cache_leaves_an_unused_backend_alone() -> None:
    recovery.empty_cache(None)
    assert not torch.cuda.is_initialized()


def test_empty_cache_of_no_device_empties_every_backend_in_use(monkeypatch) -> None:
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append("cuda"))
    recovery.empty_cache(None)
    assert emptied == ["cuda"]


def test_without_onednn_turns_it_off_and_back_on() -> None:
    before = torch.backends.mkldnn.enabled
    with recovery.without_onednn():
        assert not torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled == before


def test_overlapping_blocks_without_onednn_restore_the_setting_once_the_last_closes() -> None:
    first, second = recovery.without_onednn(), recovery.without_onednn()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert not torch.backends.mkldnn.enabled  # the second block is still open
    second.__exit__(None, None, None)
    assert torch.backends.mkldnn.enabled


def test_without_onednn_keeps_it_off_where_it_was_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    with recovery.without_onednn():
        pass
    assert not torch.backends.mkldnn.enabled
