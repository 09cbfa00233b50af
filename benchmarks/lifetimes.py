"""A long-lived guard and a fresh guard per call, under a real memory cap, beside an oracle.

A matmul-heavy MLP (Linear 1024→4096, ReLU, 4096→4096, ReLU, 4096→1024) answers
the same batch of 2048 rows 12 times, under ``RLIMIT_AS`` at the address space a
child holds after its warm-up plus 48 MiB: the whole batch takes about four
times that. Three contenders, each in a process of its own:

- the oracle: the batch in chunks of the largest size that runs the whole
  stream under the cap in each of three fresh processes, found beforehand by
  bisection;
- torchmemguard, one ``oom_safe`` function for the stream (long-lived);
- torchmemguard, a new ``oom_safe`` function for every call (fresh), as a
  request handler that decorates inside itself would make.

The children run one thread, with oneDNN off and glibc's defaults (``--tuned``:
``MALLOC_MMAP_THRESHOLD_=65536``; results in ``results/lifetimes-tuned.json``).
The parent hands out turns call by call, one process working at a time, the
order rotating with the call, so that the machine's drift in speed falls on
every contender alike. Each child reports per call its wall time, the attempts
its function received (OOMs included) and whether the answer equals the
reference, computed in the child before the cap, bitwise. Throughput (answered
calls per second; a failed call costs its time) and attempts count the calls
after the first; medians over runs.

    python -m benchmarks.lifetimes [--runs 3] [--calls 12] [--tuned]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks.results import ROOT, address_space, child_environment, save

CONTENDERS = ("oracle", "long-lived", "fresh")
BATCH, WIDTH, HIDDEN, HEADROOM_MIB = 2048, 1024, 4096, 48
TIMEOUT_S = 600


def _child(kind: str, chunk: int) -> None:
    """Serve calls on stdin's turns: ``call`` runs one, ``end`` stops."""
    import gc
    import resource

    import torch

    import torchmemguard

    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(WIDTH, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, WIDTH),
    ).eval()
    batch = torch.randn(BATCH, WIDTH)
    attempts = [0]

    def body(x: torch.Tensor) -> torch.Tensor:
        attempts[0] += 1
        out: torch.Tensor = model(x)
        return out

    def oracle(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([body(x[i : i + chunk]) for i in range(0, BATCH, chunk)])

    with torch.no_grad():
        reference = torch.cat([model(batch[i : i + 256]) for i in range(0, BATCH, 256)])
    long_lived = torchmemguard.oom_safe(body)
    gc.collect()
    gc.freeze()
    space = address_space()
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (space + HEADROOM_MIB * 2**20, hard))
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "call":
            break
        attempts[0] = 0
        fn = {"oracle": oracle, "long-lived": long_lived}.get(kind)
        started = time.perf_counter()
        out = None
        try:
            with torch.no_grad():
                out = (fn or torchmemguard.oom_safe(body))(batch)
            equal, error = bool(torch.equal(out, reference)), None
        except Exception as exc:  # reported: a failed call is a result
            equal, error = False, f"{type(exc).__name__}: {str(exc)[:200]}"
        seconds = time.perf_counter() - started
        out = None
        print("done " + json.dumps([seconds, attempts[0], equal, error]), flush=True)


