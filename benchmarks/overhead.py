"""Time per call on the happy path (no out-of-memory error): torchmemguard, its peers, bare.

Two workloads: a tiny op, where the wrapper's cost is a large share of the call, and a
small MLP. Each runs bare; through the wrapt layer that torchmemguard is built
on, doing nothing (a ``FunctionWrapper`` for the function, an ``ObjectProxy``
for the module): the floor of any decorator built that way; through
torchmemguard (fresh; after it has learned a chunk size; after another shape,
and ten other shapes, learned a smaller one); and through
accelerate's ``find_executable_batch_size`` and toma's ``toma.batch`` where they
are installed (the ``bench`` extra).

The contenders are interleaved: each round times one block of calls of every
contender, in an order that rotates from round to round, and every figure is
the median over rounds with its quartiles. A block holds as many calls as fill
``--block`` seconds (at least one), sized once before the rounds. The garbage
collector is off inside a block, as in ``timeit``; accelerate and toma call
``gc.collect()`` themselves. The extra time is taken round by round against
the bare call of the same round.

    python -m benchmarks.overhead [--rounds 31] [--block 0.2] [--device cpu]

Writes ``benchmarks/results/overhead.json`` (``overhead-gpu.json`` on CUDA).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import wrapt

import torchmemguard
from benchmarks.results import environment, save, summary
from benchmarks.timing import Call, interleaved

# What the issue allows torchmemguard to add to a call that does not run out of memory.
TARGET_US = 1.5
PEERS = ("accelerate", "toma")


@dataclass
class Contender:
    """One way of making the workload's call, with the library it measures."""

    call: Call
    library: str  # "none" for the bare call


@dataclass
class Workload:
    """A call measured several ways."""

    name: str
    description: str
    contenders: dict[str, Contender] = field(default_factory=dict)
    guards: list[Any] = field(default_factory=list)  # torchmemguard's, checked after timing
    before: list[Any] = field(default_factory=list)  # their counters before the timing

    def arm(self) -> None:
        """Note the guards' counters before the timing."""
        self.before = [guard.oom_guard.stats for guard in self.guards]

    def check_happy(self) -> None:
        """Fail if a guard caught an OOM or split a call while it was timed."""
        for guard, before in zip(self.guards, self.before, strict=True):
            stats = guard.oom_guard.stats
            if stats != before:
                raise RuntimeError(
                    f"{self.name}: a timed call was not on the happy path: {before} -> {stats}"
                )


