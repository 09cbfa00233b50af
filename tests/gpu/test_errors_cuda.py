"""A sticky CUDA error is no OOM: never retried, and raised as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import json, torch, torchmemguard
attempts, raised = [], []

@torchmemguard.oom_safe
def gather(x):
    attempts.append(x.shape[0])
    try:
        out = x[torch.full((x.shape[0],), 10**6, device=x.device)]  # out of bounds
        torch.cuda.synchronize()
        return out
    except RuntimeError as exc:
        raised.append(exc)
        raise

try:
    gather(torch.zeros(8, device="cuda"))
except BaseException as exc:
    print(json.dumps({
        "same_object": bool(raised) and exc is raised[0],
        "type": type(exc).__name__,
        "message": str(exc).splitlines()[0],
        "attempts": attempts,
        "retries": gather.oom_guard.stats.retries,
        "is_oom": torchmemguard.is_oom(exc),
    }))
"""


def test_a_device_side_assert_is_raised_as_it_was_without_a_retry() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_LAUNCH_BLOCKING": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=300
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "device-side assert" in report["message"], report
    assert report["same_object"], report
    assert report["attempts"] == [8], report
    assert report["retries"] == 0, report
    assert report["is_oom"] is False, report
