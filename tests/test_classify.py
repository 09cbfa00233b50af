"""Tests for torchmemguard._classify: telling out-of-memory errors from every other error."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from tests.realcap import address_space_cap, prepare_child, run_child
from torchmemguard import _classify as classify
from torchmemguard import is_oom, register_oom_matcher, unregister_oom_matcher
from torchmemguard._classify import oom_device
from torchmemguard._device import host

# Messages as PyTorch and its backends word them.
CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.11 GiB total capacity; "
    "75.20 GiB already allocated; 1.05 GiB free; 76.50 GiB reserved in total by PyTorch) "
    "If reserved memory is >> allocated memory try setting max_split_size_mb to avoid "
    "fragmentation.  See documentation for Memory Management and PYTORCH_CUDA_ALLOC_CONF"
)
CUDA_OOM_NEW_WORDING = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB "
    "of which 1.05 GiB is free. Process 4242 has 78.05 GiB memory in use. Of the allocated "
    "memory 76.50 GiB is allocated by PyTorch, and 1.02 GiB is reserved by PyTorch but "
    "unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See "
    "documentation for Memory Management  "
    "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)
HIP_OOM = (
    "HIP out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 63.98 GiB "
    "of which 1.02 GiB is free. Of the allocated memory 60.12 GiB is allocated by PyTorch, "
    "and 1.50 GiB is reserved by PyTorch but unallocated. If reserved but unallocated memory "
    "is large try setting PYTORCH_HIP_ALLOC_CONF=expandable_segments:True to avoid "
    "fragmentation.  See documentation for Memory Management  "
    "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)
XPU_OOM = (
    "XPU out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 64.00 GiB. "
    "Of the allocated memory 62.00 GiB is allocated by PyTorch, and 1.00 GiB is reserved by "
    "PyTorch but unallocated. Please use `empty_cache` to release all unoccupied cached memory."
)
# c10's CUDA error check appends this to every "CUDA error: ..." message.
CUDA_ERROR_TAIL = (
    "\nCUDA kernel errors might be asynchronously reported at some other API call, so the "
    "stacktrace below might be incorrect.\nFor debugging consider passing "
    "CUDA_LAUNCH_BLOCKING=1\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side "
    "assertions.\n"
)
CUDA_DRIVER_OOM_FIRST_LINE = "CUDA error: out of memory"
CUDA_DRIVER_OOM = CUDA_DRIVER_OOM_FIRST_LINE + CUDA_ERROR_TAIL
MPS_OOM = (
    "MPS backend out of memory (MPS allocated: 17.50 GB, other allocations: 1.20 GB, max "
    "allowed: 18.13 GB). Tried to allocate 1.00 GB on private pool. Use "
    "PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit for memory allocations "
    "(may cause system failure)."
)
CPU_LINUX_OOM = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)"
)
CPU_WINDOWS_OOM = (
    "[enforce fail at C:\\actions-runner\\_work\\pytorch\\pytorch\\c10\\core\\impl\\"
    "alloc_cpu.cpp:72] data. DefaultCPUAllocator: not enough memory: you tried to allocate "
    "1073741824 bytes."
)
CUBLAS_OOM = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
CUDNN_OOM = "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"
CUDNN_NOT_SUPPORTED = (
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
    "non-contiguous input."
)
HPU_OOM = "[Rank:0] FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed for size::1073741824 (1024)MB"

OOM_MESSAGES = {
    "cuda": CUDA_OOM,
    "cuda-new-wording": CUDA_OOM_NEW_WORDING,
    "hip": HIP_OOM,
    "xpu": XPU_OOM,
    "cuda-driver": CUDA_DRIVER_OOM_FIRST_LINE,
    "mps": MPS_OOM,
    "cpu-linux": CPU_LINUX_OOM,
    "cpu-windows": CPU_WINDOWS_OOM,
    "cublas": CUBLAS_OOM,
    "cudnn-alloc": CUDNN_OOM,
    "cudnn-not-supported": CUDNN_NOT_SUPPORTED,
    "hpu": HPU_OOM,
}

# The first line of each sticky CUDA error; c10 appends CUDA_ERROR_TAIL to every one.
STICKY_MESSAGES = {
    "illegal-memory-access": "CUDA error: an illegal memory access was encountered",
    "device-side-assert": "CUDA error: device-side assert triggered",
    "unspecified-launch-failure": "CUDA error: unspecified launch failure",
    "misaligned-address": "CUDA error: misaligned address",
}

needs_accelerator_error = pytest.mark.skipif(
    not hasattr(torch, "AcceleratorError"), reason="torch.AcceleratorError needs torch>=2.8"
)


class FrameworkError(Exception):
    """An error type a serving framework wraps failures in."""


class CustomDeviceOOM(Exception):
    """An out-of-memory error of a backend that torchmemguard does not know."""


def chained(outer: BaseException, inner: BaseException, *, explicit: bool) -> BaseException:
    """``outer`` as Python raises it from inside an ``except inner`` block."""
    try:
        try:
            raise inner
        except BaseException:
            if explicit:
                raise outer from inner
            raise outer  # noqa: B904 - the implicit __context__ link is what is tested
    except BaseException as caught:
        return caught


@pytest.fixture
def register() -> Iterator[Callable[[Callable[[BaseException], bool]], object]]:
    """Register matchers for one test; every one still registered is removed afterwards."""
    added: list[Callable[[BaseException], bool]] = []

    def add(matcher: Callable[[BaseException], bool]) -> object:
        added.append(matcher)
        return register_oom_matcher(matcher)

    yield add
    for matcher in added:
        # A test may already have removed its matcher itself.
        with contextlib.suppress(ValueError):
            unregister_oom_matcher(matcher)


def is_custom_oom(exc: BaseException) -> bool:
    return isinstance(exc, CustomDeviceOOM)


# ---------------------------------------------------------------------------
# Out-of-memory errors
# ---------------------------------------------------------------------------


def test_is_oom_true_for_torch_out_of_memory_error() -> None:
    assert is_oom(torch.OutOfMemoryError(CUDA_OOM))


def test_is_oom_true_for_torch_cuda_out_of_memory_error() -> None:
    assert is_oom(torch.cuda.OutOfMemoryError(CUDA_OOM))


def test_is_oom_true_for_out_of_memory_error_without_message() -> None:
    assert is_oom(torch.OutOfMemoryError())


def test_is_oom_true_for_python_memory_error() -> None:
    assert is_oom(MemoryError())


@pytest.mark.parametrize("message", OOM_MESSAGES.values(), ids=OOM_MESSAGES.keys())
def test_is_oom_true_for_runtime_error_with_allocator_message(message: str) -> None:
    assert is_oom(RuntimeError(message))


@needs_accelerator_error
def test_is_oom_true_for_accelerator_error_with_driver_oom_message() -> None:
    assert is_oom(torch.AcceleratorError(CUDA_DRIVER_OOM_FIRST_LINE))


def test_is_oom_true_for_driver_oom_with_the_standard_cuda_error_tail() -> None:
    assert is_oom(RuntimeError(CUDA_DRIVER_OOM))


def test_is_oom_true_for_a_real_cpu_allocation_failure() -> None:
    caught: RuntimeError | None = None
    try:
        # One pebibyte: more than a 47-bit user address space can map.
        torch.empty(2**50, dtype=torch.uint8)
    except RuntimeError as exc:
        caught = exc
    if caught is None:
        pytest.skip("this machine mapped a 1 PiB tensor")
    assert is_oom(caught)


# ---------------------------------------------------------------------------
# Ordinary errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("expected a tensor"),
        RuntimeError("shape mismatch: value tensor of shape [4] cannot be broadcast to [3]"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"),
        TypeError("forward() missing 1 required positional argument: 'x'"),
        KeyError("input_ids"),
        RuntimeError(),
    ],
    ids=["value-error", "shape-mismatch", "matmul-shapes", "type-error", "key-error", "empty"],
)
def test_is_oom_false_for_ordinary_error(exc: BaseException) -> None:
    assert not is_oom(exc)


@pytest.mark.parametrize(
    "exc", [KeyboardInterrupt(), SystemExit(1)], ids=["keyboard-interrupt", "system-exit"]
)
def test_is_oom_false_for_base_exception_that_is_not_an_error(exc: BaseException) -> None:
    assert not is_oom(exc)


def test_is_oom_false_for_chain_of_ordinary_errors() -> None:
    exc = chained(FrameworkError("request failed"), ValueError("bad input"), explicit=True)
    assert not is_oom(exc)


# ---------------------------------------------------------------------------
# Chains
# ---------------------------------------------------------------------------


def test_is_oom_follows_explicit_cause() -> None:
    exc = chained(
        FrameworkError("generation failed"), torch.OutOfMemoryError(CUDA_OOM), explicit=True
    )
    assert is_oom(exc)


def test_is_oom_follows_implicit_context() -> None:
    exc = chained(FrameworkError("generation failed"), RuntimeError(CPU_LINUX_OOM), explicit=False)
    assert is_oom(exc)


def test_is_oom_follows_a_chain_several_links_deep() -> None:
    inner = chained(ValueError("wrapped"), RuntimeError(MPS_OOM), explicit=True)
    middle = chained(KeyError("step"), inner, explicit=False)
    outer = chained(FrameworkError("request failed"), middle, explicit=True)
    assert is_oom(outer)


def test_is_oom_terminates_on_a_context_cycle_without_oom() -> None:
    first = ValueError("first")
    second = KeyError("second")
    first.__context__ = second
    second.__context__ = first
    assert not is_oom(first)


def test_is_oom_terminates_on_a_context_cycle_holding_an_oom() -> None:
    outer = FrameworkError("outer")
    oom = torch.OutOfMemoryError(CUDA_OOM)
    outer.__cause__ = oom
    oom.__context__ = outer
    assert is_oom(outer)


def test_is_oom_terminates_on_an_exception_that_is_its_own_context() -> None:
    exc = ValueError("self-referencing")
    exc.__context__ = exc
    assert not is_oom(exc)


# ---------------------------------------------------------------------------
# Sticky CUDA errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("message", STICKY_MESSAGES.values(), ids=STICKY_MESSAGES.keys())
def test_is_oom_false_for_sticky_cuda_error(message: str) -> None:
    assert not is_oom(RuntimeError(message))


@pytest.mark.parametrize("message", STICKY_MESSAGES.values(), ids=STICKY_MESSAGES.keys())
def test_is_oom_false_for_sticky_cuda_error_with_the_standard_tail(message: str) -> None:
    assert not is_oom(RuntimeError(message + CUDA_ERROR_TAIL))


@needs_accelerator_error
def test_is_oom_false_for_accelerator_error_with_illegal_memory_access() -> None:
    assert not is_oom(torch.AcceleratorError(STICKY_MESSAGES["illegal-memory-access"]))


@pytest.mark.parametrize("message", STICKY_MESSAGES.values(), ids=STICKY_MESSAGES.keys())
def test_is_oom_false_for_sticky_error_caused_by_an_oom(message: str) -> None:
    exc = chained(RuntimeError(message), torch.OutOfMemoryError(CUDA_OOM), explicit=True)
    assert not is_oom(exc)


@pytest.mark.parametrize("message", STICKY_MESSAGES.values(), ids=STICKY_MESSAGES.keys())
def test_is_oom_false_for_oom_raised_while_handling_a_sticky_error(message: str) -> None:
    exc = chained(torch.OutOfMemoryError(CUDA_OOM), RuntimeError(message), explicit=False)
    assert not is_oom(exc)


def test_is_oom_false_when_sticky_error_is_deep_in_a_chain_with_an_oom() -> None:
    sticky = chained(
        RuntimeError(STICKY_MESSAGES["device-side-assert"]), ValueError("index"), explicit=False
    )
    oom = chained(RuntimeError(CUDA_OOM), sticky, explicit=False)
    outer = chained(FrameworkError("request failed"), oom, explicit=True)
    assert not is_oom(outer)


# ---------------------------------------------------------------------------
# User matchers
# ---------------------------------------------------------------------------


def test_custom_oom_is_not_recognised_without_a_matcher() -> None:
    assert not is_oom(CustomDeviceOOM("device 0: allocation of 2 GiB failed"))


def test_registered_matcher_makes_is_oom_accept_custom_error(register) -> None:
    register(is_custom_oom)
    assert is_oom(CustomDeviceOOM("device 0: allocation of 2 GiB failed"))


def test_registered_matcher_does_not_accept_other_errors(register) -> None:
    register(is_custom_oom)
    assert not is_oom(ValueError("bad input"))


def test_registered_matcher_is_asked_about_the_chain(register) -> None:
    register(is_custom_oom)
    exc = chained(FrameworkError("request failed"), CustomDeviceOOM("alloc"), explicit=True)
    assert is_oom(exc)


def test_register_oom_matcher_returns_the_matcher(register) -> None:
    assert register(is_custom_oom) is is_custom_oom


def test_register_oom_matcher_works_as_a_decorator() -> None:
    @register_oom_matcher
    def matcher(exc: BaseException) -> bool:
        return isinstance(exc, CustomDeviceOOM)

    try:
        # The decorated name is still the matcher: unregistering it below succeeds.
        assert is_oom(CustomDeviceOOM("alloc"))
    finally:
        unregister_oom_matcher(matcher)


def test_unregistered_matcher_no_longer_applies(register) -> None:
    register(is_custom_oom)
    unregister_oom_matcher(is_custom_oom)
    assert not is_oom(CustomDeviceOOM("alloc"))


def test_unregistering_one_matcher_keeps_the_others(register) -> None:
    register(is_custom_oom)
    register(lambda exc: isinstance(exc, FrameworkError))
    unregister_oom_matcher(is_custom_oom)
    assert is_oom(FrameworkError("backend ran dry"))


def test_unregistering_an_unknown_matcher_raises_value_error() -> None:
    with pytest.raises(ValueError, match="not registered"):
        unregister_oom_matcher(is_custom_oom)


def test_registering_a_non_callable_raises_type_error() -> None:
    with pytest.raises(TypeError, match="callable"):
        register_oom_matcher("out of memory")  # type: ignore[arg-type]


def test_sticky_error_wins_over_a_registered_matcher(register) -> None:
    register(lambda exc: True)
    assert not is_oom(RuntimeError(STICKY_MESSAGES["illegal-memory-access"]))


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 3 has a total capacity of "
            "79.11 GiB of which 1.02 GiB is free.",
            torch.device("cuda", 3),
        ),
        (
            "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 1; 15.78 GiB total capacity; "
            "14.56 GiB already allocated)",
            torch.device("cuda", 1),
        ),
        ("CUDA error: out of memory", torch.device("cuda")),
        ("XPU out of memory. Tried to allocate 1.00 GiB.", torch.device("xpu")),
        ("MPS backend out of memory (MPS allocated: 17.00 GB)", torch.device("mps")),
        (
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 1073741824 bytes.",
            torch.device("cpu"),
        ),
        ("PT_DEVMEM Allocation failed", None),
    ],
)
def test_oom_device_reads_the_device_from_the_message(
    message: str, expected: torch.device | None
) -> None:
    assert oom_device(RuntimeError(message)) == expected


def test_oom_device_of_memory_error_is_the_cpu() -> None:
    assert oom_device(MemoryError()) == torch.device("cpu")


def test_oom_device_follows_the_chain() -> None:
    inner = torch.OutOfMemoryError("CUDA out of memory. GPU 2 has a total capacity of 80 GiB")
    outer = ValueError("wrapped")
    outer.__cause__ = inner
    assert oom_device(outer) == torch.device("cuda", 2)


def test_failing_matcher_counts_as_no_match() -> None:
    def broken(exc: BaseException) -> bool:
        return bool(exc.args[0])

    register_oom_matcher(broken)
    try:
        assert is_oom(KeyError()) is False
    finally:
        unregister_oom_matcher(broken)


def test_context_hidden_with_from_none_is_not_followed() -> None:
    outer = ValueError("bad input")
    outer.__context__ = torch.OutOfMemoryError("CUDA out of memory.")
    outer.__suppress_context__ = True
    assert is_oom(outer) is False


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception groups are new in 3.11")
def test_oom_inside_an_exception_group_is_recognised() -> None:
    members = [ValueError("other"), torch.OutOfMemoryError("oom")]
    group = ExceptionGroup("task group", members)  # noqa: F821
    assert is_oom(group) is True


def wrapped(inner: BaseException, links: int) -> BaseException:
    """``inner`` at the bottom of a chain of ``links`` ValueErrors, each raised from the next."""
    exc = inner
    for i in range(links):
        outer = ValueError(i)
        outer.__cause__ = exc
        exc = outer
    return exc


def test_is_oom_follows_a_chain_100_links_deep() -> None:
    assert is_oom(wrapped(torch.OutOfMemoryError("CUDA out of memory."), 100))


def test_is_oom_false_for_a_chain_longer_than_the_bound_even_with_an_oom_on_top(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(classify, "_MAX_CHAIN", 5)
    exc = torch.OutOfMemoryError("CUDA out of memory.")
    exc.__cause__ = wrapped(ValueError("bottom"), 5)
    assert not is_oom(exc)


def test_is_oom_classifies_a_chain_exactly_as_long_as_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(classify, "_MAX_CHAIN", 5)
    assert is_oom(wrapped(torch.OutOfMemoryError("CUDA out of memory."), 4))


def test_a_matcher_registered_twice_is_unregistered_once() -> None:
    def matcher(exc: BaseException) -> bool:
        return "boom" in str(exc)

    register_oom_matcher(matcher)
    register_oom_matcher(matcher)
    unregister_oom_matcher(matcher)
    try:
        assert not is_oom(RuntimeError("boom"))
    finally:
        with contextlib.suppress(ValueError):
            unregister_oom_matcher(matcher)


# ---------------------------------------------------------------------------
# Exceptions whose __str__ fails


class UnreadableError(RuntimeError):
    """An error whose message cannot be read: its ``__str__`` raises."""

    def __str__(self) -> str:
        raise KeyError("x")


def test_is_oom_false_for_an_error_whose_str_raises() -> None:
    assert is_oom(UnreadableError()) is False


def test_is_oom_reads_past_an_error_whose_str_raises() -> None:
    exc = UnreadableError()
    exc.__cause__ = RuntimeError(CPU_LINUX_OOM)
    assert is_oom(exc) is True


def test_oom_device_none_for_an_error_whose_str_raises() -> None:
    assert oom_device(UnreadableError()) is None


# ---------------------------------------------------------------------------
# Large exception groups

needs_exception_groups = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="exception groups are new in 3.11"
)


@needs_exception_groups
@pytest.mark.parametrize("size", [40, 100])
def test_is_oom_false_when_the_first_of_many_group_members_is_sticky(size: int) -> None:
    members = [RuntimeError(STICKY_MESSAGES["illegal-memory-access"])]
    members += [torch.OutOfMemoryError(CUDA_OOM) for _ in range(size - 1)]
    assert is_oom(ExceptionGroup("task group", members)) is False  # noqa: F821


@needs_exception_groups
@pytest.mark.parametrize("size", [40, 100])
def test_is_oom_true_when_the_first_of_many_group_members_is_an_oom(size: int) -> None:
    members = [torch.OutOfMemoryError(CUDA_OOM)]
    members += [ValueError(i) for i in range(size - 1)]
    assert is_oom(ExceptionGroup("task group", members)) is True  # noqa: F821


@needs_exception_groups
def test_oom_device_names_the_device_of_the_first_group_member() -> None:
    members = [
        torch.OutOfMemoryError("CUDA out of memory. GPU 1 has a total capacity of 80 GiB"),
        torch.OutOfMemoryError("CUDA out of memory. GPU 2 has a total capacity of 80 GiB"),
    ]
    group = ExceptionGroup("task group", members)  # noqa: F821
    assert oom_device(group) == torch.device("cuda", 1)


# ---------------------------------------------------------------------------
# oneDNN under an address-space cap

ONEDNN_MESSAGES = {
    "short": "could not create a primitive",
    "descriptor": (
        "could not create a primitive descriptor for a convolution forward propagation primitive"
    ),
}


@pytest.fixture
def capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A finite soft ``RLIMIT_AS``, as the host layer reports it; the real one is untouched."""
    monkeypatch.setattr(host, "can_cap_address_space", lambda: True)
    monkeypatch.setattr(host, "address_space_limit", lambda: 4 * 2**30)


