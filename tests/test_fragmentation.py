"""Fragmentation in an unrecovered OOM's message and post-mortem, and its gauge on the CPU."""

from __future__ import annotations

import logging

import pytest
import torch

import torchmemguard
from torchmemguard import _device as devices
from torchmemguard._device import fragmentation, malloc

from .conftest import ChunkLimit, FakeCuda, rows
from .test_postmortem import postmortems

GIB = 2**30


def split_cache(fake: FakeCuda, split: int, reserved: int, allocated: int) -> None:
    fake.reserved[0], fake.allocated[0] = reserved, allocated
    fake.stats[0] = {"inactive_split_bytes.all.current": split}


def test_the_alloc_conf_variable_is_the_one_of_the_torch_in_use() -> None:
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    expected = "PYTORCH_ALLOC_CONF" if (major, minor) >= (2, 9) else "PYTORCH_CUDA_ALLOC_CONF"
    assert fragmentation._alloc_conf() == expected


def test_an_unrecovered_cuda_oom_with_split_memory_names_it_and_the_remedy(
    fake_cuda: FakeCuda, caplog: pytest.LogCaptureFixture
) -> None:
    split_cache(fake_cuda, split=3 * GIB, reserved=5 * GIB, allocated=2 * GIB)
    with (
        caplog.at_level(logging.ERROR, logger="torchmemguard"),
        pytest.raises(torchmemguard.OutOfMemoryError) as info,
    ):
        torchmemguard.oom_safe(max_retries=2)(ChunkLimit(0, "CUDA out of memory."))(rows(4))
    message = str(info.value)
    conf = fragmentation._alloc_conf()
    assert (
        "3 GiB of the 5 GiB the allocator holds is free but split among blocks in use "
        f"(fragmentation): {conf}=expandable_segments:True" in message
    )
    [record] = postmortems(caplog)
    assert record["memory"]["fragmentation"] == {  # type: ignore[index]
        "split_free_bytes": 3 * GIB,
        "reserved_bytes": 5 * GIB,
        "remedy": fragmentation.remedy("cuda"),
    }


@pytest.mark.parametrize(
    ("split", "reserved"),
    [
        (GIB // 8 - 1, GIB),  # under an eighth of what is held
        (fragmentation.FRAGMENTED_BYTES - 1, 16 * fragmentation.FRAGMENTED_BYTES),  # too few bytes
    ],
)
def test_little_split_memory_is_not_called_fragmentation(
    fake_cuda: FakeCuda, split: int, reserved: int
) -> None:
    split_cache(fake_cuda, split=split, reserved=reserved, allocated=reserved - split)
    assert "fragmentation" not in devices.describe(torch.device("cuda:0"))
    assert "fragmentation" not in devices.summary(torch.device("cuda:0"))


def test_at_the_threshold_split_memory_is_called_fragmentation(fake_cuda: FakeCuda) -> None:
    split_cache(fake_cuda, split=GIB // 8, reserved=GIB, allocated=GIB - GIB // 8)
    assert "(fragmentation)" in devices.describe(torch.device("cuda:0"))


@pytest.mark.skipif(not malloc.readable(), reason="needs glibc's mallinfo2")
def test_the_cpu_reports_the_free_bytes_between_blocks_in_use_as_split() -> None:
    # Blocks of 64 KiB come from the heap (new, or holes it had). Freed every other
    # one, each becomes free memory between blocks in use, wherever it was.
    blocks = [torch.empty(2**14) for _ in range(256)]
    before = devices.backend("cpu").read(torch.device("cpu")).inactive_split  # type: ignore[union-attr]
    kept = blocks[1::2]
    del blocks
    after = devices.backend("cpu").read(torch.device("cpu")).inactive_split  # type: ignore[union-attr]
    assert before is not None
    assert after is not None
    # All but a few of the 128: one may border the heap's top, and reading /proc
    # allocates buffers, which may take another.
    assert after - before >= 120 * 2**16
    assert len(kept) == 128
