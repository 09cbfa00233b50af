"""Module-level guarded functions, importable by pickle and by spawned workers."""

from __future__ import annotations

import torch

import torchmemguard


@torchmemguard.oom_safe
def double_in_pairs(x: torch.Tensor) -> torch.Tensor:
    """Doubles ``x``, running out of memory for more than two samples at once."""
    if x.shape[0] > 2:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
    return x * 2


class Doubler:
    """A class with a guarded method, for pickling bound methods."""

    @torchmemguard.oom_safe
    def double_in_pairs(self, x: torch.Tensor) -> torch.Tensor:
        """Doubles ``x``, running out of memory for more than two samples at once."""
        return double_in_pairs(x)
