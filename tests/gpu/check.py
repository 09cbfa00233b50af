"""``make gpu-check``: the GPU suite and the benchmarks' GPU paths, in one command.

Runs every ``test_*`` function of ``tests/gpu`` (its own small runner, so that a
GPU machine without pytest can run it), then the GPU paths of the benchmarks,
and writes ``report.json`` and ``report.txt`` into ``$TORCHMEMGUARD_REPORT_DIR``
(default ``benchmarks/results/gpu-check``). It needs only what such a machine
has: torch, wrapt and prometheus_client; the package comes from the working
tree (``PYTHONPATH``). Without a CUDA device it says so and runs nothing.

    PYTHONPATH=. python tests/gpu/check.py
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
GPU_TESTS = Path(__file__).resolve().parent
# The benchmarks' GPU paths: (name, module, arguments, time limit in seconds).
BENCHMARKS: list[tuple[str, str, list[str], int]] = [
    ("overhead", "benchmarks.overhead", ["--device", "cuda", "--rounds", "7"], 90),
    ("scrape", "benchmarks.scrape", ["--device", "cuda", "--rounds", "7"], 60),
    ("recovery", "benchmarks.recovery", [], 240),
]


def _environment() -> dict[str, Any]:
    found: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "python": platform.python_version(),
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    found["git_commit"] = commit or "unknown"
    if torch.cuda.is_available():
        found["device"] = torch.cuda.get_device_name(0)
        found["device_count"] = torch.cuda.device_count()
        found["total_memory"] = torch.cuda.get_device_properties(0).total_memory
    return found


def run_tests() -> list[dict[str, Any]]:
    """Every test function of tests/gpu, in file order, each on a clean allocator."""
    outcomes = []
    for path in sorted(GPU_TESTS.glob("test_*.py")):
        module = importlib.import_module(f"tests.gpu.{path.stem}")
        for name, test in vars(module).items():
            if not (name.startswith("test_") and callable(test)):
                continue
            torch.cuda.set_per_process_memory_fraction(1.0, 0)
            torch.cuda.empty_cache()
            started = time.perf_counter()
            try:
                test()
                outcome, detail = "passed", ""
            except Exception:
                outcome, detail = "failed", traceback.format_exc()
            seconds = time.perf_counter() - started
            print(f"{outcome.upper():7} {path.stem}::{name} ({seconds:.1f} s)", flush=True)
            outcomes.append(
                {
                    "test": f"{path.stem}::{name}",
                    "outcome": outcome,
                    "seconds": round(seconds, 2),
                    "detail": detail,
                }
            )
    return outcomes


def run_benchmarks() -> list[dict[str, Any]]:
    """Each benchmark's GPU path in a process of its own, with its results file."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    found = []
    for name, module, args, limit in BENCHMARKS:
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", module, *args],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=limit,
            )
            outcome = "passed" if proc.returncode == 0 else f"exit {proc.returncode}"
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            outcome = f"timed out after {limit} s"
            output = f"{exc.stdout or ''}{exc.stderr or ''}"
        seconds = time.perf_counter() - started
        print(f"{outcome.upper():7} benchmark {name} ({seconds:.0f} s)", flush=True)
        result_file = REPO / "benchmarks" / "results" / f"{name}-gpu.json"
        results = json.loads(result_file.read_text()) if result_file.exists() else None
        found.append(
            {
                "benchmark": name,
                "outcome": outcome,
                "seconds": round(seconds, 1),
                "output_tail": output[-4000:],
                "results": results,
            }
        )
    return found


def _text(report: dict[str, Any]) -> str:
    lines = [f"torchmemguard GPU check: {report['status']}", ""]
    lines += [f"{key}: {value}" for key, value in report["environment"].items()]
    if report["status"] == "no CUDA device found":
        return "\n".join(lines) + "\n"
    lines.append("")
    for test in report["tests"]:
        lines.append(f"{test['outcome']:7} {test['test']} ({test['seconds']} s)")
        if test["detail"]:
            lines.append(test["detail"])
    lines.append("")
    for bench in report["benchmarks"]:
        lines.append(f"{bench['outcome']:7} benchmark {bench['benchmark']} ({bench['seconds']} s)")
        markdown = (bench["results"] or {}).get("markdown")
        if markdown:
            lines += ["", markdown, ""]
        elif bench["outcome"] != "passed":
            lines.append(bench["output_tail"])
    return "\n".join(lines) + "\n"


def main() -> int:
    report_dir = Path(
        os.environ.get("TORCHMEMGUARD_REPORT_DIR", REPO / "benchmarks" / "results" / "gpu-check")
    )
    report_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"environment": _environment()}
    if not torch.cuda.is_available():
        report["status"] = "no CUDA device found"
        print(
            f"No CUDA device found (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}): the GPU suite did not run."
        )
    else:
        started = time.perf_counter()
        report["tests"] = run_tests()
        report["benchmarks"] = run_benchmarks()
        report["seconds"] = round(time.perf_counter() - started, 1)
        failed = [t for t in report["tests"] if t["outcome"] != "passed"]
        failed += [b for b in report["benchmarks"] if b["outcome"] != "passed"]
        report["status"] = f"{len(failed)} failed" if failed else "all passed"
    (report_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (report_dir / "report.txt").write_text(_text(report))
    print(f"{report['status']}; report in {report_dir}")
    return 1 if report["status"].endswith("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
