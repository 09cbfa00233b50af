"""The child side of ``benchmarks/recovery.py``: one contender serves the stream under a cap.

Every child builds the same model and the same requests from fixed seeds, warms
up through its contender's own code, measures what it holds, caps itself there
plus a headroom, says ``ready`` and serves the stream, one request each time
the parent writes a line to its stdin; half-way through, the headroom is
doubled. It writes one line per request to stdout (``request`` and what
happened, as JSON), and a summary to a JSON file at the end. One child with the
task ``reference`` computes the reference answers, without a cap, for the others.

    python -m benchmarks.recovery_child CONFIG.json
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import resource
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import find_executable_batch_size
from toma import toma
from torch_max_mem import infer_maximum_batch_size, maximize_memory_utilization

import torchmemguard
from benchmarks.results import address_space

VOCAB, WIDTH, HEADS, FEEDFORWARD = 1000, 32, 1, 64
LENGTHS = (32, 64, 128, 256, 512)  # tokens per sequence
MAX_BATCH = 1024  # sequences per request: log-uniform in 1..MAX_BATCH
# The headroom above the warmed-up address space in phase 1; phase 2 doubles it.
# Large requests must then be split at every length (about 540 sequences of 32
# tokens fit in it, 34 of 512), while small ones fit whole.
CPU_HEADROOM = 16 * 2**20
ORACLE_MARGIN = 2**20  # what the oracle's chunks leave spare (see largest_fitting_chunk)
REFERENCE_TOKENS = 8192  # the references are computed in chunks of at most this many tokens
WARM_UP_BATCH = 32  # sequences per warm-up call, at every length
RTOL = ATOL = 1e-5  # a chunk may take another kernel and round the last bits differently

Answer = Callable[[torch.Tensor], torch.Tensor]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Encoder(torch.nn.Module):
    """Token ids (batch, length) in, one embedding per sequence (batch, WIDTH) out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        layer = torch.nn.TransformerEncoderLayer(
            WIDTH, HEADS, FEEDFORWARD, dropout=0.0, batch_first=True
        )  # ReLU, the default
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.encoder(self.embed(token_ids))
        return hidden.mean(dim=1)


class Recorder(torch.nn.Module):
    """The model as every contender calls it: it logs each chunk's size, outcome and time."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[tuple[int, str, float]] = []

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        try:
            output: torch.Tensor = self.model(token_ids)
            sync(token_ids.device)
        except Exception as exc:
            outcome = "oom" if torchmemguard.is_oom(exc) else type(exc).__name__
            self.calls.append((token_ids.shape[0], outcome, time.perf_counter() - started))
            raise
        self.calls.append((token_ids.shape[0], "ok", time.perf_counter() - started))
        return output


def make_requests(count: int, seed: int) -> list[torch.Tensor]:
    """``count`` requests: batch sizes log-uniform in 1..MAX_BATCH, lengths from LENGTHS."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    requests = []
    for _ in range(count):
        batch = min(MAX_BATCH, int(math.exp(rng.uniform(0.0, math.log(MAX_BATCH + 1)))))
        length = rng.choice(LENGTHS)
        requests.append(torch.randint(VOCAB, (batch, length), generator=generator))
    return requests


def chunked(model: Answer, request: torch.Tensor, chunk: int) -> torch.Tensor:
    """``model`` over ``request`` in chunks of ``chunk`` sequences, concatenated."""
    if chunk >= len(request):
        return model(request)
    return torch.cat([model(request[i : i + chunk]) for i in range(0, len(request), chunk)])


# ---------------------------------------------------------------------------
# The contenders: each turns the recorded model into ``answer(request)``.


def no_guard(model: Recorder) -> Answer:
    return model


