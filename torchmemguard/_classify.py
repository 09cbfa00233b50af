"""Tell out-of-memory errors apart from every other exception."""

from __future__ import annotations

import builtins
import copy
import re
from collections import deque
from collections.abc import Callable

import torch

from torchmemguard import _device as devices

OOMMatcher = Callable[[BaseException], bool]

_OOM_TYPES: tuple[type[BaseException], ...] = (devices.TorchOutOfMemoryError, MemoryError)

# Messages of plain RuntimeErrors that report a failed allocation. "out of memory"
# covers the CUDA, HIP, XPU and MPS allocators and the CUDA driver's own error.
_OOM_MESSAGE = re.compile(
    "|".join(
        [
            r"out of memory",
            r"DefaultCPUAllocator: can't allocate memory",
            r"DefaultCPUAllocator: not enough memory",
            r"CUBLAS_STATUS_ALLOC_FAILED",
            r"CUDNN_STATUS_ALLOC_FAILED",
            r"CUDNN_STATUS_NOT_SUPPORTED",
            r"PT_DEVMEM Allocation failed",
        ]
    ),
    re.IGNORECASE,
)

# Sticky CUDA errors poison the context: every later call fails too, so retrying
# one of them only hides the real fault.
_STICKY_MESSAGE = re.compile(
    "|".join(
        [
            r"illegal memory access",
            # Not bare "device-side assert": every CUDA error ends with a hint
            # on how "to enable device-side assertions".
            r"device-side assert triggered",
            r"unspecified launch failure",
            r"misaligned address",
        ]
    ),
    re.IGNORECASE,
)

# oneDNN (mkldnn), behind torch's CPU convolutions, reports a failed allocation
# only as this; it also means "unsupported", so it counts only under an
# address-space cap, where running out is the likely reason.
_ONEDNN_MESSAGE = re.compile(r"could not create a primitive", re.IGNORECASE)

# Far beyond any real chain or task group, but finite: a chain longer than this
# is not classified at all (see is_oom).
_MAX_CHAIN = 10_000
_GROUP: tuple[type[BaseException], ...] = tuple(
    group for group in [getattr(builtins, "BaseExceptionGroup", None)] if group is not None
)
_matchers: list[OOMMatcher] = []


def register_oom_matcher(matcher: OOMMatcher) -> OOMMatcher:
    """Teach :func:`is_oom` another kind of out-of-memory error.

    ``matcher(exc)`` is asked about every exception of a chain and returns True
    for the ones that mean "out of memory". Returns ``matcher``, so this also
    works as a decorator. A sticky CUDA error in the chain still wins.
    """
    if not callable(matcher):
        raise TypeError(f"matcher must be callable, got {matcher!r}")
    if matcher not in _matchers:
        _matchers.append(matcher)
    return matcher


def unregister_oom_matcher(matcher: OOMMatcher) -> None:
    """Forget a matcher added by :func:`register_oom_matcher`."""
    try:
        _matchers.remove(matcher)
    except ValueError:
        raise ValueError(f"matcher {matcher!r} is not registered") from None


def _chain(exc: BaseException) -> tuple[list[BaseException], bool]:
    """``exc``, the members of groups, causes and contexts, each once; and whether that is all.

    Breadth first, in order: ``exc``, its group members, its cause, its context.
    The second value is False when the walk stopped at ``_MAX_CHAIN`` with more
    left to visit.
    """
    seen: set[int] = set()
    found: list[BaseException] = []
    todo = deque([exc])
    while todo:
        item = todo.popleft()
        if id(item) in seen:
            continue
        if len(found) == _MAX_CHAIN:
            return found, False
        seen.add(id(item))
        found.append(item)
        if isinstance(item, _GROUP):  # asyncio.TaskGroup raises these
            todo.extend(getattr(item, "exceptions", ()))
        if item.__cause__ is not None:
            todo.append(item.__cause__)
        # ``raise X from None`` hides the context: X was not caused by it.
        if item.__context__ is not None and not item.__suppress_context__:
            todo.append(item.__context__)
    return found, True


