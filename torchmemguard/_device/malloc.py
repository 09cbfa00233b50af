"""glibc's malloc: what it holds, what it keeps free for reuse, and giving that back.

torch's CPU allocator takes its blocks from ``malloc``. glibc keeps freed
blocks in its heaps for the next ones rather than returning them to the
system: its mmap threshold rises to the largest block freed, so later blocks
of that size come from heaps that stay mapped. That memory is to the CPU what
CUDA's cache is to a GPU: still in the address space, free for the process's
next allocations. ``mallinfo2`` counts it (every arena), and ``malloc_trim``
returns what it can.

Where the C library has no ``mallinfo2`` (glibc before 2.33, musl, macOS) or
another allocator replaces malloc, nothing is read here and the CPU is read
from the system alone.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from typing import Any, NamedTuple


class _Info(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",  # bytes of the heaps (all arenas), from brk or mmap
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",  # bytes of the blocks mapped on their own
            "usmblks",
            "fsmblks",
            "uordblks",  # bytes of the heaps in use
            "fordblks",  # bytes of the heaps free
            "keepcost",
        )
    ]


class Heap(NamedTuple):
    """What malloc holds, in bytes."""

    in_use: int  # handed out and not freed
    held: int  # taken from the system: in use, and free in its heaps
    split: int  # free in its heaps between blocks in use: all free but the main heap's top


# A block this large comes from a heap once glibc's mmap threshold has risen past
# it (the largest block freed so far, with the defaults), and is mapped on its own
# below a fixed threshold (MALLOC_MMAP_THRESHOLD_ or mallopt).
_PROBE_BYTES = 256 * 2**10


class _Libc(NamedTuple):
    info: Callable[[], Any]
    trim: Callable[[int], int]
    malloc: Callable[[int], int | None]
    free: Callable[[int | None], None]


@functools.cache
def _functions() -> _Libc | None:
    """The C library's ``mallinfo2``, ``malloc_trim``, ``malloc`` and ``free``, where
    it has them all."""
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded: the process's C library
    except OSError:
        return None
    names = ("mallinfo2", "malloc_trim", "malloc", "free")
    if not all(hasattr(libc, name) for name in names):
        return None
    info, trim, malloc, free = (getattr(libc, name) for name in names)
    info.argtypes, info.restype = [], _Info
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    malloc.argtypes, malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    free.argtypes, free.restype = [ctypes.c_void_p], None
    return _Libc(info, trim, malloc, free)


def readable() -> bool:
    """Whether malloc's heaps can be read here (glibc 2.33 or later)."""
    return _functions() is not None


def heap() -> Heap | None:
    """What malloc holds now; ``None`` where it cannot be read.

    ``mallinfo2`` walks the free lists of every arena under its lock: about a
    microsecond on a heap of a few dozen free blocks.
    """
    found = _functions()
    if found is None:
        return None
    info = found.info()
    return Heap(
        in_use=info.uordblks + info.hblkhd,
        held=info.arena + info.hblkhd,
        split=max(0, info.fordblks - info.keepcost),
    )


def trim() -> None:
    """Return the free memory of malloc's heaps to the system, where glibc can."""
    found = _functions()
    if found is not None:
        found.trim(0)


@functools.cache
def _threshold_fixed() -> bool:
    """Whether the environment fixed glibc's mmap threshold (``MALLOC_MMAP_THRESHOLD_``,
    or ``glibc.malloc.mmap_threshold`` in ``GLIBC_TUNABLES``), which glibc reads at
    start-up: its threshold then never rises, and a block of that size or more that
    needs new memory is mapped on its own. A block of 256 KiB may still be served
    from a hole that smaller freed blocks left together in a heap, so the probe
    cannot tell this case apart in a process whose heaps have churned."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return bool(os.environ.get("MALLOC_MMAP_THRESHOLD_")) or (
        "glibc.malloc.mmap_threshold=" in tunables
    )


def heaps_hold_large_blocks() -> bool:
    """Whether malloc serves a block of 256 KiB from its heaps now, rather than
    mapping it on its own; False where malloc cannot be read, or the environment
    fixed its mmap threshold.

    Freed blocks in a heap stay there for the next ones, and the heap fragments:
    a large block may find no hole to fit in while the free bytes would hold it.
    Each mapped block is unmapped when freed, and fragments nothing. The answer
    comes from one block of that size, allocated and freed at once (a few
    microseconds). Freeing it raises glibc's dynamic threshold to 256 KiB, in a
    process that never freed a larger block.
    """
    found = _functions()
    if found is None or _threshold_fixed():
        return False
    before = found.info().hblks
    block = found.malloc(_PROBE_BYTES)
    try:
        # A block that could not be had at all: memory is tight, count it as held.
        return block is None or found.info().hblks == before
    finally:
        found.free(block)
