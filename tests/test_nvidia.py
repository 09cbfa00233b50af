"""GPU utilisation and temperature from NVML, through a stand-in ``pynvml``."""

from __future__ import annotations

import sys

import pytest

from torchmemguard import _device as device
from torchmemguard._device.nvidia import Nvml

from .conftest import FakeNvml


def test_gpu_signals_come_from_nvml_matched_by_uuid(fake_nvml: FakeNvml) -> None:
    assert device.nvml.signals(1) == (0.37, 61.0)
    assert device.nvml.signals(1) == (0.37, 61.0)
    assert fake_nvml.uuids == ["GPU-uuid-1"]


def test_no_gpu_signals_without_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    monkeypatch.setattr(device, "nvml", Nvml())
    assert device.nvml.signals(0) is None


def test_nvml_that_does_not_start_is_logged_and_left_out(
    fake_nvml: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    fake_nvml.fail_init = True
    assert device.nvml.signals(0) is None
    assert "NVML is installed but did not start: NVML Shared Library Not Found" in caplog.text
