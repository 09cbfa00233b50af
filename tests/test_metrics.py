"""install_metrics, start_metrics_server, and the guard counters."""

from __future__ import annotations

import gc
import subprocess
import sys
import urllib.request

import prometheus_client
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

import torchmemguard
from torchmemguard import OutOfMemoryError, oom_safe
from torchmemguard._observability import metrics

from .conftest import ChunkLimit, rows


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_installed", {})
    monkeypatch.setattr(metrics, "_functions", set())
    monkeypatch.setattr(metrics, "_devices", set())


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    torchmemguard.install_metrics(registry)
    return registry


def count(registry: CollectorRegistry, name: str, function: str, device: str) -> float | None:
    return registry.get_sample_value(
        f"torchmemguard_{name}", {"function": function, "device": device}
    )


def guarded(limit: int, name: str = "forward") -> ChunkLimit:
    model = ChunkLimit(limit, message="CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0;")
    model.__qualname__ = name  # type: ignore[attr-defined]
    return model


def test_the_guard_counts_ooms_retries_and_split_calls(registry: CollectorRegistry) -> None:
    forward = oom_safe(guarded(limit=3))
    forward(rows(8))  # 8 fails, 4 fails, then chunks of 2
    assert count(registry, "oom_total", "forward", "cuda:0") == 2
    assert count(registry, "retries_total", "forward", "cuda:0") == 2
    assert count(registry, "split_calls_total", "forward", "cuda:0") == 1
    assert count(registry, "chunk_size", "forward", "cuda:0") == 2


def test_a_registry_that_was_dropped_is_no_longer_counted() -> None:
    torchmemguard.install_metrics(CollectorRegistry())
    assert len(metrics._installed) == 1
    gc.collect()
    oom_safe(guarded(limit=3))(rows(4))
    assert metrics._installed == {}


def test_the_unrecovered_series_starts_at_zero_with_the_first_oom(
    registry: CollectorRegistry,
) -> None:
    oom_safe(guarded(limit=3))(rows(4))
    assert count(registry, "unrecovered_total", "forward", "cuda:0") == 0


def test_a_call_that_still_fails_is_counted_unrecovered(registry: CollectorRegistry) -> None:
    forward = oom_safe(guarded(limit=0))
    with pytest.raises(OutOfMemoryError):
        forward(rows(2))
    assert count(registry, "unrecovered_total", "forward", "cuda:0") == 1


def test_a_call_that_fits_records_nothing(registry: CollectorRegistry) -> None:
    oom_safe(guarded(limit=100))(rows(8))
    assert "torchmemguard_oom_total{" not in generate_latest(registry).decode()


def test_events_before_installation_are_not_counted() -> None:
    oom_safe(guarded(limit=3))(rows(8))
    registry = CollectorRegistry()
    torchmemguard.install_metrics(registry)
    assert count(registry, "oom_total", "forward", "cuda:0") is None


def test_installing_twice_changes_nothing(registry: CollectorRegistry) -> None:
    torchmemguard.install_metrics(registry)
    oom_safe(guarded(limit=3))(rows(4))
    lines = generate_latest(registry).decode().splitlines()
    assert [line for line in lines if line.startswith("torchmemguard_oom_total")] == [
        'torchmemguard_oom_total{device="cuda:0",function="forward"} 1.0'
    ]
    assert sum(line.startswith("torchmemguard_memory_used_ratio{") for line in lines) == 1


def test_every_installed_registry_counts(registry: CollectorRegistry) -> None:
    other = CollectorRegistry()
    torchmemguard.install_metrics(other)
    oom_safe(guarded(limit=3))(rows(4))
    assert count(registry, "oom_total", "forward", "cuda:0") == 1
    assert count(other, "oom_total", "forward", "cuda:0") == 1


def test_no_registry_means_prometheus_clients_own(monkeypatch: pytest.MonkeyPatch) -> None:
    default = CollectorRegistry()
    monkeypatch.setattr(prometheus_client, "REGISTRY", default)
    torchmemguard.install_metrics()
    assert default.get_sample_value("torchmemguard_memory_total_bytes", {"device": "cpu"})


def test_a_registry_of_another_kind_is_refused() -> None:
    with pytest.raises(TypeError, match="registry must be a prometheus_client CollectorRegistry"):
        torchmemguard.install_metrics("default")  # type: ignore[arg-type]


