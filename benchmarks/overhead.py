"""Time per call on the happy path (no out-of-memory error), guarded and bare.

Runs the contenders interleaved, one timing block each per round, and reports
the median and spread over rounds, in microseconds per call.

    python benchmarks/overhead.py [--rounds 15] [--calls 20000]
"""

from __future__ import annotations

import argparse
import statistics
import timeit
from collections.abc import Callable

import torch
import wrapt

import torchmemguard


def contenders() -> dict[str, dict[str, Callable[[], object]]]:
    """Workload name -> contender name -> a call with its input bound."""
    tiny = torch.ones(4)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64)
    ).eval()
    x = torch.randn(32, 64)

    def op(t: torch.Tensor) -> torch.Tensor:
        return t.add(1)

    def empty_wrapper(
        wrapped: Callable[..., object], instance: object, args: tuple[object, ...], kwargs: dict
    ) -> object:
        return wrapped(*args, **kwargs)

    def noop(t: torch.Tensor) -> torch.Tensor:
        return t

    guarded_noop = torchmemguard.oom_safe(noop)
    wrapt_noop = wrapt.FunctionWrapper(noop, empty_wrapper)
    guarded_op = torchmemguard.oom_safe(op)
    guarded_mlp = torchmemguard.guard(mlp)
    return {
        # The floor: what any wrapt-based decorator costs, with a wrapper that does nothing.
        "no-op function": {
            "bare": lambda: noop(tiny),
            "wrapt, empty wrapper": lambda: wrapt_noop(tiny),
            "oom_safe": lambda: guarded_noop(tiny),
        },
        "tiny op": {
            "bare": lambda: op(tiny),
            "oom_safe": lambda: guarded_op(tiny),
        },
        "small MLP": {
            "bare": lambda: mlp(x),
            "guard(module)": lambda: guarded_mlp(x),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with torch.no_grad():
        for workload, calls in contenders().items():
            times: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(args.rounds):
                for name, call in calls.items():
                    seconds = timeit.timeit(call, number=args.calls)
                    times[name].append(seconds / args.calls * 1e6)
            bare = statistics.median(times["bare"])
            print(f"{workload}:")
            for name, samples in times.items():
                median = statistics.median(samples)
                spread = statistics.quantiles(samples, n=4)
                print(
                    f"  {name:22} {median:8.3f} us/call  (IQR {spread[0]:.3f}-{spread[2]:.3f})"
                    f"  +{median - bare:.3f} us  x{median / bare:.2f}"
                )


if __name__ == "__main__":
    main()
