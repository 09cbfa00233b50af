"""Seeing that an attempt changed its inputs in place.

A call that changes an input in place (``x.div_(255)``) and then runs out of
memory leaves that input changed: a retry, or the chunks after it, would
compute on changed rows and answer wrongly. Every tensor counts its in-place
changes (``Tensor._version``, shared by its views, so the chunks of a batch
count on the batch). The guard reads the counts of a call's tensors before an
attempt, and compares them after it fails: a change refuses the retry.

Inference tensors (made under ``torch.inference_mode()``) keep no count, so a
change to them cannot be seen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

_Tensor = torch.Tensor
_LEAVES = (int, float, str, bool, type(None))
_NO_COUNT = -1  # an inference tensor


def versions(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[int]:
    """The in-place change counts of the tensors in a call's arguments, in order.

    On the happy path: a loop over the arguments, descending only into tuples,
    dicts and Mappings, and into lists that start with a tensor. It raises
    RuntimeError at a tensor of the arguments that keeps no count (an inference
    tensor): read such calls with :func:`careful_versions`.
    """
    found: list[int] = []
    for value in args:
        if isinstance(value, _Tensor):
            found.append(value._version)
        elif not isinstance(value, _LEAVES):
            _collect(value, found)
    if kwargs:
        for value in kwargs.values():
            if isinstance(value, _Tensor):
                found.append(value._version)
            elif not isinstance(value, _LEAVES):
                _collect(value, found)
    return found


def careful_versions(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[int]:
    """:func:`versions`, with -1 for the tensors that keep no count."""
    found: list[int] = []
    for value in (*args, *kwargs.values()):
        _collect(value, found)
    return found


def _collect(value: Any, found: list[int]) -> None:
    if isinstance(value, _Tensor):
        found.append(_NO_COUNT if value.is_inference() else value._version)
    elif isinstance(value, (tuple, dict)) or (
        isinstance(value, list) and value and isinstance(value[0], (_Tensor, tuple, dict))
    ):
        for item in value.values() if isinstance(value, dict) else value:
            _collect(item, found)
    elif isinstance(value, Mapping):
        for item in value.values():
            _collect(item, found)


def refusal(names: list[str]) -> str:
    """Why a retry is refused after an attempt changed the arguments ``names`` in place."""
    listed = ", ".join(repr(name) for name in names)
    return (
        f"the attempt that ran out of memory had changed {listed} in place, "
        "so a retry would compute on the changed values"
    )


def changed(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    before: list[int],
    names: Mapping[int | str, str] | None = None,
) -> list[str]:
    """The arguments holding a tensor changed in place since ``before`` was read, by
    their ``names`` (a position or keyword's name), else as ``args[i]`` or the keyword."""
    names = names or {}
    found: list[str] = []
    places = [(names.get(i, f"args[{i}]"), value) for i, value in enumerate(args)]
    places += [(names.get(name, name), value) for name, value in kwargs.items()]
    index = 0
    for name, value in places:
        now: list[int] = []
        _collect(value, now)
        if now != before[index : index + len(now)]:
            found.append(name)
        index += len(now)
    return found
