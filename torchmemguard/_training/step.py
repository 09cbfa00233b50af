"""``accumulate_gradients``: one training step over micro-batches that fit.

A step runs the loss function on micro-batches of its batch and calls
``backward()`` on each loss, scaled so that the gradients add up to the whole
batch's. When a micro-batch runs out of memory, in its forward or its
backward, the gradients and the training-mode buffers go back to what they
were when the step started, the memory is recovered, and the whole step runs
again with smaller micro-batches: nothing is accumulated twice. The size that
fitted is remembered per shape of batch, as ``oom_safe`` remembers it, and
grows back when memory is free again. Across the ranks of a torch.distributed
job, :mod:`torchmemguard._training.ranks` keeps every rank on the same size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NoReturn

import torch

from torchmemguard import _decide as decide
from torchmemguard import _inplace as inplace
from torchmemguard._arguments import Unsplittable
from torchmemguard._classify import is_oom, oom_device, without_traceback
from torchmemguard._decide import DEVICES, Progress
from torchmemguard._errors import (
    BatchError,
    OutOfMemoryError,
    SplitRefusedError,
    TorchMemGuardError,
)
from torchmemguard._guarded import Guard, GuardState
from torchmemguard._independence import compute_dtypes
from torchmemguard._options import Options
from torchmemguard._training import ranks as ranks_module
from torchmemguard._training.losses import Weights, ignored_labels, split_difference


class _Snapshot:
    """The gradients and training-mode buffers of a module when a step starts, to put
    back when an attempt fails."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.params = [p for p in module.parameters() if p.requires_grad]
        # Only gradients that exist are copied: after zero_grad() (set_to_none), none.
        self.grads = {p: p.grad.detach().clone() for p in self.params if p.grad is not None}
        # A module in eval mode leaves its buffers alone (BatchNorm's running statistics).
        self.buffers = [
            (buffer, buffer.detach().clone())
            for m in module.modules()
            if m.training
            for buffer in m.buffers(recurse=False)
        ]

    def restore(self) -> None:
        """Put every gradient and buffer back as it was."""
        for p in self.params:
            saved = self.grads.get(p)
            if saved is None:
                p.grad = None
            elif p.grad is None:
                p.grad = saved.clone()
            else:
                p.grad.copy_(saved)
        for buffer, saved in self.buffers:
            buffer.copy_(saved)


