"""Measuring what a piece of work takes at its peak, on the CPU and on CUDA."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.conftest import FakeCuda
from torchmemguard import _device as device

MIB = 2**20
linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the CPU's peak is read from /proc (Linux)"
)


@linux_only
def test_the_cpu_peak_counts_a_block_allocated_and_freed_inside() -> None:
    meter = device.meter.start(torch.device("cpu"))
    assert meter is not None
    block = torch.ones(64 * MIB // 4)  # written, so resident
    del block
    peak = meter.stop()
    assert peak is not None
    # What the process held already is left out: the peak can be a little less
    # than the block, where pages were given back meanwhile.
    assert 60 * MIB <= peak < 80 * MIB


@linux_only
def test_the_cpu_peak_leaves_out_what_was_held_before() -> None:
    held = torch.ones(64 * MIB // 4)
    meter = device.meter.start(torch.device("cpu"))
    assert meter is not None
    peak = meter.stop()
    del held
    assert peak is not None
    assert peak < 8 * MIB


@linux_only
def test_an_attempt_that_starts_beside_another_is_not_measured() -> None:
    first = device.meter.start(torch.device("cpu"))
    assert first is not None
    assert first.measuring
    second = device.meter.start(torch.device("cpu"))
    assert second is not None
    assert not second.measuring
    assert second.stop() is None
    first.cancel()


@linux_only
def test_a_measurement_is_dropped_when_another_attempt_ran_meanwhile() -> None:
    # The peak statistic is the process's: it would count the other attempt's memory.
    measured = device.meter.start(torch.device("cpu"))
    other = device.meter.start(torch.device("cpu"))
    assert measured is not None
    assert other is not None
    other.cancel()
    assert measured.stop() is None
    alone = device.meter.start(torch.device("cpu"))
    assert alone is not None
    assert alone.measuring
    assert alone.stop() is not None


def test_the_cuda_peak_is_the_allocators_peak_above_what_was_allocated(
    fake_cuda: FakeCuda,
) -> None:
    fake_cuda.allocated[1] = 10 * MIB
    meter = device.meter.start(torch.device("cuda:1"))
    assert meter is not None
    assert fake_cuda.peak[1] == 10 * MIB  # the peak statistic was reset
    fake_cuda.peak[1] = 42 * MIB
    assert meter.stop() == 32 * MIB


def test_a_device_the_process_has_not_used_is_not_measured(fake_cuda: FakeCuda) -> None:
    fake_cuda.contexts.discard(1)
    unused = device.meter.start(torch.device("cuda:1"))
    assert unused is not None
    assert not unused.measuring
    assert unused.stop() is None
    # The device stays free for a later measurement.
    fake_cuda.contexts.add(1)
    meter = device.meter.start(torch.device("cuda:1"))
    assert meter is not None
    assert meter.measuring
    meter.cancel()


def test_no_device_and_unknown_devices_are_not_measured() -> None:
    assert device.meter.start(None) is None
    assert device.meter.start(torch.device("meta")) is None
