"""``accumulate_gradients``: the public way to make an :class:`AccumulatingStep`, with
its arguments checked, every problem in one error."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, overload

import torch

from torchmemguard._errors import gathered, raise_bad_arguments
from torchmemguard._options import GuardOptions, Options
from torchmemguard._training.step import AccumulatingStep

if TYPE_CHECKING:
    from typing_extensions import Unpack

P = ParamSpec("P")
Step = Callable[P, torch.Tensor]


@overload
def accumulate_gradients(
    module: torch.nn.Module,
    loss_fn: Step[P],
    /,
    *,
    reduction: Literal["mean", "sum"] = "mean",
    items: Callable[..., Any] | None = None,
    scaler: Any = None,
    process_group: Any = None,
    **options: Unpack[GuardOptions],
) -> Step[P]: ...


@overload
def accumulate_gradients(
    module: torch.nn.Module,
    loss_fn: None = None,
    /,
    *,
    reduction: Literal["mean", "sum"] = "mean",
    items: Callable[..., Any] | None = None,
    scaler: Any = None,
    process_group: Any = None,
    **options: Unpack[GuardOptions],
) -> Callable[[Step[P]], Step[P]]: ...


def accumulate_gradients(
    module: torch.nn.Module,
    loss_fn: Step[P] | None = None,
    /,
    *,
    reduction: Literal["mean", "sum"] = "mean",
    items: Callable[..., Any] | None = None,
    scaler: Any = None,
    process_group: Any = None,
    **options: Unpack[GuardOptions],
) -> Step[P] | Callable[[Step[P]], Step[P]]:
    """Make ``loss_fn`` a training step of ``module`` that never runs out of memory.

    Calling the step runs ``loss_fn`` on micro-batches of its batch arguments
    (split as :func:`~torchmemguard.oom_safe` splits them), calls ``backward()``
    on each loss scaled so that the gradients accumulated equal the whole
    batch's, and returns the whole batch's loss, detached. The micro-batches
    are as large as memory allows: the whole batch while it fits. The optimizer
    step, zeroing and clipping stay yours.

    Use it as ``step = accumulate_gradients(model, loss_fn)`` or as a decorator,
    ``@accumulate_gradients(model)``. ``loss_fn`` returns the mean (or, with
    ``reduction="sum"``, the sum) of its samples' losses, as a scalar tensor,
    and must not call ``backward()`` itself. A mean over something else than
    samples (tokens, or a weighted mean) takes ``items=``.

    The first time a shape of batch is cut into micro-batches, the step checks
    that they add up: on a small sub-batch and its halves, without gradients and
    in eval mode. A loss whose micro-batches would not (in-batch negatives, a
    token-level mean given no ``items``) is refused with
    :class:`~torchmemguard.SplitRefusedError`, now and on every later step that
    runs out of memory.

    Args:
        module: the model whose gradients the step accumulates: its parameters'
            gradients and its training-mode buffers (BatchNorm's running
            statistics) are put back when a micro-batch runs out of memory.
            A ``DistributedDataParallel`` module keeps its ranks in step.
        reduction: how ``loss_fn`` reduces over its samples, ``"mean"`` or ``"sum"``.
        items: for a mean over loss items that samples hold in different numbers
            (a token-level mean with ``ignore_index``, a class-weighted mean):
            ``items(*args, **kwargs)`` returns each sample's items, as a tensor of
            the batch's length, for example
            ``lambda input_ids, labels: (labels != -100).sum(-1)``. It is called
            once per step that is cut into micro-batches, on the whole batch, and
            each micro-batch's loss is weighted by its share of the items, so the
            gradients and the loss are the whole batch's; a micro-batch with no
            items is skipped. Across ranks, each rank weights by its own items,
            as DistributedDataParallel without micro-batches does.
        scaler: a ``torch.amp.GradScaler``: each micro-batch's loss is scaled by it.
        process_group: the ranks to keep in step, for a module that is not
            ``DistributedDataParallel`` (whose own group is used otherwise); the
            gradients are then averaged over them, once per step.
        options: ``batch_args``, ``whole_args``, ``min_chunk``, ``max_retries``,
            ``grow_after``, ``split``, ``batch_dim`` and ``check_rows`` as for
            :func:`~torchmemguard.oom_safe`.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"accumulate_gradients needs the nn.Module it trains, got {module!r}")
    wrong_type: list[str] = []
    wrong_value: list[str] = []
    if reduction not in ("mean", "sum"):
        wrong_value.append(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if "merge" in options:
        wrong_type.append("merge does not apply: the step adds up the micro-batches' losses")
    if items is not None and not callable(items):
        wrong_type.append(f"items must be callable, got {items!r}")
    if items is not None and reduction == "sum":
        wrong_value.append("items applies to reduction='mean': a sum needs no weights")
    if scaler is not None and not callable(getattr(scaler, "scale", None)):
        wrong_type.append(f"scaler must be a torch.amp.GradScaler, got {scaler!r}")
    given = {name: value for name, value in options.items() if name != "merge"}
    checked = gathered(wrong_type, wrong_value, Options.of, "accumulate_gradients", given)
    raise_bad_arguments(wrong_type, wrong_value)
    assert checked is not None  # raised above otherwise

    def decorate(fn: Step[P]) -> Step[P]:
        if not callable(fn):
            raise TypeError(f"accumulate_gradients needs a loss function, got {fn!r}")
        step: Step[P] = AccumulatingStep(
            module, fn, reduction, scaler, process_group, checked, items
        )
        return step

    return decorate if loss_fn is None else decorate(loss_fn)
