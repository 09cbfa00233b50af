"""The metrics on real CUDA: the gauges are the allocator's numbers; nothing starts CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

import torchmemguard

REPO = Path(__file__).resolve().parents[2]


def test_the_gauges_equal_the_allocator_statistics_read_at_the_same_moment() -> None:
    held = torch.empty(96 * 2**20, dtype=torch.uint8, device="cuda:0")
    registry = CollectorRegistry()
    torchmemguard.install_metrics(registry)
    torch.cuda.synchronize()
    stats = torch.cuda.memory_stats(0)
    free, total = torch.cuda.mem_get_info(0)
    scraped = {
        family.name: {sample.labels["device"]: sample.value for sample in family.samples}
        for family in registry.collect()
    }
    expected = {
        "torchmemguard_memory_allocated_bytes": stats["allocated_bytes.all.current"],
        "torchmemguard_memory_reserved_bytes": stats["reserved_bytes.all.current"],
        "torchmemguard_memory_active_bytes": stats["active_bytes.all.current"],
        "torchmemguard_memory_inactive_split_bytes": stats["inactive_split_bytes.all.current"],
        "torchmemguard_memory_peak_allocated_bytes": stats["allocated_bytes.all.peak"],
        "torchmemguard_memory_total_bytes": total,
        "torchmemguard_memory_free_bytes": free,
        "torchmemguard_allocator_retries": stats["num_alloc_retries"],
        "torchmemguard_allocator_ooms": stats["num_ooms"],
    }
    for name, value in expected.items():
        assert scraped[name]["cuda:0"] == value, name
    assert scraped["torchmemguard_memory_used_ratio"]["cuda:0"] == (total - free) / total
    del held


def test_importing_and_installing_metrics_creates_no_cuda_context() -> None:
    code = (
        "import json, torch, torchmemguard\n"
        "from prometheus_client import CollectorRegistry, generate_latest\n"
        "registry = CollectorRegistry()\n"
        "torchmemguard.install_metrics(registry)\n"
        "text = generate_latest(registry).decode()\n"
        "has = getattr(torch._C, '_cuda_hasPrimaryContext', None)\n"
        "print(json.dumps({'initialized': torch.cuda.is_initialized(),\n"
        "    'context': None if has is None else bool(has(0)),\n"
        "    'cuda_series': 'device=\"cuda' in text}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert json.loads(out.splitlines()[-1]) == {
        "initialized": False,
        "context": False,
        "cuda_series": False,
    }
