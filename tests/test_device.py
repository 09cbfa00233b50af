"""The device layer: recovery, cache emptying and memory reports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from torchmemguard import device

from .conftest import FakeCuda


def test_recovery_empties_the_cache_and_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    emptied: list[object] = []
    monkeypatch.setattr(device, "empty_cache", emptied.append)
    cpu = torch.device("cpu")
    seen = device.generation(cpu)
    device.recover(cpu, seen)
    assert emptied == [cpu]
    assert device.generation(cpu) == seen + 1


def test_recovery_is_skipped_when_another_thread_already_recovered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    emptied: list[object] = []
    monkeypatch.setattr(device, "empty_cache", emptied.append)
    cpu = torch.device("cpu")
    seen = device.generation(cpu)
    device.recover(cpu, seen)
    device.recover(cpu, seen)  # caught the same OOM wave, recovered by the first
    assert emptied == [cpu]


def test_full_collection_always_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    collected: list[int] = []
    monkeypatch.setattr(device.gc, "collect", lambda: collected.append(1) or 0)
    cpu = torch.device("cpu")
    seen = device.generation(cpu)
    device.recover(cpu, seen)
    device.recover(cpu, seen, collect=True)
    assert collected == [1]


def test_cpu_report_gives_resident_size_and_address_space() -> None:
    report = device.describe(torch.device("cpu"))
    assert "resident" in report
    assert "address space" in report
    assert "available" in report


def test_cpu_report_names_an_address_space_cap() -> None:
    code = (
        "import resource, torch\n"
        "from torchmemguard import device\n"
        "resource.setrlimit(resource.RLIMIT_AS, (64 * 2**30, resource.RLIM_INFINITY))\n"
        "print(device.describe(torch.device('cpu')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert "cap (RLIMIT_AS) 64 GiB" in out


def test_report_of_an_unknown_device_says_so() -> None:
    assert device.describe(torch.device("meta")) == "memory state unavailable for this device"


def test_empty_cache_leaves_an_unused_backend_alone() -> None:
    device.empty_cache(None)
    assert not torch.cuda.is_initialized()


def test_empty_cache_of_no_device_empties_every_backend_in_use(monkeypatch) -> None:
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append("cuda"))
    device.empty_cache(None)
    assert emptied == ["cuda"]


def test_report_of_no_device_is_the_cpu_report() -> None:
    assert "resident" in device.describe(None)


def test_the_room_of_the_cpu_is_what_the_process_could_still_take() -> None:
    room = device.room(torch.device("cpu"))
    assert room is not None
    assert 0 < room <= device.host.capacity()


def test_the_room_of_a_cuda_device_is_free_memory_and_cache_within_the_cap(
    fake_cuda: FakeCuda,
) -> None:
    fake_cuda.reserved[0], fake_cuda.allocated[0] = 30 * 2**30, 20 * 2**30
    assert device.room(torch.device("cuda:0")) == 60 * 2**30  # 50 free + 10 cached
    fake_cuda.allowed[0] = 25 * 2**30
    assert device.room(torch.device("cuda:0")) == 5 * 2**30


def test_the_room_of_an_unread_device_is_unknown(fake_cuda: FakeCuda) -> None:
    fake_cuda.initialized = False
    assert device.room(torch.device("cuda:0")) is None
    assert device.room(torch.device("meta")) is None


def test_without_onednn_turns_it_off_and_back_on() -> None:
    before = torch.backends.mkldnn.enabled
    with device.without_onednn():
        assert not torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled == before


def test_overlapping_blocks_without_onednn_restore_the_setting_once_the_last_closes() -> None:
    first, second = device.without_onednn(), device.without_onednn()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert not torch.backends.mkldnn.enabled  # the second block is still open
    second.__exit__(None, None, None)
    assert torch.backends.mkldnn.enabled


def test_without_onednn_keeps_it_off_where_it_was_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    with device.without_onednn():
        pass
    assert not torch.backends.mkldnn.enabled