def with_accelerate(model: Recorder) -> Answer:
    # Decorated once for the whole stream, as accelerate's documentation shows: the
    # decorator goes on the function where it is defined, and the function is then
    # called without its batch size. That size lives in the decorator's closure: it
    # persists from call to call, is shared by every shape, and only ever shrinks
    # (to 90% per OOM, with gc.collect() and an emptied cache before each call and
    # after each OOM). Decorating per request would start every request again at
    # the starting size: tens of OOMs for each large request.
    @find_executable_batch_size(starting_batch_size=MAX_BATCH)
    def answer(batch_size: int, request: torch.Tensor) -> torch.Tensor:
        return chunked(model, request, batch_size)

    return answer  # type: ignore[no-any-return]


def with_toma(model: Recorder) -> Answer:
    # toma's chunked calls return nothing, so the answer is allocated first and each
    # chunk fills its rows (toma's README preallocates its result the same way).
    # toma.execute.chunked keeps one step per call site, found by inspecting the
    # call stack (twice per call), and per 256 MiB of free memory: one step for
    # every shape, which starts at initial_step and only ever halves, with a
    # gc.collect() after every chunk.
    def answer(request: torch.Tensor) -> torch.Tensor:
        result = torch.empty(len(request), WIDTH, device=request.device)

        @toma.execute.chunked(request, initial_step=MAX_BATCH)
        def fill(chunk: torch.Tensor, start: int, end: int) -> None:
            result[start:end] = model(chunk)

        return result

    return answer


def with_torch_max_mem(model: Recorder) -> Answer:
    # Decorated once for the whole stream, as torch-max-mem's documentation shows:
    # maximize_memory_utilization retries the function with its batch_size
    # parameter halved (then floored to a multiple of 32) after each error it takes
    # for an OOM, and infer_maximum_batch_size (the outer decorator, as documented)
    # starts batch_size at len(request). keys="request" caches the size that worked
    # per request shape, dtype and device; without keys, one size would serve every
    # call, and the first small request (the warm-up's) would cap all later ones,
    # since a cached size is never exceeded. safe_devices only decides whether
    # every call on a tensor outside it logs a warning.
    # It takes an error for an OOM when it is a torch.OutOfMemoryError (what CUDA
    # and a memory_budget raise) or a RuntimeError whose message holds one of its
    # known texts. The CPU allocator's on Linux ("DefaultCPUAllocator: can't
    # allocate memory") is not one of them (it lists "DefaultCPUAllocator: not
    # enough memory", the Windows build's), so on the CPU it re-raises the first
    # OOM of a request: that request fails, as without a guard.
    @infer_maximum_batch_size(x_parameter_name="request")
    @maximize_memory_utilization(keys="request", safe_devices=("cuda", "cpu"))
    def answer(request: torch.Tensor, batch_size: int) -> torch.Tensor:
        return chunked(model, request, batch_size)

    # Called without batch_size: infer_maximum_batch_size fills it in.
    return answer  # type: ignore[return-value]


def with_torchmemguard(model: Recorder) -> Answer:
    return torchmemguard.guard(model)  # default options


def oracle(model: Recorder, chunks: dict[int, int]) -> Answer:
    """Each length in chunks of the largest size that fits it (``chunks``, found beforehand)."""
    return lambda request: chunked(model, request, chunks[request.shape[1]])


def largest_fitting_chunk(model: Recorder, request: torch.Tensor) -> int:
    """The largest chunk of ``request`` that runs under the cap in force, by bisection.

    Each try holds the size of the whole answer (the oracle holds the answers of
    its earlier chunks while it runs the next one) plus ORACLE_MARGIN: what a
    process holds drifts by a few hundred KiB over the stream, and a chunk found
    right at the edge would then fail.
    """
    spare = len(request) * WIDTH * 4 + ORACLE_MARGIN

    def fits(size: int) -> bool:
        held = torch.empty(spare, dtype=torch.uint8, device=request.device)
        try:
            model(request[:size])
        except Exception as exc:
            if not torchmemguard.is_oom(exc):
                raise
            return False
        finally:
            del held
        return True

    if fits(len(request)):
        return len(request)
    fitted, failed = 0, len(request)
    while failed - fitted > 1:
        middle = (fitted + failed) // 2
        if fits(middle):
            fitted = middle
        else:
            failed = middle
    return fitted