def empty_wrapper(
    wrapped: Callable[..., Any],
    instance: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    return wrapped(*args, **kwargs)


class _ScarceTensor(torch.Tensor):
    """A tensor whose ``add`` runs out of memory past ``fits`` rows: it teaches a guard a
    limit."""

    fits = 4

    def add(self, other: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.shape[0] > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. (synthetic, to teach the guard)")
        return torch.Tensor.add(self, other, *args, **kwargs)


class _ScarcerTensor(_ScarceTensor):
    fits = 2


class EmptyProxy(wrapt.ObjectProxy[torch.nn.Module]):
    """A module proxy whose ``__call__`` only calls: the layer ``guard(module)`` is built on."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__wrapped__(*args, **kwargs)


def _fails_above(rows: int) -> Callable[[torch.nn.Module, tuple[Any, ...]], None]:
    """A forward pre-hook that runs out of memory for batches of more than ``rows``."""

    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if args[0].shape[0] > rows:
            raise torch.OutOfMemoryError("CUDA out of memory. (synthetic, to teach the guard)")

    return hook


def _learned(guarded: object, teach: Call, shapes: int = 1) -> None:
    """Run ``teach`` once, and check that the guard learned a limit for ``shapes`` shapes."""
    teach()
    guard = getattr(guarded, "oom_guard")  # noqa: B009  # hidden from type checkers
    if len(guard.learned()) != shapes or not guard.stats.ooms:
        raise RuntimeError(f"the guard learned {guard.learned()} with {guard.stats}")


def frozen(fn: Callable[[torch.Tensor], object], batch: torch.Tensor) -> object:
    """``fn(batch)`` with the heap frozen (``gc.freeze``): a ``gc.collect()`` inside scans
    only what was made since, as in a service that freezes its heap after start-up."""
    gc.freeze()
    try:
        return fn(batch)
    finally:
        gc.unfreeze()


def peer_contenders(
    fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor
) -> tuple[dict[str, Contender], dict[str, str]]:
    """accelerate and toma around ``fn``, as their documentation shows; and the peers missing.

    Both hand the decorated function a batch size as its first argument and
    leave cutting the batch to it: the adapter below is the least a user writes
    to run ``fn(batch)`` that way. On the happy path it makes one chunk, a view,
    and one ``torch.cat`` of one tensor (a copy), which costs microseconds.
    """
    found: dict[str, Contender] = {}
    missing: dict[str, str] = {}
    try:
        from accelerate.utils import find_executable_batch_size  # type: ignore[import-untyped]
    except ImportError as exc:
        missing["accelerate"] = f"not installed ({exc})"
    else:

        @find_executable_batch_size(starting_batch_size=len(batch))  # type: ignore[untyped-decorator]
        def accelerate_fn(batch_size: int, batch: torch.Tensor) -> torch.Tensor:
            return torch.cat([fn(chunk) for chunk in torch.split(batch, batch_size)])

        found["accelerate find_executable_batch_size"] = Contender(
            lambda: accelerate_fn(batch), "accelerate"
        )
        found["accelerate, heap frozen"] = Contender(
            lambda: frozen(accelerate_fn, batch), "accelerate"
        )
    try:
        from toma import toma  # type: ignore[import-untyped]
    except ImportError as exc:
        missing["toma"] = f"not installed ({exc})"
    else:

        @toma.batch(initial_batchsize=len(batch))  # type: ignore[untyped-decorator]
        def toma_fn(batch_size: int, batch: torch.Tensor) -> torch.Tensor:
            return torch.cat([fn(chunk) for chunk in torch.split(batch, batch_size)])

        found["toma.batch"] = Contender(lambda: toma_fn(batch), "toma")
        found["toma.batch, heap frozen"] = Contender(lambda: frozen(toma_fn, batch), "toma")
    return found, missing


def workloads(device: torch.device) -> tuple[list[Workload], dict[str, str]]:
    """The two workloads with their contenders, and the peers that could not run."""
    t = torch.ones(4, device=device)

    def new_op() -> Callable[[torch.Tensor], torch.Tensor]:
        # A function of its own for each guard: guards of one function share what
        # they learn.
        def op(t: torch.Tensor) -> torch.Tensor:
            return t.add(1)

        return op

    op = new_op()
    guarded_op = torchmemguard.oom_safe(new_op())
    learned_op = torchmemguard.oom_safe(new_op())
    # One synthetic OOM on 8 rows: the guard learns 4, and 4-row calls then take
    # the path of a guard that has learned a limit (one look at the batch size).
    scarce = torch.ones(8, device=device).as_subclass(_ScarceTensor)
    _learned(learned_op, lambda: learned_op(scarce))
    # A limit of 2 rows learned for another shape, then for ten other shapes: t's 4
    # rows are above every limit, yet t's own shape fits whole (its first call
    # finds that out, before the timing).
    other_op = torchmemguard.oom_safe(new_op())
    _learned(other_op, lambda: other_op(torch.ones(8, 3).as_subclass(_ScarcerTensor)))
    ten_op = torchmemguard.oom_safe(new_op())
    _learned(
        ten_op,
        lambda: [ten_op(torch.ones(8, w).as_subclass(_ScarcerTensor)) for w in range(1, 11)],
        shapes=10,
    )
    for warmed in (other_op, ten_op):
        warmed(t)
    wrapped_op = wrapt.FunctionWrapper(op, empty_wrapper)
    tiny = Workload("tiny op", f"t.add(1), t of 4 elements on {device}")
    tiny.contenders = {
        "bare": Contender(lambda: op(t), "none"),
        "wrapt, empty wrapper": Contender(lambda: wrapped_op(t), "wrapt"),
        "@oom_safe": Contender(lambda: guarded_op(t), "torchmemguard"),
        "@oom_safe, limit learned": Contender(lambda: learned_op(t), "torchmemguard"),
        "@oom_safe, another shape's limit learned": Contender(lambda: other_op(t), "torchmemguard"),
        "@oom_safe, 10 other shapes learned": Contender(lambda: ten_op(t), "torchmemguard"),
    }
    tiny.guards = [guarded_op, learned_op, other_op, ten_op]
    peers, missing = peer_contenders(op, t)
    tiny.contenders.update(peers)

    mlp = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64)
    ).to(device)
    mlp.eval()
    x = torch.randn(32, 64, device=device)
    guarded_mlp = torchmemguard.guard(mlp)
    # Guards of one module with equal options share what they learn: another option,
    # which the happy path never reads, keeps this one's limit its own.
    learned_mlp = torchmemguard.guard(mlp, max_retries=15)
    hook = mlp.register_forward_pre_hook(_fails_above(32))
    try:
        _learned(learned_mlp, lambda: learned_mlp(torch.randn(64, 64, device=device)))
    finally:
        hook.remove()
    proxied_mlp = EmptyProxy(mlp)
    small = Workload("small MLP", f"Linear(64, 256), ReLU, Linear(256, 64) on 32x64, {device}")
    small.contenders = {
        "bare": Contender(lambda: mlp(x), "none"),
        "wrapt, empty proxy": Contender(lambda: proxied_mlp(x), "wrapt"),
        "guard(module)": Contender(lambda: guarded_mlp(x), "torchmemguard"),
        "guard(module), limit learned": Contender(lambda: learned_mlp(x), "torchmemguard"),
    }
    small.guards = [guarded_mlp, learned_mlp]
    peers, _ = peer_contenders(mlp, x)
    small.contenders.update(peers)
    return [tiny, small], missing


def gc_collect_ms(repeat: int = 5) -> dict[str, float]:
    """What one full ``gc.collect()`` costs in this process, in milliseconds."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        gc.collect()
        samples.append((time.perf_counter() - start) * 1e3)
    return summary(samples)


def measure(
    found: list[Workload], rounds: int, block: float, sync: Callable[[], None]
) -> tuple[dict[tuple[str, str], list[float]], dict[tuple[str, str], int]]:
    """Microseconds per call of every (workload, contender), one sample per round,
    all interleaved; and the calls in each one's block."""
    calls = {(w.name, name): c.call for w in found for name, c in w.contenders.items()}
    return interleaved(calls, rounds, block, sync, "overhead")


def verdict(added: dict[str, float]) -> str:
    """Whether the added time meets the target, read with its spread."""
    if added["q3"] <= TARGET_US:
        return "met"
    if added["q1"] > TARGET_US:
        return "NOT met"
    side = "met" if added["median"] <= TARGET_US else "NOT met"
    return f"{side} by the median, but the IQR straddles the target"


def _us(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    if abs(value) >= 10:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _signed(value: float) -> str:
    return ("-" if value < 0 else "+") + _us(abs(value))


def _ratio(value: float) -> str:
    return f"{value:,.0f}x" if value >= 100 else f"{value:.2f}x"


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown table, the verdict on the target, and what the peers do."""
    lines = [
        f"Happy-path overhead on {results['device']} ({results['summary_line']}), "
        f"µs per call: median [IQR] over {results['rounds']} interleaved rounds; "
        "added time and ratio are taken against the bare call of the same round.",
        "",
        "| workload | contender | µs per call | added to bare, µs | ratio to bare |",
        "| --- | --- | --- | --- | --- |",
    ]
    verdicts = []
    for workload, entry in results["workloads"].items():
        for name, row in entry["contenders"].items():
            t = row["us_per_call"]
            cell = f"{_us(t['median'])} [{_us(t['q1'])}, {_us(t['q3'])}]"
            added = ratio = "—"
            if row["added_us"] is not None:
                a = row["added_us"]
                added = f"{_signed(a['median'])} [{_signed(a['q1'])}, {_signed(a['q3'])}]"
                ratio = _ratio(row["ratio"]["median"])
            lines.append(f"| {workload} | {name} | {cell} | {added} | {ratio} |")
            if row["library"] == "torchmemguard":
                a = row["added_us"]
                met = row["verdict"]
                over = row["added_over_wrapt_us"]
                verdicts.append(
                    f"- {workload}, {name}: {a['median']:+.2f} µs [{a['q1']:+.2f}, "
                    f"{a['q3']:+.2f}]: {met}; {over['median']:+.2f} µs "
                    f"[{over['q1']:+.2f}, {over['q3']:+.2f}] against the {row['wrapt_floor']!r} row"
                )
    lines += ["", f"Target: torchmemguard adds at most {TARGET_US} µs per call.", *verdicts, ""]
    lines += [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--block", type=float, default=0.2, help="seconds per timed block")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args()
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device {args.device}: {exc}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())

        def sync() -> None:
            torch.cuda.synchronize(device)
    else:

        def sync() -> None:
            pass

    torch.set_num_threads(1)
    started = time.perf_counter()
    with torch.no_grad():
        found, missing = workloads(device)
        for workload in found:
            workload.arm()
        samples, sizes = measure(found, args.rounds, args.block, sync)
    for workload in found:
        workload.check_happy()
    objects = len(gc.get_objects())
    collect = gc_collect_ms()

    out: dict[str, Any] = {}
    for w in found:
        bare = samples[w.name, "bare"]
        floor_name = next(n for n, c in w.contenders.items() if c.library == "wrapt")
        floor = samples[w.name, floor_name]
        rows: dict[str, Any] = {}
        for name, contender in w.contenders.items():
            mine = samples[w.name, name]
            row: dict[str, Any] = {
                "library": contender.library,
                "us_per_call": summary(mine),
                "samples_us": mine,
                "added_us": None,
                "ratio": None,
            }
            if name != "bare":
                added = [m - b for m, b in zip(mine, bare, strict=True)]
                row["added_us"] = summary(added)
                row["ratio"] = summary([m / b for m, b in zip(mine, bare, strict=True)])
            if contender.library == "torchmemguard":
                row["meets_target"] = row["added_us"]["median"] <= TARGET_US
                row["verdict"] = verdict(row["added_us"])
                row["wrapt_floor"] = floor_name
                row["added_over_wrapt_us"] = summary(
                    [m - f for m, f in zip(mine, floor, strict=True)]
                )
            rows[name] = row
        out[w.name] = {"description": w.description, "contenders": rows}

    versions: dict[str, str | None] = {}
    for peer in PEERS:
        try:
            versions[peer] = importlib.metadata.version(peer)
        except importlib.metadata.PackageNotFoundError:
            versions[peer] = None
    notes = []
    if "accelerate" not in missing:
        notes.append(
            f"accelerate {versions['accelerate']}: every call runs gc.collect() and "
            "clear_device_cache() (torch.cuda.empty_cache() where CUDA is available, after "
            "probing XPU, MLU, SDAA, MUSA, NPU and MPS), and reads the function's signature "
            "(inspect.signature)."
        )
    if "toma" not in missing:
        notes.append(
            f"toma {versions['toma']}: every call runs gc.collect() twice (and "
            "torch.cuda.empty_cache() where CUDA is available), walks the whole stack with "
            "inspect.stack() for its cache key, and asks psutil for the available memory."
        )
    notes += [
        f"A full gc.collect() takes {collect['median']:.1f} ms "
        f"[{collect['q1']:.1f}, {collect['q3']:.1f}] in this process "
        f"({objects:,} objects tracked by the collector): the peers' cost grows with the heap.",
    ]
    if len(missing) < len(PEERS):
        notes.append(
            "The peers take a batch size, not a batch: their rows include the adapter a user "
            "writes, one split and one torch.cat (microseconds)."
        )
        notes.append(
            "heap frozen: gc.freeze() before each call and gc.unfreeze() after, so that the "
            "peers' gc.collect() scans almost nothing: what they cost besides the collection."
        )
    notes += [f"{peer}: {why}; its rows are left out." for peer, why in missing.items()]
    env = environment()
    env_line = (
        f"{env['cpu']}, {env['torch_threads']} torch thread(s), torch {env['torch']}, "
        f"commit {env['git_commit']}"
    )
    results: dict[str, Any] = {
        "benchmark": "overhead",
        "unit": "µs per call",
        "device": str(device),
        "summary_line": env_line,
        "rounds": args.rounds,
        "block_seconds": args.block,
        "calls_per_block": {f"{w} / {n}": calls for (w, n), calls in sizes.items()},
        "target_us": TARGET_US,
        "peers": versions,
        "gc_tracked_objects": objects,
        "gc_collect_ms": collect,
        "notes": notes,
        "workloads": out,
    }
    results["markdown"] = markdown(results)
    name = "overhead" if device.type == "cpu" else "overhead-gpu"
    path = save(name, results)
    print(results["markdown"])
    print(f"Wrote {path} in {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
