"""Split batch arguments along dimension 0, and merge chunk outputs back.

The rules:

* A tensor whose dimension 0 equals the batch size is split; any other tensor
  (a broadcast ``position_ids`` of shape ``(1, L)``, a scalar) goes whole to
  every chunk.
* A ``list`` is a sequence of samples: split and concatenated like a tensor.
* Dataclasses, Mappings, namedtuples and tuples are structure: they are
  traversed, and rebuilt as the same type.
* ``None`` stays ``None``; any other value goes whole to every chunk, unless a
  user ``split`` hook turns it into a chunk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from typing import Any

import torch

from torchmemguard.errors import MergeError

_VALUES = (int, float, complex, str, bytes)

SplitHook = Callable[[Any, int, int], Any]
MergeHook = Callable[[list[Any]], Any]


def _is_dataclass_instance(value: object) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _is_namedtuple(value: object) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def _children(value: object) -> list[Any] | None:
    """The items of a structure in traversal order, or None for a leaf."""
    if _is_dataclass_instance(value):
        return [getattr(value, f.name) for f in dataclasses.fields(value) if f.init]  # type: ignore[arg-type]
    if isinstance(value, Mapping):
        return list(value.values())
    if isinstance(value, tuple):
        return list(value)
    return None


def _rebuild(template: Any, items: Sequence[Any]) -> Any:
    """A structure of the same type as ``template`` holding ``items``."""
    if _is_dataclass_instance(template):
        names = [f.name for f in dataclasses.fields(template) if f.init]
        return dataclasses.replace(template, **dict(zip(names, items, strict=True)))
    if isinstance(template, Mapping):
        data = dict(zip(template.keys(), items, strict=True))
        if type(template) is dict:
            return data
        try:
            return type(template)(data)  # type: ignore[call-arg]
        except Exception as exc:
            raise TypeError(
                f"cannot rebuild a {type(template).__qualname__} from a dict; "
                "pass split= and merge= hooks to oom_safe for this type"
            ) from exc
    if _is_namedtuple(template):
        return type(template)(*items)
    if type(template) is tuple:
        return tuple(items)
    return type(template)(items)


def _leading_sizes(value: object, hook: SplitHook | None) -> Iterator[int]:
    """The leading sizes of the tensors and sample lists inside ``value``, in order."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0:
            yield value.shape[0]
        return
    if isinstance(value, list):
        yield len(value)
        return
    children = _children(value)
    if children is None:
        if hook is not None and isinstance(value, Sized) and not isinstance(value, _VALUES):
            yield len(value)  # a batch of the user's own type, cut by the hook
        return
    for child in children:
        yield from _leading_sizes(child, hook)


def batch_size_of(value: object, hook: SplitHook | None = None) -> int | None:
    """The batch size of ``value``: the leading size of its first tensor or sample list.

    A leading size of 1 is a broadcast (a ``position_ids`` of shape ``(1, L)``):
    it is the batch size only when no other size is found. With a split
    ``hook``, a sized value of another type counts as a sample list.
    """
    found = None
    for size in _leading_sizes(value, hook):
        if size != 1:
            return size
        found = size
    return found


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
    for child in _children(value) or ():
        describe(child, n, info)


def split(value: Any, n: int, start: int, stop: int, hook: SplitHook | None = None) -> Any:
    """The samples ``start:stop`` of ``value``, a batch of ``n`` samples.

    The ``hook`` is asked first about every value; it returns the value itself
    for the values it leaves to the built-in rules.
    """
    if hook is not None and value is not None:
        piece = hook(value, start, stop)
        if piece is not value:
            return piece
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == n:
            return value[start:stop]
        return value
    if isinstance(value, list):
        return value[start:stop] if len(value) == n else value
    children = _children(value)
    if children is not None:
        return _rebuild(value, [split(c, n, start, stop, hook) for c in children])
    return value


def merge(outputs: list[Any], sizes: list[int], path: str = "output") -> Any:
    """Concatenate the outputs of consecutive chunks of ``sizes`` samples each."""
    first = outputs[0]
    if not isinstance(first, _VALUES) and all(out is first for out in outputs):
        # None, or the very same object from every chunk: it does not depend
        # on the samples, so it stands for the whole batch as it is. Numbers
        # and strings are left out: equal ones are often the same cached
        # object, like the count of two equal chunks.
        return first
    if isinstance(first, torch.Tensor):
        if all(
            isinstance(out, torch.Tensor) and out.dim() > 0 and out.shape[0] == size
            for out, size in zip(outputs, sizes, strict=True)
        ):
            return torch.cat(outputs, dim=0)
        shapes = [
            tuple(out.shape) if isinstance(out, torch.Tensor) else type(out) for out in outputs
        ]
        raise MergeError(
            f"{path}: chunks of {sizes} samples returned tensors of shapes {shapes}, "
            "which are not one row per sample (a reduced value such as a mean loss?); "
            "concatenating them would be wrong. Pass merge= to oom_safe to combine them."
        )
    if isinstance(first, list):
        if all(
            isinstance(out, list) and len(out) == size
            for out, size in zip(outputs, sizes, strict=True)
        ):
            return [item for out in outputs for item in out]
        lengths = [len(out) if isinstance(out, list) else type(out) for out in outputs]
        raise MergeError(
            f"{path}: chunks of {sizes} samples returned lists of lengths {lengths}, "
            "not one item per sample. Pass merge= to oom_safe to combine them."
        )
    children = _children(first)
    if children is None or any(type(out) is not type(first) for out in outputs):
        types = sorted({type(out).__qualname__ for out in outputs})
        raise MergeError(
            f"{path}: cannot merge chunk outputs of type {', '.join(types)}: only tensors, "
            "lists of samples, None and structures of them merge. "
            "Pass merge= to oom_safe to combine them."
        )
    if _is_dataclass_instance(first):
        labels = [f"{path}.{f.name}" for f in dataclasses.fields(first) if f.init]
    elif isinstance(first, Mapping):
        keys = list(first.keys())
        if any(list(out.keys()) != keys for out in outputs):
            raise MergeError(
                f"{path}: the chunks returned mappings with different keys; "
                "pass merge= to oom_safe to combine them"
            )
        labels = [f"{path}[{key!r}]" for key in keys]
    else:
        if any(len(out) != len(first) for out in outputs):
            raise MergeError(
                f"{path}: the chunks returned tuples of different lengths; "
                "pass merge= to oom_safe to combine them"
            )
        labels = [f"{path}[{i}]" for i in range(len(first))]
    columns = zip(*(_children(out) or () for out in outputs), strict=True)
    return _rebuild(
        first,
        [merge(list(col), sizes, label) for col, label in zip(columns, labels, strict=True)],
    )