@pytest.fixture
def uncapped(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``RLIMIT_AS``, as the host layer reports it."""
    monkeypatch.setattr(host, "can_cap_address_space", lambda: True)
    monkeypatch.setattr(host, "address_space_limit", lambda: math.inf)


@pytest.mark.usefixtures("capped")
@pytest.mark.parametrize("message", ONEDNN_MESSAGES.values(), ids=ONEDNN_MESSAGES.keys())
def test_onednn_primitive_error_is_oom_under_an_address_space_cap(message: str) -> None:
    assert is_oom(RuntimeError(message)) is True


@pytest.mark.usefixtures("capped")
def test_onednn_primitive_error_is_matched_in_any_case() -> None:
    assert is_oom(RuntimeError("Could Not Create A Primitive")) is True


@pytest.mark.usefixtures("uncapped")
@pytest.mark.parametrize("message", ONEDNN_MESSAGES.values(), ids=ONEDNN_MESSAGES.keys())
def test_onednn_primitive_error_is_not_oom_without_an_address_space_cap(message: str) -> None:
    assert is_oom(RuntimeError(message)) is False


def test_onednn_primitive_error_is_not_oom_where_address_space_cannot_be_capped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(host, "can_cap_address_space", lambda: False)
    assert is_oom(RuntimeError(ONEDNN_MESSAGES["short"])) is False


@pytest.mark.usefixtures("capped")
def test_oom_device_of_onednn_primitive_error_under_a_cap_is_the_cpu() -> None:
    assert oom_device(RuntimeError(ONEDNN_MESSAGES["descriptor"])) == torch.device("cpu")


@pytest.mark.usefixtures("uncapped")
def test_oom_device_of_onednn_primitive_error_without_a_cap_is_none() -> None:
    assert oom_device(RuntimeError(ONEDNN_MESSAGES["descriptor"])) is None


@pytest.mark.usefixtures("capped")
def test_sticky_error_wins_over_onednn_primitive_error_under_a_cap() -> None:
    exc = chained(
        RuntimeError(ONEDNN_MESSAGES["short"]),
        RuntimeError(STICKY_MESSAGES["illegal-memory-access"]),
        explicit=False,
    )
    assert is_oom(exc) is False


@pytest.mark.parametrize(
    "exc",
    [RuntimeError(CUDA_OOM), RuntimeError("shape mismatch"), ValueError("bad input")],
    ids=["oom", "runtime-error", "value-error"],
)
def test_address_space_limit_is_not_read_for_other_errors(
    monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    reads: list[str] = []

    def read_limit() -> float:
        reads.append("read")
        return math.inf

    monkeypatch.setattr(host, "address_space_limit", read_limit)
    is_oom(exc)
    oom_device(exc)
    assert reads == []


# The real thing: oneDNN creates its convolution primitive (JIT code) before
# torch allocates the output, so a cap a few hundred KiB above what the child
# uses fails there, with "could not create a primitive". Headrooms are tried
# from the smallest up: a failed primitive is not cached, but a created one is.
ONEDNN_HEADROOMS_MIB = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


def _scenario_onednn_under_cap() -> dict[str, Any]:
    prepare_child()
    import torch

    torch.backends.mkldnn.enabled = True  # prepare_child turns oneDNN off
    conv = torch.nn.Conv2d(3, 64, 7, stride=2, padding=3)
    batch = torch.randn(8, 3, 224, 224)
    tries = []
    with torch.no_grad():
        for headroom in ONEDNN_HEADROOMS_MIB:
            message, counted = None, None
            with address_space_cap(headroom):
                try:
                    conv(batch)
                except RuntimeError as exc:
                    # Asked under the cap: the rule depends on it.
                    message, counted = str(exc), is_oom(exc)
            tries.append({"headroom_mib": headroom, "message": message, "is_oom": counted})
            if message is None or "could not create a primitive" in message:
                break
    return {"tries": tries}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_AS (Linux)")
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
def test_real_onednn_primitive_error_under_a_real_cap_is_oom() -> None:
    tries = run_child("tests.test_classify:_scenario_onednn_under_cap")["tries"]
    onednn = [t for t in tries if t["message"] and "could not create a primitive" in t["message"]]
    assert onednn, f"no headroom gave oneDNN's error: {tries}"
    assert onednn[0]["is_oom"] is True