def message_of(exc: BaseException) -> str:
    """``str(exc)``, or "" (no match) when its ``__str__`` fails."""
    # The exception being classified must pass through untouched, not be
    # replaced by the error of its own __str__.
    try:
        return str(exc)
    except Exception:
        return ""


def _is_sticky(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and bool(_STICKY_MESSAGE.search(message_of(exc)))


def _is_onednn_oom(message: str) -> bool:
    # The limit is read only for this message: other exceptions pay nothing.
    return bool(_ONEDNN_MESSAGE.search(message)) and devices.address_space_capped()


def _matches(exc: BaseException) -> bool:
    if isinstance(exc, _OOM_TYPES):
        return True
    if isinstance(exc, RuntimeError):
        message = message_of(exc)
        if _OOM_MESSAGE.search(message) or _is_onednn_oom(message):
            return True
    return any(_asks(matcher, exc) for matcher in _matchers)


def _asks(matcher: OOMMatcher, exc: BaseException) -> bool:
    # A failing matcher must not replace the exception being classified.
    try:
        return bool(matcher(exc))
    except Exception:
        return False


def is_oom(exc: BaseException) -> bool:
    """Return True when ``exc`` means that a device ran out of memory.

    The exception's ``__cause__`` and ``__context__`` chain and the members of
    exception groups are followed, so an out-of-memory error that a framework
    re-raised as another type still counts. oneDNN's "could not create a
    primitive" counts as running out of CPU memory while an address-space cap
    (``RLIMIT_AS``) is in force. A sticky CUDA error anywhere in the chain
    (illegal memory access, device-side assert, unspecified launch failure,
    misaligned address) makes the answer False: such errors are never retried.
    So does a chain too long to check whole.
    """
    chain, complete = _chain(exc)
    if not complete:
        return False
    if any(_is_sticky(item) for item in chain):
        return False
    return any(_matches(item) for item in chain)


# Which device an allocation failure names, from the allocators' messages:
# "CUDA out of memory. ... GPU 0 has a total capacity ...", "XPU out of memory",
# "MPS backend out of memory", "DefaultCPUAllocator: ...".
_DEVICE_MESSAGES = (
    (re.compile(r"(?:CUDA|HIP|cuBLAS|cuDNN|CUBLAS|CUDNN)\b.*?GPU (\d+)", re.DOTALL), "cuda"),
    (re.compile(r"\b(?:CUDA|HIP|CUBLAS|CUDNN)"), "cuda"),
    (re.compile(r"\bXPU\b"), "xpu"),
    (re.compile(r"\bMPS\b"), "mps"),
    (re.compile(r"DefaultCPUAllocator"), "cpu"),
)


def onednn_failed(exc: BaseException) -> bool:
    """Whether oneDNN's "could not create a primitive" is in the chain of ``exc``.

    After it, oneDNN may refuse every shape it has not built yet, for the rest
    of the process, so the guard retries without oneDNN.
    """
    items, _ = _chain(exc)
    return any(
        isinstance(item, RuntimeError) and bool(_ONEDNN_MESSAGE.search(message_of(item)))
        for item in items
    )


def oom_device(exc: BaseException) -> torch.device | None:
    """The device that an out-of-memory error names, or None when it names none."""
    for item in _chain(exc)[0]:
        if isinstance(item, MemoryError):
            return torch.device("cpu")
        message = message_of(item)
        for pattern, kind in _DEVICE_MESSAGES:
            found = pattern.search(message)
            if found:
                index = found.group(1) if found.groups() else None
                return torch.device(kind, int(index)) if index is not None else torch.device(kind)
        if isinstance(item, RuntimeError) and _is_onednn_oom(message):
            return torch.device("cpu")
    return None


def without_traceback(exc: BaseException) -> BaseException | None:
    """A copy of ``exc`` without its traceback, whose frames hold the failed attempt's
    tensors: a cause to chain from later, that keeps no memory."""
    try:
        found = copy.copy(exc)
        found.__traceback__ = None
    except Exception:
        return None
    return found
