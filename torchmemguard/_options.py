"""The options of ``oom_safe`` and ``guard``: declared once, checked once."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypedDict

from torchmemguard._errors import check_int, raise_bad_arguments
from torchmemguard._structures import MergeHook, SplitHook


class GuardOptions(TypedDict, total=False):
    """The keyword options of :func:`~torchmemguard.oom_safe` and
    :func:`~torchmemguard.guard`; :func:`~torchmemguard.oom_safe` documents each."""

    batch_args: str | Sequence[str] | None
    whole_args: str | Sequence[str]
    min_chunk: int
    max_retries: int
    grow_after: int
    split: SplitHook | None
    merge: MergeHook | None
    batch_dim: int | None
    check_rows: bool


@dataclass(frozen=True)
class Options:
    """The options of one guard, checked: names as tuples, numbers in range."""

    batch_args: tuple[str, ...] | None = None
    whole_args: tuple[str, ...] = ()
    min_chunk: int = 1
    max_retries: int = 16
    grow_after: int = 16
    split: SplitHook | None = None
    merge: MergeHook | None = None
    batch_dim: int | None = None
    check_rows: bool = True

    @classmethod
    def of(cls, caller: str, given: Mapping[str, object]) -> Options:
        """The options ``given`` to ``caller``, checked; every problem in one error.

        Raises TypeError for unknown names or values of the wrong type, else
        ValueError for values out of range.
        """
        known = [field.name for field in dataclasses.fields(cls)]
        wrong_type = [
            f"{caller}() got an unexpected option {name!r}; its options are {known}"
            for name in given
            if name not in known
        ]
        wrong_value: list[str] = []
        values = {name: value for name, value in given.items() if name in known}
        for option in ("batch_args", "whole_args"):
            names = values.get(option)
            if isinstance(names, str):
                names = (names,)
            if names is None:
                continue
            if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
                wrong_type.append(
                    f"{option} must be a name or a sequence of names, got {values[option]!r}"
                )
            else:
                values[option] = tuple(names)
        for option, low in (("min_chunk", 1), ("max_retries", 1), ("grow_after", 1)):
            if option in values:
                check_int(option, values[option], low, wrong_type, wrong_value)
        if values.get("batch_dim") is not None:
            check_int("batch_dim", values["batch_dim"], 0, wrong_type, wrong_value)
        if "check_rows" in values and not isinstance(values["check_rows"], bool):
            wrong_type.append(f"check_rows must be True or False, got {values['check_rows']!r}")
        for option in ("split", "merge"):
            hook = values.get(option)
            if hook is not None and not callable(hook):
                wrong_type.append(f"{option} must be callable or None, got {hook!r}")
        raise_bad_arguments(wrong_type, wrong_value)
        return cls(**values)  # type: ignore[arg-type]
