"""torchmemguard demo: serve a stream of batches that do not all fit in memory.

A small sentence encoder (a transformer) answers 150 requests of mixed batch
sizes and sequence lengths, on the CPU, with this process's memory capped just
above what it already uses. Large requests run out of memory for real; the
guard catches each error, splits the batch, retries, merges the pieces, and
remembers the chunk size that fits for each shape.

Run it with ``make demo`` (or ``python examples/demo.py``). Linux only: the cap
is the address-space limit RLIMIT_AS.
"""

from __future__ import annotations

import contextlib
import ctypes
import random
import re
import resource
import sys
import time
from typing import Any

import torch
from tqdm import tqdm

import torchmemguard

REQUESTS = 150
LENGTHS = (32, 64, 128)  # tokens per sequence
BATCH_SIZES = range(8, 129)  # sequences per request
HEADROOM_MIB = 12  # memory the requests may use on top of what the process holds
VOCAB, WIDTH = 1000, 64


class SentenceEncoder(torch.nn.Module):
    """Token ids (batch, length) in, one embedding per sequence (batch, WIDTH) out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        layer = torch.nn.TransformerEncoderLayer(
            d_model=WIDTH, nhead=4, dim_feedforward=256, dropout=0.0, batch_first=True
        )  # ReLU activation, the default
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=2)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.encoder(self.embed(token_ids))
        return hidden.mean(dim=1)


def address_space() -> int:
    """Bytes of address space this process uses now (``VmSize``)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024  # in kB
    raise RuntimeError("no VmSize in /proc/self/status: this needs Linux")


def give_freed_memory_back_at_once() -> None:
    """Ask glibc to map every block of 64 KiB or more when it is allocated, and hand it
    straight back to the system when it is freed.

    By default it keeps some freed blocks for reuse, and they still count as
    address space: the cap would then leave the requests more room than it
    says, and a different amount on each run; and a block served from them is
    missed by the guard's measurement of what a chunk takes.
    """
    m_mmap_threshold = -3  # from glibc's <malloc.h>
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the cap is only looser
        ctypes.CDLL(None).mallopt(m_mmap_threshold, 2**16)


def main() -> int:
    give_freed_memory_back_at_once()
    # One thread: the thread pool is not resized under the cap, and memory use
    # is the same from run to run. oneDNN is off, so that every allocation is
    # the CPU allocator's, which the demo's cap was sized for.
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    torch.manual_seed(0)
    # The progress bar's monitor thread would need more stack than the cap leaves.
    tqdm.monitor_interval = 0
    rng = random.Random(0)

    model = SentenceEncoder().eval()
    requests = [
        torch.randint(VOCAB, (rng.choice(BATCH_SIZES), rng.choice(LENGTHS)))
        for _ in range(REQUESTS)
    ]
    largest = max(requests, key=lambda r: r.numel() * r.shape[1])

    print(f"Computing {REQUESTS} reference answers without any memory cap...", flush=True)
    with torch.no_grad():
        references = [model(r) for r in requests]

    served = torchmemguard.guard(model)
    limit = address_space() + HEADROOM_MIB * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    print(f"Memory capped: requests get {HEADROOM_MIB} MiB on top of what the process holds.")

    with torch.no_grad():
        try:
            model(largest)
            print("Without the guard: the largest request fitted (the cap is too loose).")
        except RuntimeError as exc:
            if not torchmemguard.is_oom(exc):
                raise
            print(
                f"Without the guard, the largest request ({largest.shape[0]} sequences of "
                f"{largest.shape[1]} tokens) fails: {_short(exc)}"
            )

        wrong = []
        max_diff = 0.0
        start = time.perf_counter()
        with progress(REQUESTS) as bar:
            for i, (request, reference) in enumerate(zip(requests, references, strict=True)):
                answer = served(request)
                # A chunk may take another matrix kernel than the whole batch and
                # round the last bits differently: 1e-5 allows that, nothing more.
                if answer.shape == reference.shape and torch.allclose(
                    answer, reference, rtol=1e-5, atol=1e-5
                ):
                    max_diff = max(max_diff, (answer - reference).abs().max().item())
                else:
                    wrong.append(i)
                bar.set_postfix(ooms_caught=served.oom_guard.stats.ooms)
                bar.update()
        elapsed = time.perf_counter() - start

    stats = served.oom_guard.stats
    learned = served.oom_guard.learned()
    sequences = sum(r.shape[0] for r in requests)
    print()
    print(f"Requests served:              {REQUESTS} ({sequences} sequences) in {elapsed:.1f} s")
    print(f"Out-of-memory errors caught:  {stats.ooms} ({stats.unrecovered} unrecovered)")
    print(f"Requests split into chunks:   {stats.split_calls}")
    print("Chunk sizes learned, per sequence length:")
    for shape, size in sorted(((_shape(key), size) for key, size in learned.items()), key=_natural):
        print(f"  {shape:>10}: at most {size} sequences per chunk")
    if wrong:
        print(f"WRONG: {len(wrong)} answers differ from the unguarded reference: {wrong}")
        return 1
    print(f"Every answer equals the unguarded reference (largest difference {max_diff:.1e}).")
    return 0


def progress(total: int) -> contextlib.AbstractContextManager[Any]:
    """A progress bar on a terminal; elsewhere (a pipe, a log file) a plain line now and then.

    A bar redraws itself with carriage returns, which a log keeps by the
    thousand.
    """
    if not sys.stdout.isatty():
        return _Lines(total)
    bar: contextlib.AbstractContextManager[Any] = tqdm(
        total=total, desc="With the guard", unit="request", file=sys.stdout
    )
    return bar


class _Lines(contextlib.AbstractContextManager["_Lines"]):
    """The progress bar's calls, answered with one line every ``every`` requests."""

    def __init__(self, total: int, every: int = 30) -> None:
        self.total, self.every = total, every
        self.done = self.ooms = 0
        self.start = time.perf_counter()

    def set_postfix(self, ooms_caught: int) -> None:
        self.ooms = ooms_caught

    def update(self) -> None:
        self.done += 1
        if self.done % self.every == 0 or self.done == self.total:
            seconds = time.perf_counter() - self.start
            print(
                f"With the guard: {self.done:>{len(str(self.total))}}/{self.total} requests"
                f" in {seconds:.1f} s, out-of-memory errors caught so far: {self.ooms}",
                flush=True,
            )

    def __exit__(self, *exc_info: object) -> None:
        return None


def _short(exc: BaseException) -> str:
    """The gist of an allocator error, in one line."""
    found = re.search(r"(can't allocate memory): you tried to allocate (\d+) bytes", str(exc))
    if found is None:
        return str(exc).splitlines()[0][:100]
    return f"{found[1]} ({int(found[2]) / 2**20:.1f} MiB more)."


def _shape(key: object) -> str:
    """A learned key for people: its shapes hold the shape of one sample."""
    try:
        first_shape, *_ = key.shapes  # type: ignore[attr-defined]
        (length,) = first_shape
        return f"{length} tokens"
    except (TypeError, IndexError, ValueError):
        return repr(key)


def _natural(item: tuple[str, int]) -> tuple[int, str]:
    return len(item[0]), item[0]


if __name__ == "__main__":
    sys.exit(main())
