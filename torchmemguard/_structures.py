"""Find the batch inside argument values, and cut it along dimension 0.

The rules:

* A tensor whose dimension 0 equals the batch size is split; any other tensor
  (a broadcast ``position_ids`` of shape ``(1, L)``, a scalar) goes whole to
  every chunk. Sparse COO tensors are cut too; other sparse layouts are refused.
* A ``list`` is a sequence of samples: split like a tensor when its length is
  the batch size. So is a NumPy array whose leading size is the batch size.
* Dataclasses, Mappings, namedtuples and tuples are structure: they are
  traversed, and rebuilt as the same type.
* ``None`` stays ``None``; any other value goes whole to every chunk, unless a
  user ``split`` hook turns it into a chunk.

Merging the outputs back is :mod:`torchmemguard._merging`.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from typing import Any

import torch

from torchmemguard._arrays import is_array
from torchmemguard._errors import BatchError, BatchTypeError

# Plain values: never a batch, and never merged as one.
VALUES = (int, float, complex, str, bytes)

SplitHook = Callable[[Any, int, int], Any]
MergeHook = Callable[[list[Any]], Any]


def _is_dataclass_instance(value: object) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _is_namedtuple(value: object) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def children(value: object) -> list[Any] | None:
    """The items of a structure in traversal order, or None for a leaf."""
    if _is_dataclass_instance(value):
        return [getattr(value, f.name) for f in dataclasses.fields(value) if f.init]  # type: ignore[arg-type]
    if isinstance(value, Mapping):
        return list(value.values())
    if isinstance(value, tuple):
        return list(value)
    return None


def labels(value: object, path: str) -> list[str]:
    """The path of each item of the structure ``value``, for messages."""
    if _is_dataclass_instance(value):
        return [f"{path}.{f.name}" for f in dataclasses.fields(value) if f.init]  # type: ignore[arg-type]
    if isinstance(value, Mapping):
        return [f"{path}[{key!r}]" for key in value]
    return [f"{path}[{i}]" for i in range(len(value))]  # type: ignore[arg-type]


def rebuild(template: Any, items: Sequence[Any]) -> Any:
    """A structure of the same type as ``template`` holding ``items``.

    Raises :class:`~torchmemguard._errors.BatchTypeError` for a Mapping type that cannot
    be built from a dict.
    """
    if _is_dataclass_instance(template):
        names = [f.name for f in dataclasses.fields(template) if f.init]
        return dataclasses.replace(template, **dict(zip(names, items, strict=True)))
    if isinstance(template, Mapping):
        data = dict(zip(template.keys(), items, strict=True))
        if type(template) is dict:
            return data
        if isinstance(template, collections.defaultdict):
            rebuilt = type(template)(template.default_factory)
            rebuilt.update(data)
            return rebuilt
        try:
            return type(template)(data)  # type: ignore[call-arg]
        except Exception as exc:
            raise BatchTypeError(
                f"cannot rebuild a {type(template).__qualname__} from a dict; "
                "pass split= and merge= hooks to oom_safe for this type"
            ) from exc
    if _is_namedtuple(template):
        return type(template)(*items)
    if type(template) is tuple:
        return tuple(items)
    return type(template)(items)


def _leading_sizes(value: object, hook: SplitHook | None, lists: bool) -> Iterator[int]:
    """The leading sizes of the tensors and sample lists inside ``value``, in order."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0:
            yield value.shape[0]
        return
    if isinstance(value, list):
        if lists:
            yield len(value)
        return
    if is_array(value):
        if value.ndim > 0:  # type: ignore[attr-defined]
            yield value.shape[0]  # type: ignore[attr-defined]
        return
    items = children(value)
    if items is None:
        if hook is not None and isinstance(value, Sized) and not isinstance(value, VALUES):
            yield len(value)  # a batch of the user's own type, cut by the hook
        return
    for item in items:
        yield from _leading_sizes(item, hook, lists)


