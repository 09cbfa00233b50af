"""Run a function in a fresh interpreter that can be put under a real memory cap.

The parent side is :func:`run_child`: it starts ``sys.executable`` in the
repository root, calls ``module:function(*args)`` there and returns the JSON
object that the function returned. The child side is :func:`prepare_child`,
:func:`address_space_cap`, :func:`describe_error` and the model the growth
scenarios share, :func:`per_token_encoder`.

The cap is ``RLIMIT_AS`` (address space): with it, torch's CPU allocator fails
for real (``DefaultCPUAllocator: can't allocate memory``), as a GPU allocator
does when the device is full. It is only ever set in a child: a capped pytest
process would fail in ways that have nothing to do with the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 120
MIB = 2**20

_RESULT_MARK = "REALCAP-RESULT "
_CHILD_FLAG = "TORCHMEMGUARD_REALCAP_CHILD"


def run_child(
    target: str,
    *args: Any,
    timeout: float = TIMEOUT_S,
    tuned: bool = False,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Call ``target`` (``"package.module:function"``) with ``args`` in a child process.

    ``args`` and the function's return value travel as JSON. Any failure of the
    child (an exception, a crash, a timeout, no result) raises AssertionError
    with the child's stdout and stderr, so that a failed test says why.

    The child runs with glibc's defaults, as users run it: no ``MALLOC_*``
    variable. ``tuned=True`` fixes the mmap threshold at 64 KiB, so that glibc
    returns every large block to the system as soon as it is freed and the
    address space follows the tensors held, run after run. The scenarios that
    are calibrated on where a whole batch runs out (which layer, forward or
    backward) take it: with the defaults, the heap keeps freed blocks, and
    that point moves with the heap's history. ``env`` adds variables to the
    child's environment.
    """
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")
    }
    environment.update(env or {})
    path = environment.get("PYTHONPATH", "")
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), path) if p)
    environment[_CHILD_FLAG] = "1"
    if tuned:
        environment["MALLOC_MMAP_THRESHOLD_"] = "65536"
    command = [
        sys.executable,
        "-c",
        "from tests.realcap import _child_main; _child_main()",
        target,
        json.dumps(args),
    ]
    try:
        proc = subprocess.run(
            command,
            cwd=REPO_ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"child {target} did not finish in {timeout} s\n"
            + _streams(_text(exc.stdout), _text(exc.stderr))
        ) from None
    results = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT_MARK)]
    if proc.returncode != 0 or len(results) != 1:
        raise AssertionError(
            f"child {target} exited with status {proc.returncode} "
            f"and {len(results)} result lines\n" + _streams(proc.stdout, proc.stderr)
        )
    result: dict[str, Any] = json.loads(results[0][len(_RESULT_MARK) :])
    return result


def _text(data: str | bytes | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def _streams(stdout: str, stderr: str) -> str:
    return f"--- child stdout ---\n{stdout[-4000:]}\n--- child stderr ---\n{stderr[-8000:]}"


def _child_main() -> None:
    """Entry point of the child: ``argv`` holds the target and its JSON arguments."""
    import importlib

    target, raw_args = sys.argv[1], sys.argv[2]
    module_name, _, function_name = target.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(*json.loads(raw_args))
    if not isinstance(result, dict):
        raise TypeError(f"{target} must return a dict for JSON, got {type(result).__name__}")
    sys.stdout.write(_RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------
# Child side


def _require_child() -> None:
    if os.environ.get(_CHILD_FLAG) != "1":
        raise RuntimeError("this helper caps memory: call it only in a child of run_child()")


def prepare_child(seed: int = 0) -> None:
    """Make the child's memory use repeatable: one thread, a fixed seed, no oneDNN.

    One thread means one set of per-thread buffers and no thread started under
    the cap. oneDNN (mkldnn) is off so that every allocation goes through
    torch's CPU allocator, whose failures the scenarios' headrooms are sized
    for; a scenario about oneDNN turns it back on.
    """
    _require_child()
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    torch.backends.mkldnn.enabled = False


def per_token_encoder() -> tuple[Any, Any, list[int]]:
    """A per-token MLP, an ``@oom_safe`` call of it that records each chunk's size, and
    that record.

    Its memory grows linearly with the tokens: at 16 tokens of width 256, a chunk
    of c sequences peaks at about c * 512 KiB (64 take 33 MiB, 128 take 65), and a
    sequence twice as long fits in chunks half as large.
    """
    import torch

    import torchmemguard

    model = torch.nn.Sequential(
        torch.nn.Linear(256, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 256)
    ).eval()
    sizes: list[int] = []

    @torchmemguard.oom_safe
    def encode(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        out: torch.Tensor = model(x)
        return out

    return model, encode, sizes


def vm_size() -> int:
    """The address space this process uses now, in bytes (``VmSize``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


@contextlib.contextmanager
def address_space_cap(headroom_mib: float) -> Iterator[int]:
    """Cap this child's address space at its current size plus ``headroom_mib`` MiB.

    Everything allocated inside the block must fit in the headroom; the cap is
    lifted on the way out, so the child can compare and report freely. Yields
    the limit in bytes.
    """
    _require_child()
    import gc
    import resource

    gc.collect()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm_size() + int(headroom_mib * MIB)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def describe_error(exc: BaseException | None) -> dict[str, Any] | None:
    """The facts about an exception that a test checks, as JSON."""
    if exc is None:
        return None
    import torchmemguard

    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "is_oom": torchmemguard.is_oom(exc),
    }
