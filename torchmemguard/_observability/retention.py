"""Memory that a guarded callable's calls keep after they return: leaks, found by name.

A guard samples some of its calls, about one every PERIOD_S seconds whatever
the rate of calls. It counts calls down to the next sample (the one cost on
the happy path); the count doubles while samples come faster than that and
halves while they come slower. For a sampled call that returns, the allocated
memory of the call's device is read before and after, and the memory of the
output's tensors that the call made is taken away: what is left, the call
kept. A call that kept less than NOISE_BYTES, either way, kept nothing.
Weighted by the calls the sample stands for, the kept memory adds up to the
function's retained bytes (``torchmemguard_retained_bytes``).

Only a steady rise counts as a leak: over the last WINDOW samples, at least
three in four kept memory, and each quarter of the window kept more than it
gave back. A warm-up, a cache that fills once or one larger batch keep memory
once and then stop. The first steady rise logs one warning that names the
function and the rate.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

from torchmemguard import _device as devices
from torchmemguard import _structures as structures
from torchmemguard._observability import metrics
from torchmemguard._units import format_bytes

logger = logging.getLogger("torchmemguard")

PERIOD_S = 1.0  # about one sampled call per period, per guarded callable
FIRST_SAMPLE = 8  # the call sampled first: the ones before warm up
WINDOW = 32  # the samples a steady rise is judged over
NOISE_BYTES = 16 * 2**10  # kept, or given back, below this: nothing
_DEPTH = 4  # how deep the outputs' tensors are looked for
_CUDA_BLOCK = 512  # CUDA's allocator hands out multiples of this many bytes


class Sample(NamedTuple):
    """A sampled call, before it runs."""

    device: torch.device
    allocated: int  # on the device, before the call
    weight: int  # the calls this sample stands for
    inputs: frozenset[int]  # the storages of the tensor arguments


class Retention:
    """The sampled calls of one guarded callable, and what they kept."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.every = 1  # calls per sample, from the next one on
        self.retained = 0  # bytes kept by the calls, estimated from the samples
        self.warned = False
        self._last: float | None = None  # when the latest sample began (monotonic)
        self._kept: collections.deque[int] = collections.deque(maxlen=WINDOW)
        self._times: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self._lock = threading.Lock()

    def begin(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], module: torch.nn.Module | None
    ) -> Sample | None:
        """Start sampling a call; ``None`` where its device's memory cannot be read.

        ``every`` is set for the countdown to the next sample.
        """
        now = time.monotonic()
        weight = self.every
        if self._last is not None:
            elapsed = now - self._last
            if elapsed < PERIOD_S / 2:
                self.every *= 2
            elif elapsed > 2 * PERIOD_S and self.every > 1:
                self.every //= 2
        self._last = now
        try:
            device = _device_of(args, kwargs, module)
            inputs = frozenset(_storages((args, kwargs), device))
        except Exception:  # arguments this cannot look into: the call is not sampled
            return None
        allocated = devices.allocated(device)
        return None if allocated is None else Sample(device, allocated, weight, inputs)

    def end(self, sample: Sample, output: Any) -> None:
        """The sampled call returned ``output``: count what it kept."""
        after = devices.allocated(sample.device)
        try:
            made = sum(
                _allocation(size, sample.device)
                for pointer, size in _storages(output, sample.device).items()
                if pointer not in sample.inputs
            )
        except Exception:  # an output this cannot look into: the sample counts for nothing
            return
        if after is None:
            return
        kept = after - sample.allocated - made
        if abs(kept) < NOISE_BYTES:
            kept = 0
        with self._lock:
            self.retained += kept * sample.weight
            self._kept.append(kept)
            self._times.append(time.monotonic())
            retained = self.retained
            leak = not self.warned and _steady(self._kept)
            if leak:
                self.warned = True
                per_call = sum(self._kept) / len(self._kept)
                span = self._times[-1] - self._times[0]
                weights = sample.weight * (len(self._kept) - 1)
        metrics.set_retained(self.name, sample.device, retained)
        if leak:
            rate = f"about {format_bytes(per_call)} per call"
            if span > 0:
                rate += f", {format_bytes(per_call * weights / span)} per second"
            logger.warning(
                "%s keeps memory after its calls return: %s on %s, over its last %d "
                "sampled calls. Something it calls holds on to tensors (a list that keeps "
                'outputs, a cache that grows); torchmemguard_retained_bytes{function="%s"} '
                "tracks it.",
                self.name,
                rate,
                sample.device,
                WINDOW,
                self.name,
            )


def _steady(kept: collections.deque[int]) -> bool:
    """Whether a full window of samples shows a steady rise (see the module's docstring)."""
    if len(kept) < WINDOW:
        return False
    values = list(kept)
    if 4 * sum(value > 0 for value in values) < 3 * WINDOW:
        return False
    quarter = WINDOW // 4
    return all(sum(values[i : i + quarter]) > 0 for i in range(0, WINDOW, quarter))


def _device_of(
    args: tuple[Any, ...], kwargs: dict[str, Any], module: torch.nn.Module | None
) -> torch.device:
    """The device a call runs on: its module's, else its first tensor argument's, else the CPU."""
    if module is not None:
        for parameter in module.parameters():
            return parameter.device
    for tensor in _tensors((args, kwargs), 1):
        return tensor.device
    return torch.device("cpu")


def _tensors(value: Any, depth: int) -> Iterator[torch.Tensor]:
    """The tensors in ``value``, looked for ``depth`` structures deep (lists, and what
    the splitting walks: tuples, mappings, dataclasses)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth >= 0:
        items = list(value) if isinstance(value, list) else structures.children(value)
        for item in items or ():
            yield from _tensors(item, depth - 1)


def _storages(value: Any, device: torch.device) -> dict[int, int]:
    """The storages of the tensors in ``value`` on ``device``: address to bytes."""
    found = {}
    for tensor in _tensors(value, _DEPTH):
        if tensor.device == device:
            storage = tensor.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
    return found


def _allocation(size: int, device: torch.device) -> int:
    """What the allocator of ``device`` counts for a storage of ``size`` bytes."""
    if device.type == "cuda":
        return max(_CUDA_BLOCK, -(-size // _CUDA_BLOCK) * _CUDA_BLOCK)
    return size
