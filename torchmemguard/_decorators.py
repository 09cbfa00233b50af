"""The public decorators: ``@oom_safe`` for callables, ``guard()`` for modules."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

import torch
import wrapt

from torchmemguard._guarded import Guard, GuardState
from torchmemguard._integrations.entries import entry_points, guard_class
from torchmemguard._integrations.generate import GenerateGuard
from torchmemguard._knowledge import knowledge_of, knowledge_of_callable
from torchmemguard._layout import layout_of
from torchmemguard._observability import footprint
from torchmemguard._options import GuardOptions, Options

if TYPE_CHECKING:
    from typing_extensions import Unpack

P = ParamSpec("P")
R = TypeVar("R")
M = TypeVar("M", bound=torch.nn.Module)


class _Guarded:
    """What every guarded wrapper adds: its guard's state, as ``oom_guard``."""

    # No class annotations here: they would hide the wrapped callable's __annotations__.

    @property
    def oom_guard(self) -> GuardState:
        """The guard's counters and learned sizes (see :class:`torchmemguard.GuardState`)."""
        guard: Guard = self._self_guard  # type: ignore[attr-defined]
        return guard.state()


class _BoundGuardedFunction(_Guarded, wrapt.BoundFunctionWrapper[..., Any]):
    @property
    def _self_guard(self) -> Guard:
        guard: Guard = self._self_parent._self_guard
        return guard

    def __reduce_ex__(self, protocol: object) -> tuple[Any, ...]:
        # Like a bound method: the instance (or class), and the name to look up again.
        owner = self._self_owner if self._self_instance is None else self._self_instance
        return (getattr, (owner, self.__name__))


def is_coroutine_callable(wrapped: Callable[..., Any]) -> bool:
    """Whether calling ``wrapped`` (a function, method or callable object) gives a coroutine."""
    target = getattr(wrapped, "__func__", wrapped)
    return inspect.iscoroutinefunction(target) or (
        not inspect.isfunction(target) and inspect.iscoroutinefunction(type(target).__call__)
    )


class _GuardedFunction(_Guarded, wrapt.FunctionWrapper[..., Any]):
    __bound_function_wrapper__ = _BoundGuardedFunction

    def __init__(self, wrapped: Callable[..., Any], guard: Guard) -> None:
        super().__init__(wrapped, guard.acall if is_coroutine_callable(wrapped) else guard.call)
        self._self_guard = guard

    def __reduce_ex__(self, protocol: object) -> str:
        # Pickle by reference, like the function it replaces in its module.
        name: str = self.__qualname__
        return name


