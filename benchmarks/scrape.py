"""What a Prometheus scrape of torchmemguard's metrics costs: collect(), exposition, bytes.

Times ``collect()`` of each collector that ``install_metrics`` registers, and a
full exposition (``prometheus_client.generate_latest``) of a fresh
``CollectorRegistry`` that holds torchmemguard's metrics alone: once with the
guard counters' families empty, and once with their series present (a guard
has caught one synthetic out-of-memory error, and a module is guarded). First
without CUDA, then, where CUDA is available, again after CUDA is initialised
and holds a tensor, so that ``cuda:0`` is read too. Every figure is the median
over interleaved rounds, with its quartiles.

    python -m benchmarks.scrape [--rounds 21] [--block 0.1] [--device cpu]

``--device cuda`` requires CUDA and writes ``benchmarks/results/scrape-gpu.json``;
the default writes ``benchmarks/results/scrape.json``, with the CUDA rows
wherever CUDA is available.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

import torchmemguard
from benchmarks.results import environment, save, summary
from benchmarks.timing import Call, interleaved
from torchmemguard._device import nvml
from torchmemguard._observability.collectors import GpuCollector, MemoryCollector

SYNTHETIC_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 MiB (synthetic, raised by the benchmark)"
)


def collectors() -> dict[str, Collector]:
    """The collectors ``install_metrics`` registers here, fresh."""
    found: dict[str, Collector] = {"MemoryCollector.collect()": MemoryCollector()}
    if nvml.module() is not None:
        found["GpuCollector.collect()"] = GpuCollector()
    return found


def registry() -> CollectorRegistry:
    """A fresh registry with torchmemguard's metrics and nothing else."""
    fresh = CollectorRegistry()
    torchmemguard.install_metrics(fresh)
    return fresh


def catch_one_oom() -> None:
    """Run a guarded function that runs out of memory once, and guard a module, so that
    the guard series exist."""

    @torchmemguard.oom_safe
    def double(batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] > 2:
            raise torch.OutOfMemoryError(SYNTHETIC_OOM)
        return batch * 2

    double(torch.ones(4, 3))
    stats = getattr(double, "oom_guard").stats  # noqa: B009  # hidden from type checkers
    if stats.ooms != 1 or stats.split_calls != 1:
        raise RuntimeError(f"the guard did not catch the synthetic OOM once: {stats}")
    _modules.append(torchmemguard.guard(torch.nn.Linear(64, 64)))  # kept: its gauge stays


_modules: list[torch.nn.Module] = []


def samples_in(collector: Collector) -> int:
    return sum(len(family.samples) for family in collector.collect())


def sample_lines(exposition: bytes) -> int:
    return sum(1 for line in exposition.splitlines() if line and not line.startswith(b"#"))


def phase(
    without: CollectorRegistry,
    with_guard: CollectorRegistry,
    rounds: int,
    block: float,
    label: str,
) -> dict[str, Any]:
    """Every measurement of one state of the process (CUDA or not), interleaved."""
    found = collectors()
    calls: dict[str, Call] = {}
    sizes: dict[str, dict[str, int | None]] = {}
    for name, collector in found.items():
        calls[name] = _collect(collector)
        sizes[name] = {"bytes": None, "samples": samples_in(collector)}
    for name, reg in (
        ("generate_latest, guard series absent", without),
        ("generate_latest, guard series present", with_guard),
    ):
        calls[name] = _expose(reg)
        exposition = generate_latest(reg)
        sizes[name] = {"bytes": len(exposition), "samples": sample_lines(exposition)}
    timings, blocks = interleaved(calls, rounds, block, description=f"scrape, {label}")
    return {
        name: {"us": summary(timings[name]), "calls_per_block": blocks[name], **sizes[name]}
        for name in calls
    }


def _collect(collector: Collector) -> Call:
    return lambda: list(collector.collect())


def _expose(reg: CollectorRegistry) -> Call:
    return lambda: generate_latest(reg)


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    lines = [
        f"Scrape cost ({results['summary_line']}), µs per call: median [IQR] over "
        f"{results['rounds']} interleaved rounds. CUDA: {results['cuda']}.",
        "",
        "| CUDA | measured | µs per call | exposition bytes | samples |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, rows in results["phases"].items():
        for name, row in rows.items():
            us = row["us"]
            size = "—" if row["bytes"] is None else f"{row['bytes']:,}"
            lines.append(
                f"| {label} | {name} | {us['median']:.0f} [{us['q1']:.0f}, {us['q3']:.0f}] "
                f"| {size} | {row['samples']} |"
            )
    lines += ["", *(f"- {note}" for note in results["notes"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--block", type=float, default=0.1, help="seconds per timed block")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: CUDA required")
    args = parser.parse_args()
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    available = torch.cuda.is_available()
    if args.device == "cuda" and not available:
        parser.error("--device cuda: CUDA is not available")
    started = time.perf_counter()

    # The guard counters count from installation on: this registry sees the
    # synthetic OOM, the one installed after it has the families but no series.
    with_guard = registry()
    catch_one_oom()
    without = registry()

    phases: dict[str, Any] = {
        "not used": phase(without, with_guard, args.rounds, args.block, "CUDA not used")
    }
    notes = []
    # A scrape must never create a CUDA context (docs/metrics.md).
    initialised_by_scrape = available and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    cuda = "not available"
    held: torch.Tensor | None = None
    if available:
        held = torch.ones(1 << 20, device="cuda")  # 4 MiB, so that cuda:0 has allocations
        cuda = f"cuda:0, {torch.cuda.get_device_name(0)}"
        phases["cuda:0 in use"] = phase(without, with_guard, args.rounds, args.block, "CUDA")
        notes.append(
            "Before CUDA was used, the scrapes left it uninitialised: "
            f"{'no' if initialised_by_scrape else 'yes'}."
        )
    notes += [
        "samples: what one collect() yields, or the sample lines of one exposition.",
        "The registries hold torchmemguard's metrics alone (not prometheus_client's "
        "default process, platform and gc collectors).",
        "The guard series come from one synthetic torch.OutOfMemoryError "
        f"({SYNTHETIC_OOM!r}) caught by a guarded function on a CPU batch; prometheus_client "
        "adds a *_created series to each counter series.",
    ]
    if nvml.module() is None:
        notes.append("nvidia-ml-py is not installed: no GpuCollector (utilisation, temperature).")
    del held

    env = environment()
    results: dict[str, Any] = {
        "benchmark": "scrape",
        "unit": "µs per call",
        "cuda": cuda,
        "cuda_initialised_by_scrape": initialised_by_scrape,
        "summary_line": f"{env['cpu']}, torch {env['torch']}, commit {env['git_commit']}",
        "rounds": args.rounds,
        "block_seconds": args.block,
        "notes": notes,
        "phases": phases,
    }
    results["markdown"] = markdown(results)
    path = save("scrape-gpu" if args.device == "cuda" else "scrape", results)
    print(results["markdown"])
    print(f"Wrote {path} in {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