def test_function_labels_past_the_bound_are_other(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "MAX_FUNCTIONS", 2)
    for name in ("a", "b", "c", "d"):
        oom_safe(guarded(limit=3, name=name))(rows(4))
    assert count(registry, "oom_total", "b", "cuda:0") == 1
    assert count(registry, "oom_total", "other", "cuda:0") == 2


def test_device_labels_past_the_bound_are_other(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "MAX_DEVICES", 1)
    metrics.count("f", torch.device("cuda:0"), "ooms")
    metrics.count("f", torch.device("cuda:5"), "ooms")
    metrics.count("f", None, "ooms")
    assert count(registry, "oom_total", "f", "cuda:0") == 1
    assert count(registry, "oom_total", "f", "other") == 2


def test_the_metrics_server_serves_the_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prometheus_client, "REGISTRY", CollectorRegistry())
    server, thread = torchmemguard.start_metrics_server(0)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert 'torchmemguard_memory_used_ratio{device="cpu"}' in body


@pytest.mark.parametrize(
    ("port", "addr", "error", "message"),
    [
        (-1, "127.0.0.1", ValueError, r"port=-1 must be in 0\.\.65535"),
        (70000, "127.0.0.1", ValueError, r"port=70000 must be in 0\.\.65535"),
        ("9100", "127.0.0.1", TypeError, "port must be an int, got '9100'"),
        (True, "127.0.0.1", TypeError, "port must be an int, got True"),
        (0, "", TypeError, "addr must be a host address string, got ''"),
    ],
)
def test_bad_server_arguments_are_named(
    port: object, addr: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        torchmemguard.start_metrics_server(port, addr)  # type: ignore[arg-type]


def run_python(code: str, **env: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={**__import__("os").environ, **env},
    ).stdout


def test_importing_registers_nothing_and_installing_initialises_no_cuda() -> None:
    out = run_python(
        "import sys, torch, torchmemguard\n"
        "print('prometheus_client' in sys.modules)\n"
        "from prometheus_client import CollectorRegistry, generate_latest\n"
        "registry = CollectorRegistry()\n"
        "torchmemguard.install_metrics(registry)\n"
        "generate_latest(registry)\n"
        "print(torch.cuda.is_initialized())\n"
    )
    assert out.split() == ["False", "False"]


def test_guard_counters_work_in_multiprocess_mode(tmp_path: object) -> None:
    out = run_python(
        "import torch, torchmemguard\n"
        "from prometheus_client import CollectorRegistry, multiprocess\n"
        "registry = CollectorRegistry()\n"
        "torchmemguard.install_metrics(registry)\n"
        "@torchmemguard.oom_safe\n"
        "def forward(x):\n"
        "    if x.shape[0] > 2:\n"
        "        raise torch.OutOfMemoryError('CUDA out of memory. (GPU 0;')\n"
        "    return x\n"
        "forward(torch.zeros(4, 1))\n"
        "scrape = CollectorRegistry()\n"
        "multiprocess.MultiProcessCollector(scrape)\n"
        "labels = {'function': 'forward', 'device': 'cuda:0'}\n"
        "print(scrape.get_sample_value('torchmemguard_oom_total', labels))\n"
        "print(scrape.get_sample_value('torchmemguard_chunk_size', labels))\n",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path),
    )
    assert out.split() == ["1.0", "2.0"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU's peak is read in /proc")
def test_the_peak_of_a_split_call_is_what_its_measured_chunks_took(
    registry: CollectorRegistry,
) -> None:
    mib = 2**20

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("DefaultCPUAllocator: can't allocate memory")
        # 48 MiB a row, written, so resident: past glibc's largest mmap threshold (32
        # MiB), so that each block is mapped on its own and given back when freed.
        block = torch.ones(x.shape[0] * 48 * mib // 4)
        del block
        return x + 1

    oom_safe(forward)(rows(8))  # 8 and 4 run out; every chunk of the output is 1 row
    peak = count(registry, "peak_bytes", forward.__qualname__, "cpu")
    assert peak is not None
    assert 46 * mib <= peak < 56 * mib  # a chunk's 48 MiB, as tests/test_meter.py measures
