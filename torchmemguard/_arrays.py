"""NumPy arrays, found without importing NumPy.

NumPy is not a dependency: a value is an array only when NumPy was imported
by someone else already, so that nothing changes, and nothing is imported,
in a process without it.
"""

from __future__ import annotations

import sys
from typing import Any


def is_array(value: object) -> bool:
    """Whether ``value`` is a NumPy ``ndarray``."""
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.ndarray)


def concatenate(arrays: list[Any], axis: int) -> Any:
    """``arrays`` joined along ``axis``."""
    numpy = sys.modules["numpy"]
    return numpy.concatenate(arrays, axis=axis)


def problem(array: Any) -> str | None:
    """Why the rows of ``array`` cannot be merged with other chunks' whatever their
    shapes: an array of Python objects, or one of no dimension."""
    if array.dtype.kind == "O":
        return "an array of Python objects, which cannot be compared or merged exactly"
    if array.ndim == 0:
        return f"a 0-d array ({array.item()!r}), a reduced value rather than one row per sample"
    return None


def fillable_array(array: Any) -> bool:
    """Whether a chunk's ``array`` is copied into the whole batch's as it is: a plain
    array of numbers, not a subclass (a masked array, a matrix)."""
    numpy = sys.modules["numpy"]
    return type(array) is numpy.ndarray and array.dtype.kind in "biufc"


def empty_like_rows(array: Any, dim: int, n: int) -> Any:
    """An uninitialised array like ``array``, with ``n`` rows along ``dim``."""
    numpy = sys.modules["numpy"]
    shape = list(array.shape)
    shape[dim] = n
    return numpy.empty(shape, dtype=array.dtype)


def rows_of(array: Any, dim: int, start: int, count: int) -> Any:
    """Rows ``start`` to ``start + count`` of ``array`` along ``dim``, as a view."""
    index = [slice(None)] * array.ndim
    index[dim] = slice(start, start + count)
    return array[tuple(index)]
