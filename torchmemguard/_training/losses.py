"""How a training step's loss adds up over micro-batches, and the check that it does.

The gradients of micro-batches add up to the whole batch's when each
micro-batch's loss is weighted by its share of what the whole batch's loss
averages over. For a mean over samples, that share is its share of the
samples. For a token-level mean (``ignore_index=-100``) or a weighted mean, it
is its share of the loss items, which ``items=`` counts per sample
(:class:`Weights`). A loss whose samples see each other (in-batch negatives)
adds up under no weights at all: :func:`split_difference` finds it, and a
token-level mean left without ``items=``, before the first micro-batch runs.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from torchmemguard._structures import children

IGNORE_INDEX = -100  # PyTorch's cross-entropy default, and transformers' label padding

# The largest relative difference between a loss and its halves' weighted losses that the
# numerics of a dtype explain: a mean over many terms, summed in another order.
_TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 2e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 3e-2,
}


class Weights:
    """The weight of each micro-batch's loss in the whole batch's, for ``reduction``
    and the per-sample item counts that ``items`` returns (None: one per sample)."""

    def __init__(
        self,
        name: str,
        reduction: str,
        items: Callable[..., Any] | None,
        batch: Any,
        n: int,
    ) -> None:
        self.reduction = reduction
        self.n = n
        self.sums: list[float] | None = None  # running sums of the items, from 0
        if reduction == "mean" and items is not None:
            counts = _counts(name, items(*batch.args, **batch.kwargs), n)
            self.sums = [0.0, *itertools.accumulate(counts)]

    def items(self, begin: int, end: int) -> float:
        """The loss items of samples ``begin:end``."""
        return float(end - begin) if self.sums is None else self.sums[end] - self.sums[begin]

    def of(self, begin: int, end: int, within: tuple[int, int] | None = None) -> float:
        """The weight of the loss of samples ``begin:end`` in the loss of ``within``
        (the whole batch by default); 0 for samples with no loss items."""
        if self.reduction == "sum":
            return 1.0
        low, high = within or (0, self.n)
        share, total = self.items(begin, end), self.items(low, high)
        return 0.0 if share == 0 or total == 0 else share / total


def _counts(name: str, found: Any, n: int) -> list[float]:
    """The item counts ``items`` returned, checked: one finite count of at least 0 a sample."""
    try:
        counts = torch.as_tensor(found).detach()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"{name}: items must return a tensor of the batch's {n} item counts, "
            f"got {type(found).__name__}"
        ) from exc
    if counts.shape != (n,):
        raise ValueError(
            f"{name}: items must return one count per sample, a tensor of shape ({n},), "
            f"got shape {tuple(counts.shape)}"
        )
    counts = counts.to("cpu", torch.float64)
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError(f"{name}: items must return finite counts of at least 0, got {counts}")
    return counts.tolist()


def ignored_labels(labels: list[str], values: list[Any]) -> str | None:
    """The first batch argument that holds an integer tensor with ignored positions
    (-100): the labels of a token-level loss, whose mean is over its valid tokens."""
    for label, value in zip(labels, values, strict=True):
        if _has_ignored(value):
            return label
    return None


def _has_ignored(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        integer = not (value.dtype.is_floating_point or value.dtype.is_complex)
        return integer and value.dtype != torch.bool and bool((value == IGNORE_INDEX).any())
    return any(_has_ignored(item) for item in children(value) or ())


def split_difference(
    loss_fn: Callable[..., Any],
    module: torch.nn.Module,
    batch: Any,
    size: int,
    weights: Weights,
    dtypes: list[torch.dtype | None],
) -> str | None:
    """How the loss of a small sub-batch differs from its halves' losses, weighted as the
    step weights its micro-batches; None when they agree, or when the loss is random.

    It runs without gradients, with ``module`` in eval mode (no dropout) for the
    check, on copies of the first ``2h`` samples (``h`` up to 4, at most half the
    micro-batch ``size``).
    """
    half = max(1, min(size // 2, 4))
    if weights.n < 2 * half or weights.items(0, 2 * half) == 0:
        return None
    bounds = ((0, half), (half, 2 * half))
    with torch.no_grad(), _evaluating(module):
        whole = _loss(loss_fn, batch.chunk(weights.n, 0, 2 * half, copy=True))
        added = 0.0
        for begin, end in bounds:
            weight = weights.of(begin, end, within=(0, 2 * half))
            if weight:
                added += weight * _loss(loss_fn, batch.chunk(weights.n, begin, end, copy=True))
        tol = max(_TOLERANCE.get(dtype, 3e-2) for dtype in dtypes if dtype is not None)
        if _close(whole, added, tol):
            return None
        if not _close(_loss(loss_fn, batch.chunk(weights.n, 0, 2 * half, copy=True)), whole, tol):
            return None  # a random loss: it cannot be checked
    how = "by their samples" if weights.sums is None else "by their items"
    if weights.reduction == "sum":
        how = "unweighted, as reduction='sum' adds them"
    return (
        f"the loss of samples 0 to {2 * half - 1} is {whole:.6g}, and the losses of its two "
        f"halves, weighted {how}, give {added:.6g}"
    )


def _loss(loss_fn: Callable[..., Any], call: tuple[tuple[Any, ...], dict[str, Any]]) -> float:
    loss = loss_fn(*call[0], **call[1])
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)


def _close(a: float, b: float, tol: float) -> bool:
    if a == b:
        return True
    return abs(a - b) <= tol * max(abs(a), abs(b))


@contextlib.contextmanager
def _evaluating(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode, and every submodule's mode put back after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
