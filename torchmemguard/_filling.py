"""The whole batch's output of a split call, allocated from its first chunk's and
filled in as the chunks return; and padding to a common length.

Filled in, a split call holds one output of the whole batch rather than every
chunk's and, at the end, their concatenation too: the merge takes half the
memory, and no chunk's output stays behind, between the blocks the next chunks
free, to cut the free memory into pieces too small for them (glibc's heap on
the CPU, a CUDA allocator's segments). Outputs made of None, plain dense
tensors outside any autograd graph and NumPy arrays of numbers fill in, unless
they are padded. ``dim_of(path)`` gives the batch dimension of the tensors at
``path``; ``fills(path)`` says whether the tensors there may fill in at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from torchmemguard._arrays import empty_like_rows, fillable_array, is_array, rows_of
from torchmemguard._structures import children, labels, rebuild

DimOf = Callable[[str], int]


class _Unfillable(Exception):
    """An output that is not filled in."""


def allocated(output: Any, size: int, n: int, dim_of: DimOf, fills: Callable[[str], bool]) -> Any:
    """``output``'s structure, with tensors of ``n`` rows for its tensors' ``size``, for
    the chunks to be copied into; None where the output does not fill in. An
    out-of-memory error passes through."""
    try:
        return _allocated(output, size, n, dim_of, fills, "output")
    except _Unfillable:
        return None


def _allocated(
    output: Any, size: int, n: int, dim_of: DimOf, fills: Callable[[str], bool], path: str
) -> Any:
    if output is None:
        return None
    if isinstance(output, torch.Tensor):
        dim = dim_of(path)
        if (
            not fillable(output)
            or not fills(path)
            or output.dim() <= dim
            or output.shape[dim] != size
        ):
            raise _Unfillable  # the merge's own checks say why, where it is wrong
        shape = list(output.shape)
        shape[dim] = n
        return output.new_empty(shape)
    if is_array(output):
        dim = dim_of(path)
        if not fillable_array(output) or output.ndim <= dim or output.shape[dim] != size:
            raise _Unfillable
        return empty_like_rows(output, dim, n)
    items = children(output)
    if items is None:
        raise _Unfillable
    found = [
        _allocated(item, size, n, dim_of, fills, label)
        for item, label in zip(items, labels(output, path), strict=True)
    ]
    return rebuild(output, found)


def copied(
    whole: Any, output: Any, offset: int, size: int, dim_of: DimOf, path: str = "output"
) -> bool:
    """Copy a chunk's ``output`` of ``size`` rows into ``whole`` from row ``offset``;
    False where a tensor of it cannot be copied as it is (another dtype or device, a
    tensor in a graph)."""
    if whole is None:
        return output is None
    if isinstance(whole, torch.Tensor):
        if not (
            isinstance(output, torch.Tensor)
            and fillable(output)
            and output.dtype == whole.dtype
            and output.device == whole.device
        ):
            return False
        whole.narrow(dim_of(path), offset, size).copy_(output)
        return True
    if is_array(whole):
        if not (fillable_array(output) and output.dtype == whole.dtype):
            return False
        rows_of(whole, dim_of(path), offset, size)[...] = output
        return True
    items = children(output)
    return items is not None and all(
        copied(part, item, offset, size, dim_of, label)
        for part, item, label in zip(children(whole) or (), items, labels(whole, path), strict=True)
    )


def narrowed(whole: Any, start: int, count: int, dim_of: DimOf, path: str = "output") -> Any:
    """Rows ``start`` to ``start + count`` of ``whole``, as views."""
    if whole is None:
        return None
    if isinstance(whole, torch.Tensor):
        return whole.narrow(dim_of(path), start, count)
    if is_array(whole):
        return rows_of(whole, dim_of(path), start, count)
    parts = children(whole) or []
    found = [
        narrowed(part, start, count, dim_of, label)
        for part, label in zip(parts, labels(whole, path), strict=True)
    ]
    return rebuild(whole, found)


def fillable(tensor: torch.Tensor) -> bool:
    """Whether a chunk's ``tensor`` is copied into the whole batch's as it is: a plain
    dense tensor, outside any autograd graph."""
    return (
        type(tensor) is torch.Tensor
        and tensor.layout is torch.strided
        and not tensor.requires_grad
        and not tensor.is_quantized
    )


def padded(
    tensors: list[torch.Tensor], value: float, side: str, batch_dim: int = 0
) -> list[torch.Tensor]:
    """``tensors`` padded with ``value`` to the same size in every dimension but the
    batch's."""
    target = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
    found = []
    for tensor in tensors:
        widths: list[int] = []
        for dim in reversed(range(tensor.dim())):
            missing = 0 if dim == batch_dim else target[dim] - tensor.shape[dim]
            widths += (0, missing) if side == "right" else (missing, 0)
        found.append(
            torch.nn.functional.pad(tensor, widths, value=value) if any(widths) else tensor
        )
    return found