class _GuardedPlainFunction(_GuardedFunction):
    """A guarded plain function: called directly, it skips wrapt's generic call layer.

    A plain function has no instance of its own, so the call goes straight to the
    guard; reached through a class or an instance, wrapt binds it as usual.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call: Callable[..., Any] = self._self_wrapper
        return call(self.__wrapped__, None, args, kwargs)


@overload
def oom_safe(fn: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def oom_safe(
    fn: None = None, /, **options: Unpack[GuardOptions]
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def oom_safe(
    fn: Callable[P, R] | None = None, /, **options: Unpack[GuardOptions]
) -> Callable[P, R] | Callable[[Callable[P, R]], Callable[P, R]]:
    """Guard a callable against running out of memory.

    When a call raises an out-of-memory error (see :func:`is_oom`), the guard
    frees what the attempt held, empties the device's cache, splits the batch
    along dimension 0, runs the chunks and merges their outputs. It remembers
    the chunk size that fitted, so the next call of the same shape does not fail;
    guards made again for the same callable with equal options share what was
    learned. Any other exception passes through untouched.

    Works bare (``@oom_safe``) or with options (``@oom_safe(batch_args=...)``),
    on functions, methods, classmethods, staticmethods and ``async def``.

    Args:
        batch_args: the names of the arguments to split. By default every argument
            is split that holds the batch's rows (a tensor with the batch size as
            its leading size, a list of that length, or structures holding them),
            and the batch size is that of the first positional argument after
            ``self`` (or, when it holds no batch, of the first argument that does).
            With names given, a call that must be split and has another argument
            holding the batch's rows is refused with a
            :class:`torchmemguard.BatchError` naming each such argument.
        whole_args: the names of arguments that go whole to every chunk, whatever
            their sizes: values shared by all samples.
        min_chunk: the smallest chunk to try before giving up with
            :class:`torchmemguard.OutOfMemoryError`.
        max_retries: the most retries one call may make after out-of-memory errors.
        grow_after: where the device's free memory cannot be read, calls held back
            by a learned limit before a larger chunk is tried. Elsewhere a chunk
            grows when the device has room again.
        split: ``split(value, start, stop)`` cuts a value of your own type inside
            the batch arguments; return other values unchanged.
        merge: ``merge(outputs)`` combines the outputs of the chunks, in order.
        batch_dim: the dimension of the batch in every batch tensor and output,
            for a call whose batch is not on dimension 0 (a time-major LSTM
            inside a model). ``guard`` reads PyTorch's recurrent and transformer
            modules' own layout without it.
        check_rows: the first time a shape of call is split, run a few rows of
            its first chunk again on their own and compare, and refuse a call
            whose rows depend on each other with
            :class:`torchmemguard.SplitRefusedError` (default True).
    """
    checked = Options.of("oom_safe", options)

    def decorate(target: Callable[P, R]) -> Callable[P, R]:
        if not callable(target) and not isinstance(target, (classmethod, staticmethod)):
            raise TypeError(f"oom_safe needs a callable, got {target!r}")
        kind = _GuardedPlainFunction if inspect.isfunction(target) else _GuardedFunction
        known = knowledge_of_callable(target, checked)
        wrapper: Callable[P, R] = kind(target, Guard(target, checked, known=known))
        return wrapper

    return decorate if fn is None else decorate(fn)


# Module methods that return the module itself: the guard returns itself instead,
# so that ``model = guard(model).to(device)`` keeps the guard.
_CHAINABLE = (
    "to", "cuda", "cpu", "xpu", "mps", "eval", "train", "half", "float", "double",
    "bfloat16", "type", "requires_grad_", "apply", "share_memory", "to_empty",
)  # fmt: skip


class GuardedModule(_Guarded, wrapt.ObjectProxy[torch.nn.Module]):
    """An ``nn.Module`` whose calls are guarded by :func:`oom_safe`.

    It is the module to ``isinstance``, ``state_dict``, ``parameters`` and every
    attribute; only calling it differs.
    """

    def __init__(
        self, module: torch.nn.Module, options: Options, methods: Sequence[str] = ()
    ) -> None:
        super().__init__(module)
        self._self_options = options
        self._self_methods = tuple(methods)
        layout = layout_of(module, options.batch_dim)
        known = knowledge_of(module, "guard", options)
        self._self_guard = Guard(module.forward, options, module=module, layout=layout, known=known)
        footprint.note(module, self._self_guard.name)
        # The other entry points, guarded once here, so that every thread shares them.
        forward: Callable[..., Any] = module.forward
        entries = {"forward": _GuardedPlainFunction(forward, self._self_guard)}
        if callable(getattr(module, "generate", None)):
            entries["generate"] = _GuardedPlainFunction(
                module.generate,  # type: ignore[arg-type]
                GenerateGuard(module, options),
            )
        for name in entry_points(module, methods):
            method = getattr(module, name)
            method_guard = guard_class(module, name)(
                method,
                options,
                module=module,
                name=f"{type(module).__qualname__}.{name}",
                known=knowledge_of(module, ("method", name), options),
            )
            entries[name] = _GuardedPlainFunction(method, method_guard)
        self._self_entries = entries

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._self_guard.call(self.__wrapped__, None, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        # Reached for every name the proxy itself lacks: its guarded entry points, then
        # the module's own attributes.
        if name.startswith("_self_"):
            raise AttributeError(name)
        entry = self._self_entries.get(name)
        return getattr(self.__wrapped__, name) if entry is None else entry

    def __reduce_ex__(self, protocol: object) -> tuple[Any, ...]:
        return (_rebuild_guard, (self.__wrapped__, self._self_options, self._self_methods))

    def __copy__(self) -> GuardedModule:
        return GuardedModule(copy.copy(self.__wrapped__), self._self_options, self._self_methods)

    def __deepcopy__(self, memo: dict[int, Any]) -> GuardedModule:
        # A copy is a new model: it learns its own sizes.
        module = copy.deepcopy(self.__wrapped__, memo)
        return GuardedModule(module, self._self_options, self._self_methods)

    def __repr__(self) -> str:
        return f"guard({self.__wrapped__!r})"


def _rebuild_guard(
    module: torch.nn.Module, options: Options, methods: Sequence[str] = ()
) -> GuardedModule:
    return GuardedModule(module, options, methods)


def _chainable(name: str) -> Callable[..., Any]:
    def method(self: GuardedModule, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.__wrapped__, name)(*args, **kwargs)
        return self if result is self.__wrapped__ else result

    method.__name__ = name
    return method


for _name in _CHAINABLE:
    setattr(GuardedModule, _name, _chainable(_name))


def guard(module: M, *, methods: Sequence[str] = (), **options: Unpack[GuardOptions]) -> M:
    """Wrap ``module`` so that its calls are guarded like ``@oom_safe`` functions.

    The result is still ``module`` to ``isinstance``, with its parameters,
    ``state_dict``, ``to``, ``eval`` and attributes; ``.to()``, ``.eval()`` and
    the like return the guarded module. The options are those of
    :func:`oom_safe`, and ``batch_args`` names arguments of ``module.forward``.
    PyTorch's sequence-first modules (``nn.LSTM``, ``nn.TransformerEncoder``, ...)
    are split along their batch, read from their ``batch_first``.

    Calling the module and calling its ``forward`` share one guard. A
    transformers model's ``generate()`` and a sentence-transformers model's
    ``encode()``, ``encode_query()`` and ``encode_document()`` are guarded too,
    each with a guard of its own.

    Args:
        methods: names of further methods to guard, each split the way
            :func:`oom_safe` splits (tensors, lists of samples, mappings), with
            a guard of its own and the same options.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"guard needs an nn.Module, got {module!r}")
    checked = Options.of("guard", options)
    guarded: M = GuardedModule(module, checked, methods)  # type: ignore[assignment]
    return guarded