class AccumulatingStep:
    """A training step of ``module`` over micro-batches (see :func:`accumulate_gradients`)."""

    def __init__(
        self,
        module: torch.nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        reduction: Literal["mean", "sum"],
        scaler: Any,
        process_group: Any,
        options: Options,
        items: Callable[..., Any] | None = None,
    ) -> None:
        self.module = module
        self.loss_fn = loss_fn
        self.reduction = reduction
        self.items = items
        self.scaler = scaler
        self.process_group = process_group
        self.guard = Guard(loss_fn, options, warn_coupled=True)
        self.__wrapped__ = loss_fn

    @property
    def oom_guard(self) -> GuardState:
        """The step's counters and learned micro-batch sizes."""
        return self.guard.state()

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run the step on this batch: gradients accumulated, the whole batch's loss returned.

        What follows each attempt is decided by :mod:`torchmemguard._decide`, as for a
        guarded call; the step supplies its own attempt (every micro-batch, with the
        gradients put back when one runs out) and the agreement across ranks.
        """
        guard, memory, events = self.guard, self.guard.memory, self.guard.events
        options = guard.options
        ranks = ranks_module.ranks_for(self.module, self.process_group)
        batch = guard.plan.bind(0, args, kwargs, self.module)
        found = batch.shape()
        shape, device = (None, None) if isinstance(found, Unsplittable) else found
        n = 0 if shape is None else shape.n
        start = _Snapshot(self.module)
        first = n if shape is None else max(min(options.min_chunk, n), memory.start(shape))
        progress = Progress(n, first, device)
        split = False
        weights: list[Weights] = []  # the micro-batches' weights, once they are needed
        while True:
            # Every decision below is taken from what all ranks agreed on, so that
            # they all go round this loop, and leave it, together.
            size = ranks.size(progress.chunk)
            if size < n and not split:
                split = True
                events.split(device)
                if guard.warn_coupled is not None:
                    guard.warn_coupled(self.module)
            before = inplace.careful_versions(batch.args, batch.kwargs)
            with ranks.local():
                status, loss, error, seen = self._attempt(batch, n, size, shape, device, weights)
            smaller = size
            if status == ranks_module.RAN_OUT:
                assert error is not None
                decide.noted(progress, error, events)
                progress.pending = seen
                refused = self._refused(batch, before, error, progress.ran_out)
                if shape is None:  # nothing to split: refused, on every rank alike
                    status, error = ranks_module.FAILED, _refusal(guard.name, found, error)
                elif refused is not None:
                    status, error = ranks_module.FAILED, refused
                else:
                    smaller = decide.shrunk(memory, shape, size, options.min_chunk)
            elif isinstance(error, SplitRefusedError) and error.__cause__ is None:
                error.__cause__ = progress.last_oom  # refused by the check: what made it split
            ran_out_here = status == ranks_module.RAN_OUT
            status, smaller = ranks.outcome(status, smaller)
            if status == ranks_module.SUCCEEDED:
                ranks.synchronize(start.grads)
                if shape is not None and (progress.ooms or size < n):
                    decide.fitted(progress, memory, shape, size, None, options.min_chunk)
                assert loss is not None
                return loss
            start.restore()
            if status == ranks_module.FAILED:
                if error is not None:
                    raise error
                raise TorchMemGuardError(
                    f"{guard.name}: another rank failed during the step (see its log); "
                    "every gradient here is back as it was when the step started"
                )
            if not ran_out_here:  # another rank ran out: this one recovers its own device
                progress.ooms += 1
                progress.ran_out = device
                progress.pending = DEVICES.recoveries(device)
            stop = decide.verdict(progress, size, smaller, options.max_retries, "micro-batch")
            if stop is not None:
                self._give_up(progress, stop.why)
            decide.recover(progress, memory, shape, events, DEVICES, options.min_chunk, False)

    def _attempt(
        self,
        batch: Any,
        n: int,
        size: int,
        shape: Any,
        device: torch.device | None,
        weights: list[Weights],
    ) -> tuple[int, torch.Tensor | None, BaseException | None, int | None]:
        """Run every micro-batch of ``size``: (status, the whole loss, the error, the
        count of recoveries of the device that ran out, read as it ran out). ``weights``
        holds the step's micro-batch weights once a first split attempt made them. An
        OOM that names no device ran out on the batch's ``device``."""
        total: torch.Tensor | None = None
        bounds = [(0, n)] if size >= n else [(b, min(n, b + size)) for b in range(0, n, size)]
        try:
            if size < n:
                if not weights:  # items= is called once per step, on the whole batch
                    weights.append(Weights(self.guard.name, self.reduction, self.items, batch, n))
                refusal = self._check(batch, size, shape, weights[0])
                if refusal is not None:
                    return ranks_module.FAILED, None, refusal, None
            for begin, end in bounds:
                weight = weights[0].of(begin, end) if size < n else 1.0
                if weight == 0.0:
                    continue  # no loss items here: nothing to add, and no mean to take
                args, kwargs = (
                    (batch.args, batch.kwargs) if size >= n else batch.chunk(n, begin, end)
                )
                loss = self.loss_fn(*args, **kwargs)
                _check_loss(self.guard.name, loss)
                scaled = loss if weight == 1.0 else loss * weight
                (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()
                part = loss.detach() if weight == 1.0 else loss.detach() * weight
                total = part if total is None else total + part
                del loss, scaled
            if total is None:  # not one loss item in the whole batch
                param = next(self.module.parameters(), None)
                total = torch.zeros((), device=None if param is None else param.device)
        except Exception as exc:
            if not is_oom(exc):
                return ranks_module.FAILED, None, exc, None
            # The OOM's frames hold the failed micro-batch's tensors: keep a copy without them.
            seen = DEVICES.recoveries(decide.named(oom_device(exc), device))
            return ranks_module.RAN_OUT, None, without_traceback(exc), seen
        return ranks_module.SUCCEEDED, total, None, None

    def _check(
        self, batch: Any, size: int, shape: Any, weights: Weights
    ) -> SplitRefusedError | None:
        """The first time a shape of batch is cut into micro-batches: the refusal of a loss
        whose micro-batches would not add up to the whole batch's, if it is one."""
        guard = self.guard
        if guard.checks is None or shape.key in guard.checks:
            return None
        found = None
        if self.reduction == "mean" and self.items is None:
            labels = ignored_labels(batch.labels, batch.values)
            if labels is not None:
                found = (
                    f"its batch argument {labels!r} holds ignored positions (-100), so its "
                    "loss is a mean over the valid tokens, and micro-batches weighted by their "
                    "samples would not add up to it",
                    "Pass items= to count each sample's tokens, for example "
                    "items=lambda input_ids, labels: (labels != -100).sum(-1) (count "
                    "labels[:, 1:] for a causal language model, which shifts them).",
                )
        if found is None:
            dtypes = [shape.dtype, *compute_dtypes(None, self.module)]
            difference = split_difference(
                self.loss_fn, self.module, batch, size, weights, [torch.float32, *dtypes]
            )
            if difference is not None:
                found = (f"its micro-batches' losses do not add up: {difference}", _COUPLED)
        if found is not None:
            guard.known.refuse(found)
            guard.events.unrecovered(shape.group.device)
            return SplitRefusedError(f"{guard.name} ran out of memory: {found[0]}. {found[1]}")
        guard.checks.add(shape.key)
        return None

    def _refused(
        self, batch: Any, before: list[int], error: BaseException | None, device: Any
    ) -> SplitRefusedError | None:
        """The refusal of a step that ran out of memory, if it cannot be run again."""
        name = self.guard.name
        names = inplace.changed(batch.args, batch.kwargs, before, batch.labels_by_place())
        if names:
            what = (
                f"{inplace.refusal(names)}. Change the input out of place inside the loss "
                "function, or before calling the step"
            )
        elif self.guard.refusal is not None:
            what = ". ".join(self.guard.refusal)
        else:
            return None
        self.guard.events.unrecovered(device)
        refusal = SplitRefusedError(f"{name} ran out of memory: {what}")
        refusal.__cause__ = error
        return refusal

    def _give_up(self, progress: Progress, why: str) -> NoReturn:
        guard = self.guard
        what = (
            f"{why}; batch of {progress.n} samples, smallest micro-batch tried {progress.smallest}"
        )
        message = decide.unrecovered(
            guard.name, progress, progress.ran_out, guard.memory, guard.events, DEVICES, what
        )
        raise OutOfMemoryError(
            f"{message} Every gradient is back as it was when the step started. Pass smaller "
            "batches, or free memory held elsewhere in the process."
        ) from progress.last_oom


_COUPLED = (
    "A loss whose samples see each other (in-batch negatives: InfoNCE, CLIP's loss, "
    "MultipleNegativesRankingLoss) cannot be cut into micro-batches: pass batches that fit, "
    "or check_rows=False to accept micro-batch losses. A token-level or class-weighted mean "
    "takes items= to count each sample's share."
)


def _refusal(name: str, problem: object, cause: BaseException | None) -> BatchError:
    refusal = BatchError(f"{name}: {problem}")
    refusal.__cause__ = cause
    return refusal


def _check_loss(name: str, loss: object) -> None:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TypeError(
            f"{name} must return the loss as a scalar tensor, got "
            f"{type(loss).__name__ if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}"
        )
    if not loss.requires_grad:
        raise TypeError(f"{name} returned a loss that does not require grad: nothing to backward")
