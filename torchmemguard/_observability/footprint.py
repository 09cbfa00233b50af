"""What a guarded module holds between calls: its parameters and buffers, by device.

With several models in one process, ``torchmemguard_model_bytes{function,
device}`` tells each one's part at rest, beside what its calls take at their
peak (``torchmemguard_peak_bytes``) and keep (``torchmemguard_retained_bytes``).
A module is read when it is guarded and again whenever one of its guards
samples a call (about once a second, see
:mod:`~torchmemguard._observability.retention`), so a model moved to another
device after it was guarded, or guarded before the metrics were installed, is
seen; never on the happy path. A module that is garbage-collected reports 0.
"""

from __future__ import annotations

import itertools
import threading
import weakref

import torch

from torchmemguard._observability import metrics


class _Footprint:
    """One guarded module's name, and the devices it was last seen on."""

    __slots__ = ("devices", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.devices: set[torch.device] = set()


_lock = threading.Lock()
_modules: weakref.WeakKeyDictionary[torch.nn.Module, _Footprint] = weakref.WeakKeyDictionary()


def note(module: torch.nn.Module, name: str) -> None:
    """Report ``module`` under ``name`` from now on, and read it now; a module guarded
    again keeps its first name, so that its memory is counted once."""
    with _lock:
        footprint = _modules.get(module)
        if footprint is None:
            footprint = _modules[module] = _Footprint(name)
            weakref.finalize(module, _dropped, footprint)
    report(module)


def report(module: torch.nn.Module) -> None:
    """Set the gauges of ``module``, if it was noted."""
    with _lock:
        footprint = _modules.get(module)
    if footprint is None:
        return
    try:
        now_held = held(module)
    except Exception:  # tensors this cannot look into: nothing is reported
        return
    with _lock:
        gone = footprint.devices - now_held.keys()
        footprint.devices = set(now_held)
    for device in gone:  # moved away: its old device holds none of it now
        metrics.set_model_bytes(footprint.name, device, 0)
    for device, size in now_held.items():
        metrics.set_model_bytes(footprint.name, device, size)


def _dropped(footprint: _Footprint) -> None:
    """A noted module was garbage-collected: it holds nothing now."""
    for device in footprint.devices:
        metrics.set_model_bytes(footprint.name, device, 0)


def held(module: torch.nn.Module) -> dict[torch.device, int]:
    """The bytes of ``module``'s parameters and buffers by device, each storage once (tied
    weights share one); tensors without memory (``meta``) are left out."""
    seen: set[tuple[torch.device, int]] = set()
    found: dict[torch.device, int] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        found[tensor.device] = found.get(tensor.device, 0) + storage.nbytes()
    return found
