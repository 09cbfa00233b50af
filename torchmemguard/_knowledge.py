"""What the guards of one callable learn together: the sizes that fit, the call shapes
whose rows were checked, and why calls cannot be split, if they cannot.

A guard made again for the same function, the same bound method of the same
instance, or the same module, with equal options, shares the knowledge of the
earlier ones, kept weakly by what they guard.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any

from torchmemguard import _device as devices
from torchmemguard._events import Refusal
from torchmemguard._independence import Checked
from torchmemguard._options import Options
from torchmemguard._sizing import SizeMemory


class Knowledge:
    """What calls of one callable taught its guards: the sizes that fit, the call shapes
    whose rows were checked, and why calls cannot be split, if they cannot."""

    def __init__(self, options: Options) -> None:
        self.memory = SizeMemory(
            grow_after=options.grow_after, room=devices.room, fragments=devices.fragments
        )
        self.checks = Checked() if options.check_rows else None
        self.refusal: Refusal | None = None

    def refuse(self, refusal: Refusal) -> None:
        """Note that calls cannot be split: from now on they run whole, as is, and one
        that runs out of memory is refused."""
        self.refusal = refusal
        self.memory.clear()  # an empty memory sends every call down the direct path


# The knowledge of each guarded object, by what guards it and how: a guard made again
# for the same callable (a decorator applied inside a request handler) starts from
# what the earlier ones learned. Weakly keyed, so a callable's knowledge goes with it.
_known: weakref.WeakKeyDictionary[Any, dict[Hashable, Knowledge]] = weakref.WeakKeyDictionary()
_known_lock = threading.Lock()


def knowledge_of(owner: Any, key: Hashable, options: Options) -> Knowledge:
    """The knowledge that the guards of ``owner`` made as ``key`` with ``options`` share;
    a knowledge of its own where ``owner`` cannot be referred to weakly."""
    with _known_lock:
        try:
            kept = _known.setdefault(owner, {})
            found = kept.get((key, options))
        except TypeError:  # not weakly referable, or an option that cannot be hashed
            return Knowledge(options)
        if found is None:
            found = kept[key, options] = Knowledge(options)
        return found


def knowledge_of_callable(fn: Callable[..., Any], options: Options) -> Knowledge:
    """The shared knowledge of ``oom_safe(fn)``: by its instance and function for a
    bound method, which is made anew on each attribute access."""
    owner = getattr(fn, "__self__", None)
    func = getattr(fn, "__func__", None)
    if owner is None or func is None:
        return knowledge_of(fn, "oom_safe", options)
    return knowledge_of(owner, ("oom_safe", func), options)
