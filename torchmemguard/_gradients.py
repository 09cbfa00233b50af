"""Keep a retried or split call from accumulating gradients.

The chunks of a training step do not add up to the whole batch's gradients
(each chunk's mean loss is scaled for its own size), and a retry after an
out-of-memory error in ``backward()`` adds to what the failed attempt already
accumulated. So while the guard retries or splits a call, a
:class:`BackwardWatch` stops any ``backward()`` before it touches a gradient.

It is a torch function mode: it sees every torch call made in the attempt, so
the guard enters it only on that slow path, and only when gradients are
enabled (with them off, ``backward()`` has no graph to run on).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# torch.autograd.grad is left alone: it returns gradients, never accumulates them.
_BACKWARD = frozenset({torch.Tensor.backward, torch.autograd.backward})


class BackwardStopped(Exception):
    """Raised in place of a ``backward()`` that a guarded attempt tried to run."""


class BackwardWatch(TorchFunctionMode):
    """Stops every ``backward()`` called while it is active, and notes that it did."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func in _BACKWARD:
            self.seen = True
            raise BackwardStopped(
                "torchmemguard stopped a backward() in a retried or split call before it "
                "accumulated any gradient"
            )
        return func(*args, **(kwargs or {}))
