"""What every benchmark shares: the environment it ran in, its summary statistics,
where it writes its results (``benchmarks/results/<name>.json``), and the address
space that a child's cap is set above."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from torchmemguard._device import host

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent


def child_environment(tuned: bool = False) -> dict[str, str]:
    """The environment of a benchmark's child process: this one's, with the repository
    first on ``PYTHONPATH`` and glibc's defaults (no ``MALLOC_*`` variable), as a
    user's process runs; ``tuned`` fixes glibc's mmap threshold at 64 KiB, so that
    every block of 64 KiB or more is mapped on its own and unmapped when freed, and
    the address space follows the tensors held (glibc reads it at start-up)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if tuned:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    return env


def environment() -> dict[str, Any]:
    """What a reader needs to compare two results: date, software, CPU, threads, device, commit."""
    # The GPU only where the benchmark used it: asking otherwise would start CUDA.
    device = "cpu"
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        device = torch.cuda.get_device_name(torch.cuda.current_device())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "git_commit": commit,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summary(samples: list[float]) -> dict[str, float]:
    """Median, quartiles and count of ``samples``."""
    ordered = sorted(samples)
    if len(ordered) == 1:
        low = high = ordered[0]
    else:
        low, _, high = statistics.quantiles(ordered, n=4, method="inclusive")
    return {"median": statistics.median(ordered), "q1": low, "q3": high, "n": len(ordered)}


def save(name: str, results: dict[str, Any]) -> Path:
    """Write ``results`` with the environment to ``benchmarks/results/<name>.json``."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **results}, indent=2) + "\n")
    return path


def address_space() -> int:
    """Bytes of address space this process uses now (``VmSize``)."""
    space = host.address_space()
    if space is None:
        raise RuntimeError("no VmSize in /proc/self/status: this needs Linux")
    return space
