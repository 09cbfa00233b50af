"""Merge the outputs of a split call's chunks into the whole batch's output.

Each chunk's output is checked as soon as it comes back, so that an output
that cannot merge stops the call at the first chunk that shows it, not after
every chunk ran.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch

from torchmemguard import _filling as filling
from torchmemguard._arrays import concatenate, is_array
from torchmemguard._arrays import problem as array_problem
from torchmemguard._errors import MergeError
from torchmemguard._structures import VALUES, children, labels, rebuild

# The ``first`` output while the first chunk itself is checked: None is an output.
FIRST = object()
_ASK = "Pass merge= to oom_safe to combine them."


class Merger:
    """Checks chunk outputs as they come back, and merges them in order.

    Tensors and NumPy arrays are concatenated along their batch dimension
    (``dim_of(path)``, dimension 0 by default): each chunk's must have one row
    per sample there,
    and the same shape elsewhere, unless the tensor's path is padded
    (``pad_paths``, every path when None), where shorter ones are padded with
    ``pad_value`` on ``side``. Lists of samples are joined,
    structures are merged item by item and rebuilt as their type, and an object
    that every chunk returned identically stands for the whole batch. A call
    that answers ``rows_per_sample`` rows for each sample (several candidates per
    prompt) has that many rows per sample in every tensor and list, in order.
    """

    def __init__(
        self,
        pad_value: float | None = None,
        side: Literal["left", "right"] = "right",
        pad_paths: frozenset[str] | None = None,
        advice: str = _ASK,
        dim_of: Callable[[str], int] | None = None,
        rows_per_sample: int = 1,
        refused: Mapping[str, str] | None = None,
    ) -> None:
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        if pad_value is not None and (
            isinstance(pad_value, bool) or not isinstance(pad_value, (int, float))
        ):
            raise TypeError(f"pad_value must be a number, got {pad_value!r}")
        self.pad_value = pad_value
        self.side = side
        self.pad_paths = pad_paths
        self.advice = advice  # what to do instead, at the end of every error
        self.dim_of = dim_of or _first
        self.per_sample = rows_per_sample
        self.refused = refused or {}  # why the outputs at these paths never merge

    def __call__(self, outputs: list[Any]) -> Any:
        """Merge ``outputs``, each chunk's size read from its first tensor or list."""
        return self.merge(outputs, [_rows(out) // self.per_sample for out in outputs])

    def pads(self, path: str) -> bool:
        """Whether the tensors at ``path`` are padded to a common length."""
        return self.pad_value is not None and (self.pad_paths is None or path in self.pad_paths)

    def _unpadded(self, path: str) -> bool:
        return not self.pads(path)

    def check(
        self,
        output: Any,
        size: int,
        first: Any = FIRST,
        first_size: int = 0,
        path: str = "output",
    ) -> None:
        """Raise MergeError if ``output``, of a chunk of ``size`` samples, cannot merge.

        ``first`` is the first chunk's output (of ``first_size`` samples), or
        :data:`FIRST` while ``output`` is it: what depends on the other chunks (an object
        shared by all of them, a tensor that may be one) is judged from the
        second chunk on.
        """
        if first is FIRST:
            self._check_alone(output, path)
            return
        if output is first and not isinstance(output, VALUES):
            return  # the same object from every chunk so far
        if isinstance(output, VALUES):
            raise MergeError(
                f"{path}: a chunk returned the {type(output).__name__} {output!r}; numbers and "
                f"strings do not merge (is it a count or a reduced value?). {self.advice}"
            )
        if _rows_of_values(output) or _rows_of_values(first):
            self._check_rows(output, size, first, first_size, path)
            return
        if isinstance(output, list) or isinstance(first, list):
            for out, rows in ((first, first_size), (output, size)):
                if not isinstance(out, list) or len(out) != rows * self.per_sample:
                    found = len(out) if isinstance(out, list) else type(out).__qualname__
                    raise MergeError(
                        f"{path}: a chunk of {rows} samples returned {found!r} where a list of "
                        f"{self._per_sample_text.replace('row', 'item')} was expected. "
                        f"{self.advice}"
                    )
            return
        items = children(output)
        if items is None:
            kinds = sorted({type(first).__qualname__, type(output).__qualname__})
            raise MergeError(
                f"{path}: cannot merge chunk outputs of type {', '.join(kinds)}: only tensors, "
                f"lists of samples, None and structures of them merge. {self.advice}"
            )
        firsts: list[Any] = [FIRST] * len(items)
        if first is not FIRST:
            firsts = self._same_structure(output, first, path)
        for item, first_item, label in zip(items, firsts, labels(output, path), strict=True):
            self.check(item, size, first_item, first_size, label)

    def _check_alone(self, output: Any, path: str) -> None:
        """What the first chunk's output shows by itself: a cache, or what the merger
        was told never merges.

        Anything else may still be an object that every chunk returns as it is.
        """
        if path in self.refused and output is not None:
            raise MergeError(f"{path}: {self.refused[path]} {self.advice}")
        if is_array(output) and (why := array_problem(output)) is not None:
            raise MergeError(f"{path}: a chunk returned {why}. {self.advice}")
        if _is_cache(output):
            raise MergeError(
                f"{path}: a chunk returned a key-value cache ({type(output).__qualname__}), and "
                "the chunks' caches do not make the whole batch's. Ask for no cache back "
                "(use_cache=False, or return_dict_in_generate=False for generate()). "
                f"{self.advice}"
            )
        items = None if isinstance(output, (torch.Tensor, list)) else children(output)
        for item, label in zip(items or (), labels(output, path) if items else (), strict=True):
            self._check_alone(item, label)

    def _check_rows(self, output: Any, size: int, first: Any, first_size: int, path: str) -> None:
        """Tensors or NumPy arrays: one row per sample along the batch dimension and the same
        shape beyond it; tensors also on one device, or padded where the path is."""
        tensor = isinstance(first, torch.Tensor)
        same = isinstance(output, torch.Tensor) if tensor else is_array(first) and is_array(output)
        if not same:
            raise MergeError(
                f"{path}: the chunks returned a {type(first).__qualname__} and a "
                f"{type(output).__qualname__}. {self.advice}"
            )
        noun, nouns = ("a tensor", "tensors") if tensor else ("an array", "arrays")
        dim = self.dim_of(path)
        for out, rows in ((first, first_size), (output, size)):
            why = None if tensor else array_problem(out)
            if why is None and (out.ndim <= dim or out.shape[dim] != rows * self.per_sample):
                why = (
                    f"{noun} of shape {tuple(out.shape)}, which is not {self._per_sample_text} "
                    "(a reduced value such as a mean loss?); concatenating the chunks would be "
                    "wrong"
                )
            if why is not None:
                raise MergeError(f"{path}: a chunk of {rows} samples returned {why}. {self.advice}")
        shapes = f"{tuple(first.shape)} and {tuple(output.shape)}"
        if tensor and output.device != first.device:
            raise MergeError(
                f"{path}: the chunks returned tensors on {first.device} and {output.device}"
            )
        if tensor and self.pads(path):
            if output.ndim != first.ndim:
                raise MergeError(
                    f"{path}: the chunks returned tensors of shapes {shapes}, which have "
                    "different numbers of dimensions"
                )
        elif _without(output.shape, dim) != _without(first.shape, dim):
            hint = ""
            if tensor:  # merge_padded pads tensors
                hint = (
                    " (sequences of different lengths?). Pass "
                    "merge=torchmemguard.merge_padded(pad_value=...) to pad them"
                )
            raise MergeError(
                f"{path}: the chunks returned {nouns} of shapes {shapes}, which differ beyond "
                f"dimension {dim}{hint}. {self.advice}"
            )

    def _same_structure(self, output: Any, first: Any, path: str) -> list[Any]:
        """The items of ``first``, once ``output`` is known to be built like it."""
        if type(output) is not type(first):
            raise MergeError(
                f"{path}: the chunks returned a {type(first).__qualname__} and a "
                f"{type(output).__qualname__}. {self.advice}"
            )
        if isinstance(first, Mapping) and list(output.keys()) != list(first.keys()):
            raise MergeError(
                f"{path}: the chunks returned mappings with the keys {list(first.keys())} and "
                f"{list(output.keys())}. {self.advice}"
            )
        found = children(first) or []
        if len(found) != len(children(output) or []):
            raise MergeError(
                f"{path}: the chunks returned {type(first).__qualname__}s of lengths "
                f"{len(found)} and {len(output)} (per-step outputs of different step counts?). "
                f"{self.advice}"
            )
        return found

    def merge(self, outputs: list[Any], sizes: list[int], path: str = "output") -> Any:
        """The whole batch's output from the chunks' ``outputs`` of ``sizes`` samples."""
        for out, size in zip(outputs, sizes, strict=True):
            first = outputs[0] if out is not outputs[0] else FIRST
            self.check(out, size, first, sizes[0], path)
        return self._join(outputs, path)

    @property
    def _per_sample_text(self) -> str:
        return (
            "one row per sample" if self.per_sample == 1 else f"{self.per_sample} rows per sample"
        )

    def whole_of(self, output: Any, size: int, n: int) -> Any:
        """The output of a call of ``n`` samples, allocated from its first chunk's
        ``output`` of ``size`` samples, for the chunks to be copied into
        (:meth:`fill`); None where the output does not fill in (see
        :mod:`torchmemguard._filling`). An out-of-memory error passes through."""
        k = self.per_sample
        return filling.allocated(output, size * k, n * k, self.dim_of, self._unpadded)

    def fill(self, whole: Any, output: Any, offset: int, size: int) -> bool:
        """Copy a chunk's ``output`` of ``size`` samples into ``whole`` from row ``offset``.

        False where a tensor of it cannot be copied as it is (another dtype or
        device, a tensor in a graph): the rows before ``offset`` then hold the
        chunks so far, and the call keeps the chunks apart from there on.
        """
        k = self.per_sample
        return filling.copied(whole, output, offset * k, size * k, self.dim_of)

    def rows(self, whole: Any, start: int, count: int) -> Any:
        """Rows ``start`` to ``start + count`` of ``whole``, as views."""
        k = self.per_sample
        return filling.narrowed(whole, start * k, count * k, self.dim_of)

    def _join(self, outputs: list[Any], path: str) -> Any:
        first = outputs[0]
        if all(out is first for out in outputs):
            return first
        if isinstance(first, torch.Tensor):
            dim = self.dim_of(path)
            if self.pads(path):
                outputs = filling.padded(outputs, self.pad_value or 0, self.side, dim)
            return torch.cat(outputs, dim=dim)
        if isinstance(first, list):
            return [item for out in outputs for item in out]
        if is_array(first):
            return concatenate(outputs, self.dim_of(path))
        columns = zip(*(children(out) or () for out in outputs), strict=True)
        merged = [
            self._join(list(column), label)
            for column, label in zip(columns, labels(first, path), strict=True)
        ]
        try:
            return rebuild(first, merged)
        except TypeError as exc:
            raise MergeError(f"{path}: {exc}") from exc.__cause__


def merge_padded(pad_value: float = 0, side: Literal["left", "right"] = "right") -> Merger:
    """A ``merge=`` for outputs whose chunks differ in length beyond dimension 0.

    Tensors are padded with ``pad_value`` on ``side`` of every dimension past
    the first, to the largest size among the chunks, then concatenated: the
    sequences of a generation whose chunks stopped at different lengths, for
    example::

        @oom_safe(merge=merge_padded(pad_value=tokenizer.pad_token_id))
        def complete(input_ids, attention_mask): ...
    """
    return Merger(pad_value=pad_value, side=side)


def _rows(output: Any) -> int:
    """The number of samples in a chunk's output: its first tensor's or list's length."""
    if isinstance(output, torch.Tensor):
        return output.shape[0] if output.dim() > 0 else 0
    if isinstance(output, list):
        return len(output)
    if is_array(output):
        return output.shape[0] if output.ndim > 0 else 0
    for item in children(output) or ():
        if isinstance(item, (torch.Tensor, list)) or is_array(item) or children(item) is not None:
            return _rows(item)
    return 0


def _rows_of_values(value: object) -> bool:
    """Whether ``value`` is a tensor or a NumPy array: rows of values, merged by rows."""
    return isinstance(value, torch.Tensor) or is_array(value)


def _first(path: str) -> int:
    return 0


def _without(shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    return (*shape[:dim], *shape[dim + 1 :])


def _is_cache(value: object) -> bool:
    """Whether ``value`` is a transformers key-value cache (without importing transformers)."""
    return any(
        cls.__name__ == "Cache" and cls.__module__.startswith("transformers")
        for cls in type(value).__mro__
    )