# The leading size that may be a broadcast rather than the batch (a ``position_ids``
# of shape ``(1, L)``): the batch size only when no other size is found.
BROADCAST = 1


def is_broadcast(size: int | None) -> bool:
    """Whether a leading ``size`` may be a broadcast rather than the batch (:data:`BROADCAST`)."""
    return size == BROADCAST


def batch_size_of(value: object, hook: SplitHook | None = None, lists: bool = True) -> int | None:
    """The batch size of ``value``: the leading size of its first tensor or sample list.

    A leading size that may be a broadcast (:func:`is_broadcast`) is the batch
    size only when no other size is found. With a split
    ``hook``, a sized value of another type counts as a sample list. With
    ``lists=False``, lists are not samples.
    """
    found = None
    for size in _leading_sizes(value, hook, lists):
        if not is_broadcast(size):
            return size
        found = size
    return found


def has_rows(value: object, n: int, hook: SplitHook | None = None, lists: bool = True) -> bool:
    """Whether ``value`` holds a tensor or sample list with ``n`` leading rows."""
    return any(size == n for size in _leading_sizes(value, hook, lists))


@dataclasses.dataclass
class BatchInfo:
    """What the size memory needs to know about the batch of one call."""

    device: torch.device | None = None
    dtype: torch.dtype | None = None
    shapes: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    bytes_per_sample: int = 0


def describe(value: object, n: int, info: BatchInfo) -> None:
    """Add to ``info`` the split tensors inside ``value`` (batch size ``n``)."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == n:
            if info.device is None:
                info.device = value.device
                info.dtype = value.dtype
            info.shapes.append(tuple(value.shape[1:]))
            info.bytes_per_sample += value.numel() // max(n, 1) * value.element_size()
        return
    if isinstance(value, list):
        return
    if is_array(value):
        # Its rows count, not its device: a model may take NumPy in and run elsewhere.
        if value.ndim > 0 and value.shape[0] == n:  # type: ignore[attr-defined]
            info.shapes.append(tuple(value.shape[1:]))  # type: ignore[attr-defined]
            info.bytes_per_sample += value.nbytes // max(n, 1)  # type: ignore[attr-defined]
        return
    for item in children(value) or ():
        describe(item, n, info)


def split(
    value: Any,
    n: int,
    start: int,
    stop: int,
    hook: SplitHook | None = None,
    path: str = "batch",
    lists: bool = True,
) -> Any:
    """The samples ``start:stop`` of ``value``, a batch of ``n`` samples.

    The ``hook`` is asked first about every value; it returns the value itself
    for the values it leaves to the built-in rules. ``path`` names ``value`` in
    errors. With ``lists=False``, lists go whole.
    """
    if hook is not None and value is not None:
        piece = hook(value, start, stop)
        if piece is not value:
            return piece
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != n:
            return value
        if value.layout is torch.strided:
            return value[start:stop]
        if value.layout is torch.sparse_coo:
            return value.narrow_copy(0, start, stop - start)
        raise BatchError(
            f"{path} is a {value.layout} tensor, which cannot be cut along dimension 0; "
            "convert it to a dense or sparse COO tensor, or pass a split= hook"
        )
    if isinstance(value, list):
        return value[start:stop] if lists and len(value) == n else value
    if is_array(value):
        return value[start:stop] if value.ndim > 0 and value.shape[0] == n else value
    items = children(value)
    if items is None:
        return value
    return rebuild(
        value,
        [
            split(item, n, start, stop, hook, label, lists)
            for item, label in zip(items, labels(value, path), strict=True)
        ],
    )


def cloned(value: Any) -> Any:
    """``value`` with every tensor inside it copied: what a check runs on, so that a call
    that changes its inputs in place changes none of the caller's."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, list):
        return [cloned(item) for item in value]
    if is_array(value):
        return value.copy()
    items = children(value)
    return value if items is None else rebuild(value, [cloned(item) for item in items])
