"""The backend of each kind of device, in the order the metrics report them."""

from __future__ import annotations

import torch

from torchmemguard._device.accelerator import Accelerator
from torchmemguard._device.base import Backend
from torchmemguard._device.cpu import Cpu
from torchmemguard._device.mps import Mps


def _known() -> dict[str, Backend]:
    found: dict[str, Backend] = {"cuda": Accelerator("cuda", torch.cuda, history=True)}
    xpu = getattr(torch, "xpu", None)  # torch has it from 2.3
    if xpu is not None:
        # Capped and emptied, but neither read nor recorded: its allocator
        # statistics, free memory and history API differ between torch releases.
        found["xpu"] = Accelerator("xpu", xpu, reads=False)
    found["mps"] = Mps()
    found["cpu"] = Cpu()
    return found


BACKENDS: dict[str, Backend] = _known()
"""Backends by device kind (``torch.device.type``); nothing is initialised by building them."""


def backend(kind: str) -> Backend | None:
    """The backend of devices of ``kind``; ``None`` for a kind torchmemguard cannot read."""
    return BACKENDS.get(kind)
