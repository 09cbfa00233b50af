"""The exceptions that torchmemguard raises."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torchmemguard._device.oom import TorchOutOfMemoryError

T = TypeVar("T")


class TorchMemGuardError(Exception):
    """Base class of every error that torchmemguard raises itself."""


class OutOfMemoryError(TorchMemGuardError, TorchOutOfMemoryError):  # type: ignore[misc,valid-type]
    """A guarded call ran out of memory even at its smallest chunk.

    It subclasses ``torch.OutOfMemoryError``, so handlers written for PyTorch's
    own error still catch it. It is chained from the last out-of-memory error.
    """


class MergeError(TorchMemGuardError, ValueError):
    """The outputs of the chunks of a split call cannot be merged into one."""


class BatchError(TorchMemGuardError, ValueError):
    """A call cannot be split correctly, so the guard refuses to split it.

    Raised before any chunk runs: no batch to split, batch arguments that
    disagree on the batch size, or per-sample arguments that would go whole to
    every chunk. The message names every offending argument.
    """


class BatchTypeError(BatchError, TypeError):
    """A value in the batch is of a type that the guard cannot split or rebuild.

    A :class:`BatchError` that is also a ``TypeError``; pass ``split=`` and
    ``merge=`` hooks for such types.
    """


class SplitRefusedError(OutOfMemoryError, BatchError):
    """A call ran out of memory, and the guard refuses to split or retry it.

    Splitting or retrying it would give different numbers than the whole batch:
    its rows depend on each other (an output normalised over the batch, a loss
    with in-batch negatives), a failed attempt changed its inputs in place, or
    it calls ``backward()``. It is an :class:`OutOfMemoryError` (what happened to
    the call) and a :class:`BatchError` (why the guard cannot help); the message
    names the callable, what was found, and what to do.
    """


class QueueFullError(TorchMemGuardError, RuntimeError):
    """A :class:`~torchmemguard.Batcher` already holds ``max_queue`` waiting requests.

    The request was not queued; nothing else is affected. ``ShedOnOutOfMemory``
    answers it with a 503 and ``Retry-After``.
    """


class BudgetExceededError(TorchMemGuardError, RuntimeError):
    """A :func:`~torchmemguard.memory_budget` cap cannot be honoured at entry.

    Raised when the process already holds more than the cap: memory allocated
    on the accelerator (with ``strict=True``), or, on the CPU, an address
    space larger than the cap.
    """


def raise_bad_arguments(wrong_type: list[str], wrong_value: list[str]) -> None:
    """Raise every problem found with a call's arguments at once, if any: TypeError when
    one has the wrong type (its message lists the wrong values too), else ValueError."""
    if wrong_type or wrong_value:
        raise (TypeError if wrong_type else ValueError)("; ".join(wrong_type + wrong_value))


def gathered(
    wrong_type: list[str], wrong_value: list[str], check: Callable[..., T], *args: Any
) -> T | None:
    """``check(*args)``, or None with its TypeError or ValueError noted in ``wrong_type``
    or ``wrong_value``, for :func:`raise_bad_arguments` to raise with the others."""
    try:
        return check(*args)
    except TypeError as exc:
        wrong_type.append(str(exc))
    except ValueError as exc:
        wrong_value.append(str(exc))
    return None


def check_int(
    name: str, value: object, low: int, wrong_type: list[str], wrong_value: list[str]
) -> None:
    """Note in ``wrong_type`` or ``wrong_value`` what is wrong with the int argument
    ``name``, which must be at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        wrong_type.append(f"{name} must be an int, got {value!r}")
    elif value < low:
        wrong_value.append(f"{name} must be at least {low}, got {value!r}")