# ---------------------------------------------------------------------------
# The caps


class AddressSpaceCap:
    """RLIMIT_AS at the address space measured when created, plus a headroom."""

    def __init__(self) -> None:
        self.base = address_space()
        self._found = resource.getrlimit(resource.RLIMIT_AS)

    def set(self, headroom: int) -> None:
        resource.setrlimit(resource.RLIMIT_AS, (self.base + headroom, self._found[1]))

    def lift(self) -> None:
        resource.setrlimit(resource.RLIMIT_AS, self._found)

    def search(self, model: Recorder, request: torch.Tensor, headroom: int) -> int:
        """The largest chunk of ``request`` that fits in ``headroom``, found in a fork.

        The fork starts from exactly this process's memory. This process never
        probes past the cap itself: when mapping a block fails, glibc may place
        it on its heap instead, where it can stay pinned, and the address space
        it leaves behind is then several MiB larger than before.
        """
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(reader)
                self.set(headroom)
                os.write(writer, str(largest_fitting_chunk(model, request)).encode())
                status = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        os.close(writer)
        with os.fdopen(reader) as pipe:
            found = pipe.read()
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise RuntimeError(f"the search for a chunk of {tuple(request.shape)} failed")
        return int(found)


class BudgetCap:
    """A ``memory_budget`` on a CUDA device at what is reserved when created, plus a headroom."""

    def __init__(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        self.device = device
        self.base = torch.cuda.memory_reserved(device)
        self._blocks = contextlib.ExitStack()

    def set(self, headroom: int) -> None:
        # A block never loosens the blocks open around it: close the old one first.
        self._blocks.close()
        budget = torchmemguard.memory_budget(bytes=self.base + headroom, device=self.device)
        self._blocks.enter_context(budget)

    def lift(self) -> None:
        self._blocks.close()

    def search(self, model: Recorder, request: torch.Tensor, headroom: int) -> int:
        """The largest chunk of ``request`` that fits in ``headroom``, found here.

        CUDA does not survive a fork; emptying the cache afterwards gives back
        whatever the failed tries left reserved.
        """
        self.set(headroom)
        try:
            return largest_fitting_chunk(model, request)
        finally:
            self.lift()
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# The two tasks of a child


def reference(
    model: Recorder, requests: list[torch.Tensor], config: dict[str, Any]
) -> dict[str, Any]:
    """Compute every answer without a cap, in small chunks; choose the headroom; time a gc."""
    answers = []
    for request in requests:
        chunk = max(1, REFERENCE_TOKENS // request.shape[1])
        answers.append(chunked(model.model, request, chunk))
        print("request", flush=True)
    torch.save(answers, config["references"])
    gc.collect()
    started = time.perf_counter()
    gc.collect()  # what one costs in a process set up like the others, without gc.freeze()
    collect_s = time.perf_counter() - started
    headroom = CPU_HEADROOM
    device = requests[0].device
    if device.type == "cuda":
        # Half of the extra memory that the largest request of the shortest length
        # takes whole: its large requests need splitting, at every length.
        shortest = min(r.shape[1] for r in requests)
        probe = max((r for r in requests if r.shape[1] == shortest), key=len)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_reserved(device)
        model.model(probe)
        torch.cuda.synchronize(device)
        headroom = (torch.cuda.max_memory_reserved(device) - base) // 2
    return {"headroom": headroom, "gc_collect_s": collect_s}


CONTENDERS: dict[str, Callable[[Recorder], Answer]] = {
    "none": no_guard,
    "accelerate": with_accelerate,
    "toma": with_toma,
    "torch-max-mem": with_torch_max_mem,
    "torchmemguard": with_torchmemguard,
}


def serve(model: Recorder, requests: list[torch.Tensor], config: dict[str, Any]) -> dict[str, Any]:
    """Warm up, cap, (for the oracle) search the chunks that fit, and serve the stream."""
    device = requests[0].device
    name = config["contender"]
    references = torch.load(config["references"], map_location=device)
    chunks = dict.fromkeys(LENGTHS, 1)  # the oracle's, filled in under the cap
    answer = oracle(model, chunks) if name == "oracle" else CONTENDERS[name](model)
    # Warm up the model at every length, then the contender's own code: whatever
    # they allocate for good (buffers, caches) belongs below the cap.
    for length in LENGTHS:
        model(torch.randint(VOCAB, (WARM_UP_BATCH, length), device=device))
        answer(torch.randint(VOCAB, (2, length), device=device))
    model.calls.clear()
    # Later collections skip everything alive now: what accelerate and toma pay
    # for their gc.collect() calls is then that of a lean service.
    gc.collect()
    gc.freeze()

    headroom = config["headroom"]
    cap: AddressSpaceCap | BudgetCap = (
        BudgetCap(device) if device.type == "cuda" else AddressSpaceCap()
    )
    optimum: dict[str, dict[int, int]] = {}
    if name == "oracle" and config.get("chunks"):  # found by the parent's calibration
        optimum = {
            phase: {int(n): size for n, size in sizes.items()}
            for phase, sizes in config["chunks"].items()
        }
        chunks.update(optimum["1"])
    elif name == "oracle":
        largest = {}
        for request in requests:
            if len(request) > len(largest.get(request.shape[1], ())):
                largest[request.shape[1]] = request
        for phase, room in (("1", headroom), ("2", 2 * headroom)):
            optimum[phase] = {n: cap.search(model, r, room) for n, r in largest.items()}
        chunks.update(optimum["1"])
    cap.set(headroom)

    switch = len(requests) // 2

    def held() -> int:
        return address_space() if device.type == "cpu" else torch.cuda.memory_reserved(device)

    stream_base = held()
    print("ready", json.dumps(optimum), flush=True)
    for index, request in enumerate(requests):
        # This contender's turn: the parent hands out turns request by request.
        if not sys.stdin.readline():
            raise SystemExit("the parent has gone")
        if index == switch:
            cap.set(2 * headroom)
            chunks.update(optimum.get("2", {}))
        model.calls.clear()
        error = None
        started = time.perf_counter()
        try:
            output: torch.Tensor | None = answer(request)
            sync(device)
        except Exception as exc:  # the request failed, whatever the reason
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            output = None
        record: dict[str, Any] = {
            "s": time.perf_counter() - started,
            "calls": list(model.calls),
            "error": error,
        }
        if output is not None:
            expected = references[index]
            same_shape = output.shape == expected.shape
            record["equal"] = same_shape and torch.allclose(output, expected, rtol=RTOL, atol=ATOL)
            record["identical"] = same_shape and torch.equal(output, expected)
            record["diff"] = (output - expected).abs().max().item() if same_shape else math.inf
            del output
        if name == "torchmemguard":
            record["learned"] = {
                key.shapes[0][0]: size for key, size in answer.oom_guard.learned().items()
            }
        # Out at once, not kept: what the child keeps would eat into the headroom.
        print("request", json.dumps(record), flush=True)
        del record
    stream_end = held()
    cap.lift()
    result: dict[str, Any] = {
        "base_bytes": cap.base,
        "stream_base_bytes": stream_base,
        "stream_end_bytes": stream_end,
        "headroom_bytes": [headroom, 2 * headroom],
        "optimum": optimum,
    }
    if name == "torchmemguard":
        result["guard_stats"] = asdict(answer.oom_guard.stats)
    return result


def main(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    # As in tests/realcap.py: one thread (no thread pool resized under the cap, the
    # same memory use from run to run) and no oneDNN. glibc runs as the parent set
    # it (its defaults, or a fixed mmap threshold with --tuned), read at start-up.
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    torch.manual_seed(0)
    device = torch.device(config["device"])
    model = Recorder(Encoder()).eval().to(device)
    requests = [r.to(device) for r in make_requests(config["requests"], config["seed"])]
    with torch.no_grad():
        task = reference if config["task"] == "reference" else serve
        result = task(model, requests, config)
    Path(config["output"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
