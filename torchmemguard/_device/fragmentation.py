"""Fragmentation in an out-of-memory report: memory the allocator holds free, split
among the blocks in use, so that a large block finds no room in it.

The report is made after the guard has emptied the cache. What is still held
free then is split: CUDA's cache keeps a segment as long as one block of it is
in use (``inactive_split_bytes``), and glibc's heaps keep the holes between
blocks in use (free bytes less the top of the main heap, which ``malloc_trim``
returns). When that is at least an eighth of what the allocator holds, and at
least FRAGMENTED_BYTES, the report says so, with the numbers and the remedy.
"""

from __future__ import annotations

from typing import Any

import torch

from torchmemguard._device.base import Reading
from torchmemguard._units import format_bytes

SHARE = 8  # split free memory of at least 1/SHARE of what the allocator holds
FRAGMENTED_BYTES = 16 * 2**20  # and at least this much


def _alloc_conf() -> str:
    """The environment variable of torch's allocator settings: PYTORCH_ALLOC_CONF from
    torch 2.9 on, PYTORCH_CUDA_ALLOC_CONF before."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return "PYTORCH_ALLOC_CONF" if (major, minor) >= (2, 9) else "PYTORCH_CUDA_ALLOC_CONF"


def remedy(kind: str) -> str | None:
    """What lets the allocator of a ``kind`` of device use split memory; None if unknown."""
    if kind == "cuda":
        return (
            f"{_alloc_conf()}=expandable_segments:True in the service's environment lets "
            "the allocator grow a segment in place instead of leaving split ones behind"
        )
    if kind == "cpu":
        return (
            "MALLOC_MMAP_THRESHOLD_=65536 in the service's environment maps each large "
            "block on its own, returned when freed, instead of cutting it from glibc's heaps"
        )
    return None


def found(reading: Reading, kind: str) -> dict[str, Any] | None:
    """The split free memory of ``reading`` when it is fragmentation worth a report
    (the post-mortem's ``fragmentation`` field); None otherwise."""
    split, reserved = reading.inactive_split, reading.reserved
    if split is None or not reserved or split < max(reserved // SHARE, FRAGMENTED_BYTES):
        return None
    return {"split_free_bytes": split, "reserved_bytes": reserved, "remedy": remedy(kind)}


def sentence(report: dict[str, Any]) -> str:
    """``report`` (from :func:`found`) for an error message."""
    text = (
        f"{format_bytes(report['split_free_bytes'])} of the "
        f"{format_bytes(report['reserved_bytes'])} the allocator holds is free but split "
        "among blocks in use (fragmentation)"
    )
    return text if report["remedy"] is None else f"{text}: {report['remedy']}"
