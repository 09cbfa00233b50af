"""Which methods of a guarded module are entry points, guarded like its calls.

``forward`` always is: libraries call it directly (sentence-transformers calls
``getattr(model, "forward")``). So are the entry points of the libraries
recognised here, found by the module's class alone, without importing them:
transformers' ``generate`` (see :mod:`torchmemguard._integrations.generate`), and
sentence-transformers' ``encode`` and its variants. ``guard(module,
methods=...)`` adds others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torchmemguard._errors import raise_bad_arguments
from torchmemguard._events import Refusal
from torchmemguard._guarded import Guard

# The entry points of sentence-transformers' models, where a model has them.
_SENTENCE_TRANSFORMERS = ("encode", "encode_query", "encode_document")


def entry_points(module: Any, methods: Sequence[str]) -> tuple[str, ...]:
    """The methods of ``module``, beside ``forward`` and ``generate``, to guard: the
    recognised ones, then ``methods``. Raises ValueError naming, at once, every name
    in ``methods`` that is not a method of ``module`` or is guarded already."""
    if isinstance(methods, str) or not all(isinstance(name, str) for name in methods):
        raise TypeError(f"methods must be a sequence of method names, got {methods!r}")
    wrong = []
    for name in methods:
        if name in ("forward", "generate"):
            wrong.append(f"methods names {name!r}, which every guarded module guards already")
        elif not callable(getattr(module, name, None)):
            wrong.append(
                f"methods names {name!r}, which {type(module).__qualname__} has no method of"
            )
    raise_bad_arguments([], wrong)
    known: tuple[str, ...] = ()
    if _sentence_transformers(module):
        known = tuple(n for n in _SENTENCE_TRANSFORMERS if callable(getattr(module, n, None)))
    return tuple(dict.fromkeys(known + tuple(methods)))


def _sentence_transformers(module: Any) -> bool:
    """Whether ``module`` is a sentence-transformers model."""
    return type(module).__module__.startswith("sentence_transformers.")


class EncodeGuard(Guard):
    """The guard of a sentence-transformers ``encode()``, or of one of its variants."""

    def refusal_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Refusal | None:
        if "output_value" in kwargs and kwargs["output_value"] is None:
            return (
                "encode(output_value=None) returns each text's outputs padded to the longest "
                "text of its inner batch, and a chunk's inner batches are padded otherwise",
                "Ask for output_value='sentence_embedding' or 'token_embeddings', or encode "
                "batches that fit whole.",
            )
        return self.refusal


def guard_class(module: Any, name: str) -> type[Guard]:
    """The kind of guard that the method ``name`` of ``module`` takes."""
    return (
        EncodeGuard if _sentence_transformers(module) and name in _SENTENCE_TRANSFORMERS else Guard
    )
