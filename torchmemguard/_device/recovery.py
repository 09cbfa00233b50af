"""Give memory back after an out-of-memory error, once per wave of errors."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

import torch

from torchmemguard._device.kinds import BACKENDS

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


def recoveries(device: torch.device | None) -> int:
    """How many recoveries have run for ``device``: read when an OOM is caught."""
    _lock(_name(device))
    return _generations[_name(device)]


def recover(device: torch.device | None, seen: int, collect: bool = False) -> None:
    """Give the memory that a failed attempt held back to ``device``.

    Call it after the exception is gone, so that its frames and their tensors
    are already freed. ``seen`` is :func:`recoveries` when the OOM was caught:
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
    """Release the cached blocks of ``device`` (of every backend in use if None).

    A backend that the process has not used yet is left alone.
    """
    if device is None:
        for backend in BACKENDS.values():
            backend.empty_cache(None)
        return
    found = BACKENDS.get(device.type)
    if found is not None:
        found.empty_cache(device.index)


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
