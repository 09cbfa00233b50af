"""Recovery and memory reports: part of the device layer.

The device layer (this module, :mod:`torchmemguard.limits`,
:mod:`torchmemguard.readings` and :mod:`torchmemguard.host`) is the only code
that talks to torch.cuda, torch.mps, torch.xpu and the operating system about
memory.

Nothing here initialises a device: a backend that the process has not used yet
is left alone.
"""

from __future__ import annotations

import contextlib
import gc
import math
import threading
from collections.abc import Iterator

import torch

from torchmemguard import host, limits
from torchmemguard.units import format_bytes

_registry_lock = threading.Lock()
_locks: dict[str, threading.Lock] = {}
_generations: dict[str, int] = {}
# Attempts running without oneDNN now, and its setting before the first of them.
_onednn_lock = threading.Lock()
_onednn_off = 0
_onednn_before = True


def _name(device: torch.device | None) -> str:
    return "any" if device is None else str(device)


def _lock(name: str) -> threading.Lock:
    with _registry_lock:
        lock = _locks.get(name)
        if lock is None:
            lock = _locks[name] = threading.Lock()
            _generations[name] = 0
        return lock


def generation(device: torch.device | None) -> int:
    """How many recoveries have run for ``device``: read when an OOM is caught."""
    _lock(_name(device))
    return _generations[_name(device)]


def recover(device: torch.device | None, seen: int, collect: bool = False) -> None:
    """Give the memory that a failed attempt held back to ``device``.

    Call it after the exception is gone, so that its frames and their tensors
    are already freed. ``seen`` is :func:`generation` when the OOM was caught:
    if another thread has recovered since, the cache is not emptied again.
    ``collect`` adds a full garbage collection, for memory held in cycles.
    """
    name = _name(device)
    with _lock(name):
        if _generations[name] != seen and not collect:
            return
        if collect:
            gc.collect()
        empty_cache(device)
        _generations[name] += 1


def empty_cache(device: torch.device | None) -> None:
    """Release the cached blocks of ``device`` (of every backend in use if None)."""
    kind = None if device is None else device.type
    if kind in (None, "cuda") and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        if device is not None and device.index is not None:
            with torch.cuda.device(device.index):
                torch.cuda.empty_cache()
        else:
            torch.cuda.empty_cache()
    xpu = getattr(torch, "xpu", None)
    if kind in (None, "xpu") and xpu is not None and xpu.is_initialized():
        xpu.empty_cache()
    if kind in (None, "mps") and torch.backends.mps.is_available():
        torch.mps.empty_cache()


def room(device: torch.device | None) -> int | None:
    """Bytes the process could still take on ``device`` now; ``None`` where unknown.

    On CUDA: free device memory and the allocator's cache, within any cap. On
    the CPU: memory still available, within any address-space cap.
    """
    try:
        if device is not None and device.type == "cuda" and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            index = device.index if device.index is not None else torch.cuda.current_device()
            free, _ = torch.cuda.mem_get_info(index)
            allocated = torch.cuda.memory_allocated(index)
            found = free + torch.cuda.memory_reserved(index) - allocated
            cap = limits.limit_for(torch.device("cuda", index)).read()
            return max(0, min(found, int(min(cap, 2**63)) - allocated))
        if device is not None and device.type == "cpu":
            spare = host.headroom()
            if spare is None:
                return None
            cap = host.address_space_limit() if host.can_cap_address_space() else math.inf
            space = host.address_space()
            if cap != math.inf and space is not None:
                spare = min(spare, int(cap) - space)
            return max(0, spare)
    except Exception:  # a reading that fails only means the room is unknown
        return None
    return None


def describe(device: torch.device | None) -> str:
    """The memory state of ``device`` in one line, for error messages."""
    try:
        if device is not None and device.type == "cuda" and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            return _describe_cuda(device)
        if device is None or device.type == "cpu":
            return host.describe()
    except Exception as exc:  # a report must never hide the error it explains
        return f"memory state unavailable ({exc!r})"
    return "memory state unavailable for this device"


def _describe_cuda(device: torch.device) -> str:
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    parts = [
        f"allocated {format_bytes(torch.cuda.memory_allocated(index))}",
        f"reserved {format_bytes(torch.cuda.memory_reserved(index))}",
        f"total {format_bytes(total)}",
        f"free {format_bytes(free)}",
    ]
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = get_fraction(index) if get_fraction is not None else 1.0
    if fraction < 1.0:
        parts.append(f"cap {format_bytes(fraction * total)} ({fraction:.0%})")
    return ", ".join(parts)


@contextlib.contextmanager
def without_onednn() -> Iterator[None]:
    """Run the block with oneDNN off: once oneDNN has failed to create a primitive
    under an address-space cap, it may refuse every shape it has not built yet.

    The setting is the process's, so blocks in several threads count: the first
    turns oneDNN off, the last puts the setting back as it found it.
    """
    global _onednn_off, _onednn_before
    with _onednn_lock:
        if _onednn_off == 0:
            _onednn_before = bool(torch.backends.mkldnn.enabled)
            torch.backends.mkldnn.enabled = False  # type: ignore[assignment]
        _onednn_off += 1
    try:
        yield
    finally:
        with _onednn_lock:
            _onednn_off -= 1
            if _onednn_off == 0:
                torch.backends.mkldnn.enabled = _onednn_before  # type: ignore[assignment]
