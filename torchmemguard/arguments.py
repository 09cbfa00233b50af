"""Find the batch arguments of a call, and put chunks in their place."""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Sequence
from typing import Any

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class _Slot:
    """Where one batch argument sits in a call: a position, a keyword, or both."""

    __slots__ = ("keyword", "label", "position")

    def __init__(self, label: str, position: int | None, keyword: str | None) -> None:
        self.label = label
        self.position = position
        self.keyword = keyword


class BatchPlan:
    """Which arguments of a callable hold the batch, worked out once.

    ``batch_args=None`` means the first positional argument after ``self``.
    """

    def __init__(self, fn: Callable[..., Any], batch_args: Sequence[str] | None) -> None:
        target = fn.__func__ if isinstance(fn, (classmethod, staticmethod)) else fn
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"cannot read the signature of {fn!r}: {exc}") from exc
        params = list(signature.parameters.values())
        positional = [p.name for p in params if p.kind in _POSITIONAL]
        has_var_args = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
        has_var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        # A plain function that turns out to be a method is called bound, with
        # ``self`` taken out of the arguments; a bound callable never sees it.
        self.self_offset = 1 if isinstance(target, types.FunctionType) else 0
        self._positional = positional
        self._has_var_args = has_var_args
        self._cache: dict[int, list[_Slot]] = {}
        if batch_args is None:
            self.names: tuple[str, ...] | None = None
            if not positional and not has_var_args:
                raise TypeError(
                    f"{getattr(target, '__qualname__', target)!r} takes no positional argument "
                    "to split; name the batch with batch_args=(...)"
                )
            return
        names = tuple(batch_args)
        if not names:
            raise ValueError("batch_args must name at least one argument, got ()")
        if len(set(names)) != len(names):
            raise ValueError(f"batch_args names an argument twice: {names!r}")
        known = {p.name: p for p in params}
        for name in names:
            param = known.get(name)
            if param is None and not has_var_kwargs:
                raise TypeError(
                    f"batch_args names {name!r}, but {getattr(target, '__qualname__', target)} "
                    f"has no such argument; its arguments are {list(known)}"
                )
            if param is not None and param.kind in (
                inspect.Parameter.VAR_POSITIONAL,
                inspect.Parameter.VAR_KEYWORD,
            ):
                raise TypeError(f"batch_args cannot name the catch-all argument {name!r}")
        self.names = names

    def skip(self, instance: object) -> int:
        """How many leading parameters a call leaves out: wrapt takes ``self`` (or
        ``cls``) out of the arguments whenever it passes an instance."""
        return self.self_offset if instance is not None else 0

    def slots(self, skip: int) -> list[_Slot]:
        """The batch arguments' places when the first ``skip`` parameters are bound."""
        slots = self._cache.get(skip)
        if slots is None:
            positional = self._positional[skip:]
            if self.names is None:
                if positional:
                    slots = [_Slot(positional[0], 0, positional[0])]
                else:
                    slots = [_Slot("args[0]", 0, None)]
            else:
                slots = [
                    _Slot(n, positional.index(n) if n in positional else None, n)
                    for n in self.names
                ]
            self._cache[skip] = slots
        return slots

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
        if slot.position is not None and slot.position < len(args):
            return True, args[slot.position]
        if slot.keyword is not None and slot.keyword in kwargs:
            return True, kwargs[slot.keyword]
        return False, None

    @staticmethod
    def replace(
        slots: list[_Slot],
        values: list[Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``args`` and ``kwargs`` with each passed batch argument set to its value."""
        new_args = list(args)
        new_kwargs = dict(kwargs)
        for slot, value in zip(slots, values, strict=True):
            if slot.position is not None and slot.position < len(args):
                new_args[slot.position] = value
            elif slot.keyword is not None and slot.keyword in kwargs:
                new_kwargs[slot.keyword] = value
        return tuple(new_args), new_kwargs
