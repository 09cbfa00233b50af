"""One structured log record when a guarded call fails with an out-of-memory error.

The guard has already tried everything: the record is what the person on call
needs to tell a batch that can never fit from memory that was squeezed. It goes
to the ``torchmemguard`` logger at ERROR, once per unrecovered call, as a JSON
object in the message and as the ``torchmemguard_postmortem`` attribute of the
log record (for structured handlers). Only this rare path builds it. Where
:func:`~torchmemguard.record_oom_snapshots` records the device's allocator, the
record also gives the path of the snapshot written for it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable
from typing import Any

import torch

from torchmemguard import _device as devices
from torchmemguard._observability import snapshots

logger = logging.getLogger("torchmemguard")


def report(
    function: str,
    device: torch.device | None,
    batch: dict[str, Any],
    learned: dict[Hashable, int],
    why: str,
) -> dict[str, Any]:
    """Log the post-mortem of an unrecovered call of ``function``; return the record.

    ``batch`` describes the call's batch (its size, the smallest chunk tried),
    ``learned`` is the guard's size memory, ``why`` the reason it gave up.
    """
    record = {
        "event": "torchmemguard.unrecovered_oom",
        "function": function,
        "device": None if device is None else str(device),
        "why": why,
        "batch": batch,
        "learned": {_key(key): size for key, size in learned.items()},
        "memory": devices.summary(device),
        "snapshot": snapshots.take(function, device),
    }
    logger.error(
        "torchmemguard post-mortem: %s",
        json.dumps(record, default=str),
        extra={"torchmemguard_postmortem": record},
    )
    return record


def _key(key: Hashable) -> str:
    """A learned shape as text: the device, dtype and non-batch shapes of its key."""
    return str(key)
