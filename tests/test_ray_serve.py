"""The Ray Serve example: two replicas on a local Ray, each under a CPU budget, split
the dynamic batches that do not fit, answer like the unguarded model, and are
scraped by a real Prometheus through the targets they write.

Everything runs in a child process (``tests/realcap.py``), bounded in time: Ray
on 127.0.0.1 with 2 CPUs and no dashboard, the application, the burst of
requests, Prometheus. Skipped where ``ray`` or ``prometheus`` is missing, except
under ``CI=true``, where that fails.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.realcap import REPO_ROOT, prepare_child, run_child
from tests.servers import free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU budgets need Linux"),
]

_HERE = "tests.test_ray_serve"
REPLICAS = 2
REQUESTS, LENGTH = 96, 512  # dynamic batches of up to 32
# What a replica may take above its address space while a dynamic batch runs: a
# batch of 32 sequences of 512 tokens takes over 100 MiB, one sequence about 4.
# (A replica's glibc heap may hold some free memory the cap does not see; a
# batch that large needs more than any of it.)
HEADROOM = 8 * 2**20
COUNTERS = ("oom", "split_calls", "unrecovered")  # torchmemguard_<name>_total
TIMEOUT_S = 300


def _missing(module: str, binary: str | None = None) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install 'torchmemguard[ray]')"
    if binary is not None and shutil.which(binary) is None:
        return f"{binary} is not installed (Debian and Ubuntu: apt-get install prometheus)"
    return None


def _query(url: str, promql: str) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=10) as answer:
        result: list[dict[str, Any]] = json.load(answer)["data"]["result"]
    return result


def _scrape(prometheus: str, targets: Path, workdir: Path) -> dict[str, Any]:
    """Start Prometheus on the replicas' file_sd targets; what it scraped of each replica."""
    port = free_port()
    config = {  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            {
                "job_name": "ray-serve",
                "file_sd_configs": [{"files": [str(targets / "*.json")], "refresh_interval": "1s"}],
            }
        ],
    }
    (workdir / "prometheus.yml").write_text(json.dumps(config))
    command = [
        prometheus,
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    url = f"http://127.0.0.1:{port}"
    with open(workdir / "prometheus.log", "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        deadline = time.monotonic() + 60
        found: dict[str, dict[str, float]] = {}
        up: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            time.sleep(1)
            try:
                up = _query(url, 'up{job="ray-serve"} == 1')
                found = {
                    counter: {
                        sample["metric"]["replica"]: float(sample["value"][1])
                        for sample in _query(
                            url, f"sum by (replica) (torchmemguard_{counter}_total)"
                        )
                    }
                    for counter in ("oom", "split_calls", "unrecovered")
                }
            except OSError:
                continue
            if len(up) == REPLICAS and all(len(f) == REPLICAS for f in found.values()):
                break
        return {"up": len(up), **found}
    finally:
        server.terminate()
        server.wait(10)


def _scenario(prometheus: str, workdir: str) -> dict[str, Any]:
    prepare_child()
    import ray
    import torch
    from ray import serve

    from examples.ray_serve.deployment import VOCAB, application, build_model, burst

    work = Path(workdir)
    targets = work / "targets"
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=80 * 2**20,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
    )
    try:
        serve.start(proxy_location="Disabled")
        app = application(
            REPLICAS,
            cpu_headroom=HEADROOM,
            max_batch_size=32,
            batch_wait_s=0.5,
            targets_dir=str(targets),
        )
        handle = serve.run(app, name="torchmemguard", route_prefix=None)
        generator = torch.Generator().manual_seed(0)
        requests = torch.randint(VOCAB, (REQUESTS, LENGTH), generator=generator)
        answers = torch.tensor(asyncio.run(burst(handle, requests.tolist(), timeout_s=120)))
        # Each call reaches one replica, as the router picks: ask often enough to hear both.
        sizes = {tuple(handle.batch_sizes.remote().result(timeout_s=30)) for _ in range(16)}
        with torch.inference_mode():
            model = build_model()
            reference = torch.cat([model(part) for part in requests.split(4)])
        scraped = _scrape(prometheus, targets, work)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "equal": bool(torch.allclose(answers, reference, rtol=1e-5, atol=1e-5)),
        "max_diff": float((answers - reference).abs().max()),
        "scraped": scraped,
        "batch_sizes": sorted(sizes),
    }


def test_replicas_split_dynamic_batches_that_do_not_fit_and_answer_like_the_model() -> None:
    reason = _missing("ray", "prometheus")
    if reason is not None:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{reason}; under CI this test must run, not be skipped")
        pytest.skip(reason)
    with tempfile.TemporaryDirectory() as workdir:
        run = run_child(
            f"{_HERE}:_scenario", shutil.which("prometheus"), workdir, timeout=TIMEOUT_S
        )
    assert run["equal"], run
    scraped = run["scraped"]
    # Prometheus found both replicas through the targets they wrote, and each one
    # split a dynamic batch that did not fit under its cap, and recovered.
    assert scraped["up"] == REPLICAS, run
    assert len(scraped["split_calls"]) == REPLICAS, run
    assert all(splits >= 1 for splits in scraped["split_calls"].values()), run
    assert all(ooms >= 1 for ooms in scraped["oom"].values()), run
    assert all(failed == 0 for failed in scraped["unrecovered"].values()), run
    # Then each set Serve's batch size to what its guard learned fits, below 32.
    assert run["batch_sizes"], run
    assert all(1 <= size < largest == 32 for size, largest in run["batch_sizes"]), run
