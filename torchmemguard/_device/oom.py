"""The out-of-memory error type that torch raises, whichever torch is installed."""

from __future__ import annotations

import torch

# torch.OutOfMemoryError exists from torch 2.5; older releases only have the CUDA
# one, which is the same type under its older name.
TorchOutOfMemoryError: type[RuntimeError] = getattr(
    torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError
)