class _Child:
    def __init__(self, kind: str, chunk: int, tuned: bool) -> None:
        env = child_environment(tuned)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.lifetimes", "--child", kind, str(chunk)],
            cwd=ROOT, env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        self._expect("ready")

    def _expect(self, kind: str) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith(kind):
            self.process.kill()
            raise RuntimeError(f"child said {line!r}, expected {kind!r}")
        return line[len(kind) :].strip()

    def call(self) -> list[Any]:
        assert self.process.stdin is not None
        self.process.stdin.write("call\n")
        self.process.stdin.flush()
        found: list[Any] = json.loads(self._expect("done"))
        return found

    def end(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("end\n")
        self.process.stdin.close()
        self.process.wait(TIMEOUT_S)


def _fits(chunk: int, calls: int, tuned: bool) -> bool:
    """Whether chunks of ``chunk`` answer ``calls`` calls in each of 3 fresh processes:
    with glibc's defaults, what fits depends on the heap's history, so one process
    that got through does not make an oracle."""
    for _ in range(3):
        child = _Child("oracle", chunk, tuned)
        try:
            if not all(child.call()[3] is None for _ in range(calls)):
                return False
        finally:
            child.end()
    return True


def oracle_chunk(calls: int, tuned: bool) -> int:
    """The largest chunk that runs ``calls`` calls under the cap, by bisection."""
    low, high = 1, BATCH  # low fits (one row does), high is the first size not known
    while high - low > 8:
        middle = (low + high) // 2
        if _fits(middle, calls, tuned):
            low = middle
        else:
            high = middle
    return low


def serve(chunk: int, calls: int, run: int, tuned: bool) -> dict[str, list[list[Any]]]:
    children = {kind: _Child(kind, chunk, tuned) for kind in CONTENDERS}
    found: dict[str, list[list[Any]]] = {kind: [] for kind in CONTENDERS}
    for i in range(calls):
        turn = (i + run) % len(CONTENDERS)
        for kind in CONTENDERS[turn:] + CONTENDERS[:turn]:
            found[kind].append(children[kind].call())
    for child in children.values():
        child.end()
    return found


def tally(records: list[list[Any]]) -> dict[str, Any]:
    after = records[1:]
    return {
        # Answered calls per second of all of them: a failed call costs its time.
        "calls_per_s": sum(r[3] is None for r in after) / sum(r[0] for r in after),
        "attempts_after_first": [r[1] for r in after],
        "max_attempts_after_first": max(r[1] for r in after),
        "first_attempts": records[0][1],
        "all_equal": all(r[2] for r in records),
        "failed": sum(r[3] is not None for r in records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=12)
    parser.add_argument("--tuned", action="store_true", help="glibc's mmap threshold at 64 KiB")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], int(args.child[1]))
        return
    started = time.perf_counter()
    chunk = oracle_chunk(args.calls, args.tuned)
    oracle_chunks = -(-BATCH // chunk)
    runs = [serve(chunk, args.calls, run, args.tuned) for run in range(args.runs)]
    tallies = {kind: [tally(run[kind]) for run in runs] for kind in CONTENDERS}
    oracle_failed = sum(t["failed"] for t in tallies["oracle"])
    rows = [f"| oracle | 1.00 | {oracle_chunks} | {oracle_failed} | "
            f"{'yes' if all(t['all_equal'] for t in tallies['oracle']) else 'no'} |"]  # fmt: skip
    for kind in ("long-lived", "fresh"):
        ratio = statistics.median(
            t["calls_per_s"] / o["calls_per_s"]
            for t, o in zip(tallies[kind], tallies["oracle"], strict=True)
        )
        worst = max(t["max_attempts_after_first"] for t in tallies[kind])
        rows.append(
            f"| torchmemguard, {kind} guard | {ratio:.2f} | {worst} | "
            f"{sum(t['failed'] for t in tallies[kind])} | "
            f"{'yes' if all(t['all_equal'] for t in tallies[kind]) else 'no'} |"
        )
    allocator = "MALLOC_MMAP_THRESHOLD_=65536" if args.tuned else "glibc's defaults"
    table = "\n".join(
        [
            f"Oracle: chunks of {chunk} ({oracle_chunks} per call). Allocator: {allocator}. "
            f"Targets after the first call: at most {2 * oracle_chunks} attempts per call, "
            "at least 0.9 of the oracle's throughput.",
            "",
            "| contender | throughput / oracle's (median) | most attempts in a call after the "
            "first | failed calls | every answer equal |",
            "|---|---:|---:|---:|---|",
            *rows,
        ]
    )
    path = save(
        "lifetimes-tuned" if args.tuned else "lifetimes",
        {
            "setup": {
                "model": f"MLP {WIDTH}-{HIDDEN}-{HIDDEN}-{WIDTH}, ReLU",
                "batch": BATCH,
                "headroom_mib": HEADROOM_MIB,
                "calls": args.calls,
                "runs": args.runs,
                "allocator": allocator,
                "oracle_chunk": chunk,
                "wall_s": time.perf_counter() - started,
            },
            "runs": tallies,
            "markdown": table,
        },
    )
    print(table)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
