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


@functools.cache
def _functions() -> tuple[Callable[[], Any], Callable[[int], int]] | None:
    """The C library's ``mallinfo2`` and ``malloc_trim``, where it has both."""
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded: the process's C library
    except OSError:
        return None
    info = getattr(libc, "mallinfo2", None)
    trim = getattr(libc, "malloc_trim", None)
    if info is None or trim is None:
        return None
    info.argtypes, info.restype = [], _Info
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return info, trim


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
    info = found[0]()
    return Heap(in_use=info.uordblks + info.hblkhd, held=info.arena + info.hblkhd)


def trim() -> None:
    """Return the free memory of malloc's heaps to the system, where glibc can."""
    found = _functions()
    if found is not None:
        found[1](0)
