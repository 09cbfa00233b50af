"""Find the batch arguments of a call, and put chunks in their place."""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from torchmemguard._errors import raise_bad_arguments
from torchmemguard._fitting import CallShape, Group, ShapeKey
from torchmemguard._layout import PLAIN, Layout
from torchmemguard._structures import (
    BatchInfo,
    SplitHook,
    batch_size_of,
    cloned,
    describe,
    has_rows,
    is_broadcast,
    split,
)

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_CATCH_ALL = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


class _Slot:
    """Where one batch argument sits in a call: a position, a keyword, or both."""

    __slots__ = ("keyword", "label", "position")

    def __init__(self, label: str, position: int | None, keyword: str | None) -> None:
        self.label = label
        self.position = position
        self.keyword = keyword


@dataclass(frozen=True)
class Unsplittable:
    """What keeps a call from being split, in words."""

    reason: str

    def __str__(self) -> str:
        return self.reason


@dataclass
class BoundBatch:
    """The plan bound to one call: its arguments that may be split, in the order that
    finds the batch, and the rest."""

    names: tuple[str, ...] | None  # the plan's batch_args
    lists: bool  # lists of samples are split
    hook: SplitHook | None  # cuts values of the user's own types
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    owner: object = None  # the module or instance whose method is called, if any
    scope: Hashable = None  # tells the size memory apart the instances of one method
    layout: Layout = PLAIN  # where the batch lies in each argument
    labels: list[str] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)  # with the batch on dimension 0
    places: list[int | str] = field(default_factory=list)  # a position, or a keyword
    # Named batch_args only: the arguments that go whole without being declared so.
    others: list[tuple[str, Any]] = field(default_factory=list)

    def shape(self) -> tuple[CallShape, torch.device | None] | Unsplittable:
        """The call's shape for the size memory, and the batch's device; or what keeps
        the call from being split."""
        n = self.size()
        if isinstance(n, Unsplittable):
            return n
        info = BatchInfo()
        for value in self.values:
            describe(value, n, info)
        device = info.device
        if device is None and isinstance(self.owner, torch.nn.Module):
            param = next(self.owner.parameters(), None)
            device = None if param is None else param.device
        group = Group(self.scope, device, info.dtype)
        key = ShapeKey(self.scope, device, info.dtype, tuple(info.shapes))
        return CallShape(n, key, group, info.bytes_per_sample, info.dtype), device

    def chunk(
        self, n: int, start: int, stop: int, copy: bool = False
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's arguments with samples ``start:stop`` of its batch of ``n``: views of
        the batch, or with ``copy``, copies of them."""
        values = []
        for value, label in zip(self.values, self.labels, strict=True):
            piece = split(value, n, start, stop, self.hook, label, self.lists)
            values.append(self.layout.outward(label, cloned(piece) if copy else piece))
        return self.replace(values, self.args, self.kwargs)

    def labels_by_place(self) -> dict[int | str, str]:
        """The name of each batch argument, by its position or keyword."""
        return dict(zip(self.places, self.labels, strict=True))

    def size(self) -> int | Unsplittable:
        """The batch size, or what keeps the call from being split."""
        if not self.values:
            return Unsplittable("no batch argument was passed, so there is nothing to split")
        problems = [
            problem
            for label, value in zip(self.labels, self.values, strict=True)
            if (problem := self.layout.problem(label, value)) is not None
        ]
        if problems:
            return Unsplittable("; ".join(problems))
        sizes = [batch_size_of(value, self.hook, self.lists) for value in self.values]
        empty = [label for label, size in zip(self.labels, sizes, strict=True) if size is None]
        nothing = (
            f"{_quoted(empty)} {_verb(empty, 'holds')} nothing to split "
            "(no tensor with a batch dimension and no list of samples); pass the batch as "
            "a tensor or a list, or a split= hook that cuts your own type"
        )
        if self.names is None:
            found = [size for size in sizes if size is not None]
            return found[0] if found else Unsplittable(nothing)
        if empty:
            return Unsplittable(f"batch {_plural(empty, 'argument')} {nothing}")
        # A batch argument whose leading size is a broadcast does not disagree.
        n = next((size for size in sizes if not is_broadcast(size)), sizes[0]) or 0
        if any(size != n and not is_broadcast(size) for size in sizes):
            found_sizes = ", ".join(
                f"{label}={size}" for label, size in zip(self.labels, sizes, strict=True)
            )
            return Unsplittable(
                f"the batch arguments disagree on the batch size: {found_sizes}; name in "
                "batch_args only the arguments with one row per sample"
            )
        return n

    def left_out(self, n: int) -> str | None:
        """With named batch arguments, name every other argument that holds the batch's
        ``n`` rows and was not declared whole: each chunk would get all of its rows."""
        if n <= 1:
            return None
        names = [
            name
            for name, value in self.others
            if has_rows(self.layout.inward(name, value), n, self.hook, self.lists)
        ]
        if not names:
            return None
        listed = ", ".join(repr(name) for name in (*(self.names or ()), *names))
        return (
            f"{_plural(names, 'argument')} {_quoted(names)} "
            f"{_verb(names, 'has', 'have')} the batch's {n} leading rows but "
            f"{_verb(names, 'is', 'are')} not in batch_args, so every chunk would get "
            f"{_verb(names, 'it', 'them')} whole and answer wrongly. Split "
            f"{_verb(names, 'it', 'them')} too with batch_args=({listed}), or, if "
            f"{_verb(names, 'it is', 'they are')} shared by all samples, say so with "
            f"whole_args=({_quoted(names)}{',' if len(names) == 1 else ''})"
        )

    def add(self, label: str, value: Any, place: int | str) -> None:
        self.labels.append(label)
        self.values.append(self.layout.inward(label, value))
        self.places.append(place)

    def replace(
        self, values: list[Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``args`` and ``kwargs`` with each of these arguments set to its new value."""
        new_args = list(args)
        new_kwargs = dict(kwargs)
        for place, value in zip(self.places, values, strict=True):
            if isinstance(place, int):
                new_args[place] = value
            else:
                new_kwargs[place] = value
        return tuple(new_args), new_kwargs


class BatchPlan:
    """Which arguments of a callable hold the batch, worked out once.

    ``batch_args=None`` splits every argument that holds the batch's rows; the
    batch size is read from the first positional argument after ``self``, or,
    when that holds no batch, from the first argument that does. Named
    ``batch_args`` split only those. ``whole_args`` always go whole, and so do
    the arguments that the ``layout`` says are shared by every sample, unless
    named in ``batch_args``. With ``lists=False`` only tensors are split, and
    lists go whole, as options do.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        batch_args: Sequence[str] | None,
        whole_args: Sequence[str] = (),
        lists: bool = True,
        hook: SplitHook | None = None,
        layout: Layout = PLAIN,
    ) -> None:
        target = fn.__func__ if isinstance(fn, (classmethod, staticmethod)) else fn
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"cannot read the signature of {fn!r}: {exc}") from exc
        params = list(signature.parameters.values())
        self._positional = [p.name for p in params if p.kind in _POSITIONAL]
        # A plain function that turns out to be a method is called bound, with
        # ``self`` taken out of the arguments; a bound callable never sees it.
        self.self_offset = 1 if isinstance(target, types.FunctionType) else 0
        self.lists = lists
        self.hook = hook
        self.layout = layout
        self._cache: dict[int, list[_Slot]] = {}
        whole = tuple(whole_args)
        wrong_type = _unknown(params, "whole_args", whole, getattr(target, "__qualname__", fn))
        wrong_value = []
        self.whole = frozenset(whole)
        self.names: tuple[str, ...] | None = None
        if batch_args is not None:
            names = tuple(batch_args)
            if not names:
                wrong_value.append("batch_args must name at least one argument, got ()")
            if len(set(names)) != len(names):
                wrong_value.append(f"batch_args names an argument twice: {names!r}")
            both = [name for name in names if name in self.whole]
            if both:
                wrong_value.append(f"batch_args and whole_args both name {both}")
            wrong_type += _unknown(params, "batch_args", names, getattr(target, "__qualname__", fn))
            self.names = names
        raise_bad_arguments(wrong_type, wrong_value)

    def skip(self, instance: object) -> int:
        """How many leading parameters a call leaves out: wrapt takes ``self`` (or
        ``cls``) out of the arguments whenever it passes an instance."""
        return self.self_offset if instance is not None else 0

    def slots(self, skip: int) -> list[_Slot]:
        """The places of the arguments that set the batch size, when the first
        ``skip`` parameters are bound: the named ones, or the first positional."""
        slots = self._cache.get(skip)
        if slots is None:
            positional = self._positional[skip:]
            if self.names is not None:
                slots = [
                    _Slot(n, positional.index(n) if n in positional else None, n)
                    for n in self.names
                ]
            elif positional:
                slots = [_Slot(positional[0], 0, positional[0])]
            else:
                slots = [_Slot("args[0]", 0, None)]
            self._cache[skip] = slots
        return slots

    def bind(
        self,
        skip: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        owner: object = None,
        scope: Hashable = None,
    ) -> BoundBatch:
        """One call bound: the arguments that may be split are the named batch arguments,
        or every argument but ``whole_args`` with the first positional one first."""
        bound = BoundBatch(
            self.names, self.lists, self.hook, args, kwargs, owner, scope, self.layout
        )
        slots = self.slots(skip)
        if self.names is not None:
            for slot in slots:
                passed, value = self.get(slot, args, kwargs)
                if passed:
                    place = slot.position if _positional(slot, args) else slot.keyword
                    bound.add(slot.label, value, place)  # type: ignore[arg-type]
            bound.others = [
                (name, value)
                for name, value in self.others(skip, slots, args, kwargs)
                if name not in self.whole
            ]
            return bound
        names = self._positional[skip:]
        first = slots[0].label
        found = [
            (names[i] if i < len(names) else f"args[{i}]", value, i) for i, value in enumerate(args)
        ] + [(name, value, name) for name, value in kwargs.items()]
        found.sort(key=lambda item: item[0] != first)  # stable: the rest keep their order
        whole = self.whole.union(self.layout.whole)
        for label, value, place in found:
            if label not in whole:
                bound.add(label, value, place)
        return bound

    def others(
        self, skip: int, slots: list[_Slot], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> list[tuple[str, Any]]:
        """The arguments of a call that are not batch arguments, with their names."""
        names = self._positional[skip:]
        taken = {slot.position for slot in slots} | {slot.keyword for slot in slots}
        found = [
            (names[i] if i < len(names) else f"args[{i}]", value)
            for i, value in enumerate(args)
            if i not in taken
        ]
        found += [(name, value) for name, value in kwargs.items() if name not in taken]
        return found

    @staticmethod
    def get(slot: _Slot, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bool, Any]:
        """``(True, value)`` for a batch argument that was passed, else ``(False, None)``."""
        if _positional(slot, args):
            return True, args[slot.position]  # type: ignore[index]
        if slot.keyword is not None and slot.keyword in kwargs:
            return True, kwargs[slot.keyword]
        return False, None


def _positional(slot: _Slot, args: tuple[Any, ...]) -> bool:
    return slot.position is not None and slot.position < len(args)


def _unknown(
    params: list[inspect.Parameter], option: str, names: tuple[str, ...], owner: object
) -> list[str]:
    """What is wrong with the argument names in ``option``, one entry a name."""
    known = {p.name: p for p in params}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    problems = []
    for name in names:
        if not isinstance(name, str):
            problems.append(f"{option} must hold argument names, got {name!r}")
            continue
        param = known.get(name)
        if param is None and not takes_any:
            problems.append(
                f"{option} names {name!r}, but {owner} has no such argument; "
                f"its arguments are {list(known)}"
            )
        elif param is not None and param.kind in _CATCH_ALL:
            problems.append(f"{option} cannot name the catch-all argument {name!r}")
    return problems


def _quoted(names: list[str]) -> str:
    return ", ".join(repr(name) for name in names)


def _plural(names: list[str], word: str) -> str:
    return word if len(names) == 1 else f"{word}s"


def _verb(names: list[str], one: str, many: str = "") -> str:
    """``one`` for a single name, else ``many`` (the plural of a verb in -s by default)."""
    if len(names) == 1:
        return one
    return many or one.removesuffix("s")
