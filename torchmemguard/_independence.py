"""Checking that a split call answers what the whole batch would.

Splitting is exact only when each sample's output depends on that sample
alone. An output normalised over the batch (a softmax over candidates, a
standardisation), a recurrent module split along time, or a loss with
in-batch negatives breaks that, with no error to show it. So the first time a
callable is split for a shape of call, the guard runs a few of its first
chunk's rows again on their own, once every chunk ran, and compares
(:func:`difference`); a training step compares
the loss of a small sub-batch with the weighted losses of its halves. What
differs by more than the numerics of the dtype allow is refused, and the
refusal is remembered.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Any

import torch

from torchmemguard._arrays import is_array
from torchmemguard._filling import padded
from torchmemguard._merging import Merger
from torchmemguard._structures import VALUES, children, labels

# The largest difference, relative to the largest value compared, that the
# numerics of a dtype explain: kernels that block or reduce differently for
# another batch size (TF32 on CUDA for float32) and low-precision rounding.
_TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 5e-3,
    torch.float16: 3e-2,
    torch.bfloat16: 1e-1,
}
_LOW_PRECISION = 2e-1  # float8 and the like

# The most shapes a guard remembers as checked; past that, the oldest is checked again.
_REMEMBERED = 1024


def tolerance(dtypes: Iterable[torch.dtype | None]) -> float:
    """The tolerance of the least precise floating dtype among ``dtypes``."""
    found = 0.0
    for dtype in dtypes:
        if dtype is not None and (dtype.is_floating_point or dtype.is_complex):
            real = dtype.to_real() if dtype.is_complex else dtype
            found = max(found, _TOLERANCE.get(real, _LOW_PRECISION))
    return found or _TOLERANCE[torch.float32]


def compute_dtypes(device: torch.device | None, module: object) -> list[torch.dtype | None]:
    """The dtypes a call may compute in beside its outputs': the autocast dtype in force
    on the batch's device, and the parameters' of the module called."""
    found: list[torch.dtype | None] = []
    kind = device.type if device is not None else "cpu"
    try:
        if torch.is_autocast_enabled(kind):
            found.append(torch.get_autocast_dtype(kind))
    except (RuntimeError, TypeError):  # a device type autocast does not know
        pass
    if isinstance(module, torch.nn.Module):
        found.extend({p.dtype for p in module.parameters()})
    return found


def difference(
    alone: Any,
    together: Any,
    start: int,
    merger: Merger,
    dtypes: list[torch.dtype | None],
    path: str = "output",
    rows: bool = True,
) -> str | None:
    """How the outputs of rows computed ``alone`` differ from the same rows inside the
    output of a larger run, ``together``, where they start at row ``start``; None when
    they agree within the tolerance of the least precise of ``dtypes`` and their own.
    With ``rows=False``, the two are compared whole (the items of a list of samples)."""
    if alone is together or alone is None or isinstance(alone, VALUES):
        return None  # the same object for every chunk, or what never merges
    if is_array(alone) and is_array(together):
        try:
            alone, together = torch.tensor(alone), torch.tensor(together)
        except TypeError:  # a dtype torch has not: what the merge refuses, or strings
            if rows:
                start *= merger.per_sample
                together = together[start : start + len(alone)]
            same = alone.shape == together.shape and bool((alone == together).all())
            return None if same else f"{path}: {alone!r} alone against {together!r} together"
    if isinstance(alone, torch.Tensor) and isinstance(together, torch.Tensor):
        return _tensors(alone, together, start, rows, merger, dtypes, path)
    if isinstance(alone, list) and isinstance(together, list):
        if rows:
            start *= merger.per_sample
            together = together[start : start + len(alone)]
        if len(alone) != len(together):
            return f"{path}: {len(alone)} items alone against {len(together)} together"
        for i, (one, other) in enumerate(zip(alone, together, strict=True)):
            found = difference(one, other, 0, merger, dtypes, f"{path}[{i}]", rows=False)
            if found is not None:
                return found
        return None
    items, others = children(alone), children(together)
    if items is None or others is None or len(items) != len(others):
        return None  # what the merge refuses on its own
    for one, other, label in zip(items, others, labels(alone, path), strict=True):
        found = difference(one, other, start, merger, dtypes, label, rows)
        if found is not None:
            return found
    return None


def _tensors(
    alone: torch.Tensor,
    together: torch.Tensor,
    start: int,
    rows: bool,
    merger: Merger,
    dtypes: list[torch.dtype | None],
    path: str,
) -> str | None:
    dim = merger.dim_of(path)
    tol = tolerance([*dtypes, alone.dtype])
    if rows:
        if together.dim() <= dim or alone.dim() <= dim:
            return None  # not one row per sample: the merge refuses it
        start *= merger.per_sample
        together = together.narrow(dim, start, min(alone.shape[dim], together.shape[dim] - start))
    if alone.device != together.device:
        return None
    if rows and merger.pads(path) and alone.dim() == together.dim():
        alone, together = padded([alone, together], merger.pad_value or 0, merger.side, dim)
    if alone.shape != together.shape:
        return (
            f"{path}: the rows alone gave shape {tuple(alone.shape)}, and the same rows "
            f"with the rest of their chunk {tuple(together.shape)}"
        )
    if not (alone.dtype.is_floating_point or alone.dtype.is_complex):
        if torch.equal(alone, together):
            return None
        first = tuple((alone != together).nonzero()[0].tolist())
        return (
            f"{path} at {list(first)} of the rows alone: {alone[first].item()!r} alone "
            f"against {together[first].item()!r} with the rest of their chunk"
        )
    if alone.is_complex():
        one = torch.view_as_real(alone.detach().to(torch.complex128))
        other = torch.view_as_real(together.detach().to(torch.complex128))
    else:
        one, other = alone.detach().to(torch.float64), together.detach().to(torch.float64)
    finite = torch.isfinite(one) & torch.isfinite(other)
    same_nan = torch.isnan(one) & torch.isnan(other)
    odd = ~finite & ~same_nan & (one != other)
    if bool(odd.any()):
        where = tuple(odd.nonzero()[0].tolist())
        return _report(path, where, one, other, "not finite in one of them")
    if not bool(finite.any()):
        return None
    gap = torch.where(finite, (one - other).abs(), torch.zeros_like(one))
    scale = max(float(one[finite].abs().max()), float(other[finite].abs().max()))
    largest = float(gap.max())
    if largest <= tol * scale or largest == 0.0:
        return None
    where = tuple(torch.nonzero(gap == largest)[0].tolist())
    return _report(
        path,
        where,
        one,
        other,
        f"a difference of {largest:.3g} where values reach {scale:.3g} "
        f"(the dtype's numerics explain {tol:g} of that)",
    )


def _report(
    path: str, where: tuple[int, ...], one: torch.Tensor, other: torch.Tensor, what: str
) -> str:
    return (
        f"{path} at {list(where)} of the rows alone: {float(one[where]):.6g} alone against "
        f"{float(other[where]):.6g} with the rest of their chunk, {what}"
    )


class Checked:
    """The call shapes of one callable whose rows were checked, bounded and thread-safe."""

    def __init__(self) -> None:
        self._keys: OrderedDict[Hashable, None] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._keys

    def __bool__(self) -> bool:
        return bool(self._keys)

    def add(self, key: Hashable) -> None:
        """Note that ``key`` was checked."""
        with self._lock:
            self._keys[key] = None
            self._keys.move_to_end(key)
            while len(self._keys) > _REMEMBERED:
                self._keys.popitem(last=False)

    def clear(self) -> None:
        """Forget every check."""
        with self._lock:
            self._keys.clear()


_PENDING = object()
_Call = tuple[tuple[Any, ...], dict[str, Any]]


class RowCheck:
    """One check of a split call's rows: prepared before its first chunk runs, then,
    once every chunk ran, a few runs of some of the first chunk's rows on their own,
    then a verdict. Run last, a check of a shape the kernels were not asked for
    yet leaves the call's own chunks the memory they had.

    ``s`` rows (an eighth of the chunk, at least one) run alone twice over: the
    rows from the chunk's second on, and, where the chunk holds them apart, its
    last ``s``. They run on copies of their inputs taken before the chunk ran (so
    a call that changes its inputs in place is checked on what it was given),
    and their outputs are compared with the same rows of the chunk's output.
    The first rows start one row in because a recurrent module split along time
    computes a chunk's first rows as it would alone: only rows after the first
    show that they depend on those before. Two sets of rows, because an output
    normalised over the batch can look the same for one set by chance (a
    saturated softmax, whose largest row is among them). A chunk of one row
    cannot hold rows one row in: a run of two rows stands in for it.

    Rows that differ run alone once more: when that run differs from the first,
    the call is random (dropout, sampling) and is left unchecked; when it agrees,
    the rows depend on each other.
    """

    def __init__(
        self,
        batch: Any,
        n: int,
        size: int,
        merger: Merger,
        dtypes: list[torch.dtype | None],
    ) -> None:
        self.rows = max(size // 8, 1)
        self.merger = merger
        self.dtypes = dtypes
        self.shared = size >= self.rows + 1  # the chunk itself holds the rows one row in
        # What is left to run: the stand-in for the chunk, then rows alone, by their
        # first row in the chunk.
        self.runs: list[tuple[int | None, _Call]] = []
        if not self.shared:
            self.runs.append((None, batch.chunk(n, 0, self.rows + 1, copy=True)))
        starts = [1] if size < 2 * self.rows + 1 else [1, size - self.rows]
        for start in starts:
            self.runs.append((start, batch.chunk(n, start, start + self.rows, copy=True)))
        self.together: Any = _PENDING
        self.first: Any = _PENDING  # rows that differed, as they came out the first time
        self.found: str | None = None  # how they differed
        self.started = False
        self.retried = False  # a run ran out of memory, and is made again

    def chunk_ran(self, output: Any) -> None:
        """Take the output of the chunk the check was prepared for."""
        if self.shared:
            self.together = output
        self.started = True

    def next_args(self) -> _Call | None:
        """The arguments of the next run of the check, or None while none is due."""
        if not self.started or not self.runs:
            return None
        return self.runs[0][1]

    def took(self, output: Any) -> str | None:
        """Take the output of the run just made. Returns how rows differed, once it is
        known that they depend on each other; None otherwise (see :attr:`done`)."""
        start, call = self.runs.pop(0)
        if start is None:
            self.together = output
            return None
        if self.found is None:
            self.found = difference(output, self.together, start, self.merger, self.dtypes)
            if self.found is not None:
                self.first = output
                self.runs = [(start, call)]  # once more, to tell chance from coupling
            return None
        if difference(output, self.first, 0, self.merger, self.dtypes) is not None:
            self.runs = []  # a random call: it cannot be checked
            self.found = None
            return None
        return self.found

    @property
    def done(self) -> bool:
        """Whether every run of the check was made."""
        return self.started and not self.runs
