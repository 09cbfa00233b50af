"""One guarded call: what it does after running out of memory.

A :class:`Run` owns the decisions of one call: its batch, the chunks done so
far, the next chunk to try, the clean-up after an out-of-memory error, and when
to give up. The call loops of :class:`~torchmemguard._guarded.Guard` only carry
them out; the chunk sizes come from the size memory (:mod:`torchmemguard._sizing`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, NoReturn

import torch

from torchmemguard import _decide as decide
from torchmemguard import _inplace as inplace
from torchmemguard._arguments import BoundBatch, Unsplittable
from torchmemguard._attempt import Attempt
from torchmemguard._classify import is_oom, oom_device
from torchmemguard._decide import DEVICES, Devices, Progress
from torchmemguard._errors import BatchError, OutOfMemoryError, SplitRefusedError
from torchmemguard._events import Events, Refusal
from torchmemguard._fitting import CallShape
from torchmemguard._independence import Checked, RowCheck, compute_dtypes
from torchmemguard._merging import Merger
from torchmemguard._options import Options
from torchmemguard._outputs import Outputs
from torchmemguard._sizing import SizeMemory


class Run:
    """One guarded call: its batch, its chunks so far, and the next step.

    It sees only what the call needs: the bound batch, the size memory, the
    options, how chunk outputs merge, the :class:`Events` to report (which only
    count), and what to do when the callable must never be split again
    (``refuse``) or splits a module in training (``coupled``).
    """

    def __init__(
        self,
        batch: BoundBatch,
        *,
        memory: SizeMemory,
        options: Options,
        events: Events,
        refuse: Callable[[Refusal], None],
        coupled: Callable[[object], None] | None,
        merger: Merger | None,
        refusal: Refusal | None = None,
        checks: Checked | None = None,
        quick: Hashable = None,
        failed: BaseException | None = None,
        versions: list[int] | None = None,
        device_layer: Devices = DEVICES,
    ) -> None:
        self.batch = batch
        self.memory = memory
        self.options = options
        self.events = events
        self.refuse = refuse  # notes that the callable is never to be split again
        self.coupled = coupled  # warns that splitting changes a module's batch statistics
        self.merger = merger  # None: the user's merge hook
        self.refusal = refusal  # why the callable is never retried or split, if it is not
        self.checks = checks  # the call shapes whose rows were checked; None: no check
        self.check: RowCheck | None = None  # the check of this call's rows, if one runs
        self.checking = False  # the attempt under way is a run of the check
        self.before = versions  # the in-place change counts of the arguments, before it
        found = batch.shape()
        self.problem = f"{events.name}: {found}" if isinstance(found, Unsplittable) else None
        self.shape: CallShape | None = None
        self.device: torch.device | None = None
        if not isinstance(found, Unsplittable):
            self.shape, self.device = found
        self.n = 0 if self.shape is None else self.shape.n
        self.devices = device_layer  # what the decisions ask of the device layer
        # What the call has been through, for the decisions of _decide.py.
        self.progress = Progress(self.n, self.n, self.device)
        # Progress: the outputs kept, the chunks' sizes, and where the next starts.
        self.outputs = Outputs(self.n, merger)
        self.size = self.n
        self.chunked = False  # the call runs in chunks
        self.current = Attempt(False, False, None, False)  # the attempt under way
        if failed is not None:
            self.failed(failed)
        elif self.shape is not None and refusal is None:  # a refused call runs whole
            first = memory.start(self.shape, quick)
            self.progress.chunk = max(min(options.min_chunk, self.n), first)

    @property
    def where(self) -> torch.device | None:
        """The device the metrics name: the last OOM's, or before any, the batch's."""
        return self.progress.where

    def attempt(self, watch: bool = True) -> Attempt:
        """The context of the next attempt (see :class:`~torchmemguard._attempt.Attempt`):
        a retry or a chunk is watched and measured; ``watch=False`` for async calls."""
        progress, shape = self.progress, self.shape
        measured = progress.ooms > 0 or self.size < self.n
        device = None
        if measured and shape is not None:
            device = progress.ran_out if progress.ooms else self.memory.device(shape)
        self.current = Attempt(progress.onednn_failed, measured, device, watch)
        return self.current

    def next_step(self) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """The arguments of the next attempt, or None when the call is complete."""
        decide.recover(
            self.progress,
            self.memory,
            self.shape,
            self.events,
            self.devices,
            self.options.min_chunk,
        )
        chunk = self.progress.chunk
        outputs = self.outputs
        if outputs.sizes and outputs.offset >= self.n:
            if self.check is not None and (check := self.check.next_args()) is not None:
                self.checking = True  # the row check, once every chunk ran
                return check
            return None
        self.before = inplace.careful_versions(self.batch.args, self.batch.kwargs)
        if self.shape is None or (outputs.offset == 0 and chunk >= self.n):
            self.size = self.n
            return self.batch.args, self.batch.kwargs
        left = self.n - outputs.offset
        self.size = min(chunk, left)
        if 0 < left - chunk < min(_FEW_ROWS, chunk):
            # The last two chunks share what is left, so that no chunk of a few rows
            # ends a call of large ones: kernels for one row compute otherwise (a matrix
            # times a vector), and its rows may differ in the last bits from the whole
            # batch's.
            self.size = max(-(-left // 2), self.options.min_chunk)
        if not self.chunked:
            self._refuse_left_out()
            self.chunked = True
            self.events.split(self.where)
            if self.coupled is not None:
                self.coupled(self.batch.owner)
        if (
            outputs.offset == 0
            and self.check is None
            and self.merger is not None
            and self._unchecked()
        ):
            # Copies of the rows to check, taken before the chunk may change them in place.
            dtypes = [self.shape.dtype, *compute_dtypes(self.device, self.batch.owner)]
            self.check = RowCheck(self.batch, self.n, self.size, self.merger, dtypes)
        return self.batch.chunk(self.n, outputs.offset, outputs.offset + self.size)

    def _unchecked(self) -> bool:
        """Whether this call's rows are yet to be checked: its first split for its shape."""
        return (
            self.checks is not None and self.shape is not None and self.shape.key not in self.checks
        )

    def caught(self, exc: BaseException) -> bool:
        """Take an exception of the attempt under way: True when the call goes on.

        Called inside the ``except`` block; an exception that is neither an
        out-of-memory error nor a stopped ``backward()`` is the caller's.
        """
        if self.current.watch is not None and self.current.watch.seen:
            self._stopped_backward()
            return True
        if self.checking:
            return self._check_raised(exc)
        if not is_oom(exc):
            return False
        self.failed(exc)
        return True

    def succeeded(self, output: Any) -> None:
        """Keep the output of the attempt that just returned."""
        if self.current.watch is not None and self.current.watch.seen:
            self._stopped_backward()  # the attempt caught the stop itself
            return
        if self.checking:
            self._check_took(output)
            return
        self.outputs.add(output, self.size, self._recovering, self._noted)
        if self.check is not None and not self.check.started:
            self.check.chunk_ran(output)
        if self.shape is not None:
            decide.fitted(
                self.progress,
                self.memory,
                self.shape,
                self.size,
                self.current.peak,
                self.options.min_chunk,
            )
            if self.current.peak is not None and self.progress.peak is not None:
                self.events.peak(self.progress.where, self.progress.peak)

    def _recovering(self, make: Callable[[], Any]) -> Any:
        """``make()`` of the output's memory; where it runs out, once more after a full
        garbage collection and the cache emptied. A smaller chunk would not help: the
        whole batch's output takes the same memory whatever the chunks."""
        try:
            return make()
        except Exception as exc:
            if not is_oom(exc):
                raise
            self._noted(exc)
        ran_out = self.progress.ran_out
        self.devices.recover(ran_out, self.devices.recoveries(ran_out), True)
        return make()

    def failed(self, exc: BaseException) -> None:
        """Decide what follows an out-of-memory error; raise when nothing can.

        Called inside the ``except`` block, so it must not touch memory: the
        clean-up waits for :meth:`next_step`, once the exception is gone.
        """
        self._noted(exc)
        if self.refusal is not None:
            self._give_up(exc, *self.refusal, error=SplitRefusedError)
        if self.shape is None:
            raise BatchError(self.problem)
        self._refuse_changed(exc)
        self._refuse_left_out()
        if self.check is not None and not self.check.started:
            self.check = None  # prepared for a chunk that did not fit
        progress, options = self.progress, self.options
        smaller = decide.shrunk(self.memory, self.shape, self.size, options.min_chunk)
        stop = decide.verdict(progress, self.size, smaller, options.max_retries)
        if stop is not None:
            self._give_up(
                exc,
                f"{stop.why}; batch of {self.n} samples, smallest chunk tried {progress.smallest}",
                "Pass smaller batches, free memory held elsewhere in the process, "
                "or give it a larger memory budget.",
            )
        progress.pending = self.devices.recoveries(progress.ran_out)

    def _noted(self, exc: BaseException) -> None:
        """Count an out-of-memory error, and keep what a retry needs to know of it."""
        decide.noted(self.progress, exc, self.events)

    def _refuse_changed(self, exc: BaseException) -> None:
        """Give up when the failed attempt changed a tensor of the call's arguments in place:
        a retry would run on what it left."""
        if self.before is None:
            return
        names = inplace.changed(
            self.batch.args, self.batch.kwargs, self.before, self.batch.labels_by_place()
        )
        if names:
            self._give_up(
                exc,
                inplace.refusal(names),
                "Change the input out of place inside the call (x = x / 255, not x.div_(255)), "
                "or before calling it.",
                error=SplitRefusedError,
            )

    def _check_took(self, output: Any) -> None:
        """Take the output of a run of the row check; refuse the call if its rows depend
        on each other."""
        self.checking = False
        check, shape = self.check, self.shape
        assert check is not None
        assert shape is not None
        assert self.checks is not None
        found = check.took(output)
        if found is not None:
            refusal = (f"its rows depend on each other: {found}", _COUPLED)
            self.refuse(refusal)
            self._give_up(None, *refusal, error=SplitRefusedError)
        if check.done:
            self.checks.add(shape.key)
            self.check = None

    def _check_raised(self, exc: BaseException) -> bool:
        """A run of the row check raised. Out of memory, a callable whose rows passed a
        check before goes on unchecked; one never checked runs it again once, after the
        memory is recovered, and is refused if it runs out again. Anything else refuses
        the call."""
        self.checking = False
        check = self.check
        assert check is not None
        if is_oom(exc):
            self._noted(exc)
            self.progress.pending = self.devices.recoveries(self.progress.ran_out)
            if self.checks:  # its rows passed a check before: this call goes on unchecked
                self.check = None
                return True
            if not check.retried:
                check.retried = True
                return True
            self._give_up(
                exc,
                "it was split for the first time, and the check that its rows are "
                f"independent ran out of memory running {check.rows} of them again (chunks of "
                "one row are checked against a run of two)",
                "Pass smaller batches, or free memory held elsewhere in the process.",
                error=SplitRefusedError,
            )
        refusal = (
            f"its rows depend on each other: {check.rows} rows of its first chunk, computed "
            f"on their own, raised {type(exc).__name__}: {exc}",
            _COUPLED,
        )
        self.refuse(refusal)
        self._give_up(exc, *refusal, error=SplitRefusedError)

    def _refuse_left_out(self) -> None:
        problem = self.batch.left_out(self.n)
        if problem is not None:
            raise BatchError(f"{self.events.name}: {problem}")

    def _stopped_backward(self) -> None:
        """A retry or chunk tried to run ``backward()``: the call accumulates gradients.

        From now on the guard never splits this callable. A call that has not
        run out of memory runs again whole; one that has gives up.
        """
        self.refuse(BACKWARD_REFUSAL)
        if self.progress.ooms:
            self._give_up(None, *BACKWARD_REFUSAL, error=SplitRefusedError)
        self.check = None
        self.checking = False
        self.progress.chunk = self.n
        self.outputs.clear()
        self.chunked = False

    def _give_up(
        self,
        exc: BaseException | None,
        what: str,
        advice: str,
        error: type[OutOfMemoryError] = OutOfMemoryError,
    ) -> NoReturn:
        """Raise our OutOfMemoryError (or ``error``) from ``exc``, or from the last OOM once
        it is gone, with the device's memory state."""
        progress = self.progress
        device = progress.ran_out if exc is None else decide.named(oom_device(exc), self.device)
        message = decide.unrecovered(
            self.events.name, progress, device, self.memory, self.events, self.devices, what
        )
        raise error(f"{message} {advice}") from (exc or progress.last_oom)

    def result(self) -> Any:
        """The output of the whole call, merged from its chunks if it was split."""
        outputs = self.outputs
        if outputs.sizes == [self.n]:
            return outputs.pieces[0]
        self.events.merged(self.where, max(outputs.sizes))
        try:
            return outputs.merged(self.options.merge, self._recovering)
        except Exception as exc:
            if not is_oom(exc):
                raise
            self._give_up(
                exc,
                f"its batch of {self.n} samples ran in {len(outputs.sizes)} chunks, "
                "but merging their outputs did not fit",
                "Pass smaller batches, or a merge= that keeps the outputs apart.",
            )


BACKWARD_REFUSAL = (
    "it calls backward(), and the guard does not retry or split a call that accumulates "
    "gradients: chunks of it would not add up to the whole batch's gradients",
    "Its gradients hold what the failed attempt accumulated before it ran out, if anything: "
    "zero them, then run the step again with a smaller batch, or accumulate the gradients "
    "of micro-batches yourself.",
)


_COUPLED = (
    "A call whose outputs are normalised over its batch (a softmax or a standardisation "
    "over the samples) or that mixes its samples cannot be split: move that out of the "
    "guarded call. A module whose batch is not on dimension 0 takes batch_dim=. A call whose "
    "rows differ only by its kernels' numerics takes check_rows=False."
)

# A chunk of fewer rows than this may take kernels of its own (a matrix times a vector).
_FEW_ROWS = 8
