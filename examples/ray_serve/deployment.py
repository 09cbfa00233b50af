"""A guarded model served by Ray Serve: replicas that share a device by budget.

Each replica of :class:`GuardedClassifier` holds a small transformer text
classifier (random weights from a fixed seed, standing in for your checkpoint),
guarded by ``torchmemguard.guard``, and runs each of Ray Serve's dynamic
batches (``@serve.batch``) under its own ``torchmemguard.memory_budget``:

- on a GPU, ``share`` of the device (``1 / num_replicas`` by default), so that
  replicas packed on one GPU cannot starve each other;
- on the CPU, the address space the replica holds once its model is loaded and
  warm, plus ``cpu_headroom`` bytes.

A dynamic batch that does not fit under the budget is split by the guard and
merged, instead of failing every request in it. The guard remembers what fits,
and the replica sets Serve's batch size to it at run time
(``set_max_batch_size``): the next dynamic batches are gathered to what fits
for their longest sequences, and run whole, rather than gathered to
``max_batch_size`` and split.

Serve's own batching is kept, rather than replaced by ``torchmemguard.Batcher``:
on the CPU the replica's cap is entered around each dynamic batch on Serve's
event loop, so that nothing else runs in the process beside a capped batch; a
``Batcher`` runs its batches on a thread of its own while the loop goes on
receiving requests, which a process-wide cap would then hold too.

Every replica serves its own Prometheus metrics (``torchmemguard_*``, on a port
of its own) and, given ``targets_dir``, writes a file there naming its address:
Prometheus finds every replica through ``file_sd_configs`` on that directory
(see ``prometheus.yml`` beside this file). On Kubernetes, with one replica per
pod, scrape each pod's metrics port instead.

Run it locally (needs the ``ray`` extra; Linux for CPU budgets)::

    python -m examples.ray_serve.deployment --replicas 2 --cpu-headroom-mib 64 \\
        --targets-dir /tmp/torchmemguard-targets

It starts Ray on this machine, deploys the application, sends a burst of
requests through a deployment handle, and prints each replica's guard counters,
read from its metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from ray import serve

import torchmemguard

VOCAB, MAX_LENGTH, WIDTH, CLASSES = 1000, 512, 64, 4


class Classifier(torch.nn.Module):
    """Token ids (batch, length) in, class logits (batch, CLASSES) out."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(VOCAB, WIDTH)
        self.positions = torch.nn.Embedding(MAX_LENGTH, WIDTH)
        layer = torch.nn.TransformerEncoderLayer(
            WIDTH, nhead=4, dim_feedforward=256, dropout=0.0, batch_first=True
        )
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = torch.nn.Linear(WIDTH, CLASSES)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)
        hidden = self.encoder(self.tokens(token_ids) + self.positions(positions))
        logits: torch.Tensor = self.head(hidden.mean(dim=1))
        return logits


def build_model(seed: int = 0) -> Classifier:
    """The classifier, with the same weights in every replica and on every run, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Classifier().eval()


@serve.deployment
class GuardedClassifier:
    """One replica: a guarded classifier, each dynamic batch under the replica's budget.

    ``share``: the fraction of the GPU each replica may take (GPU only).
    ``cpu_headroom``: bytes above the replica's warm address space (CPU only).
    ``metrics_host``: the address its metrics server listens on.
    ``targets_dir``: where it writes its Prometheus file_sd target, if anywhere.
    """

    def __init__(
        self,
        *,
        share: float | None = None,
        cpu_headroom: int | None = None,
        max_batch_size: int = 32,
        batch_wait_s: float = 0.05,
        metrics_host: str = "127.0.0.1",
        targets_dir: str | None = None,
    ) -> None:
        torch.set_num_threads(1)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = build_model().to(self.device)
        with torch.inference_mode():  # the one-off allocations of a first call, before the cap
            self.model(torch.zeros(2, 16, dtype=torch.long, device=self.device))
        if self.device.type == "cpu" and cpu_headroom is None:
            raise ValueError("cpu_headroom: a CPU replica needs its headroom in bytes")
        self.share, self.cpu_headroom = share, cpu_headroom
        self.max_batch_size = self.batch_size = max_batch_size
        self.classify.set_max_batch_size(max_batch_size)
        self.classify.set_batch_wait_timeout_s(batch_wait_s)
        self.server, _ = torchmemguard.start_metrics_server(0, addr=metrics_host)
        self.forward = torchmemguard.guard(self.model)
        self.address = f"{metrics_host}:{self.server.server_port}"
        self.replica = _safe(serve.get_replica_context().replica_id.unique_id)
        self.target: Path | None = None
        if targets_dir is not None:
            self.target = _write_target(Path(targets_dir), self.replica, self.address)

    async def __call__(self, token_ids: list[int]) -> list[float]:
        answer: list[float] = await self.classify(token_ids)
        return answer

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.05)
    async def classify(self, requests: list[list[int]]) -> list[list[float]]:
        """One dynamic batch: each group of sequences of one length is one guarded call."""
        answers: list[list[float]] = [[] for _ in requests]
        lengths: dict[int, list[int]] = {}
        for index, token_ids in enumerate(requests):
            lengths.setdefault(len(token_ids), []).append(index)
        with torch.inference_mode(), self.budget():
            for indices in lengths.values():
                batch = torch.tensor([requests[i] for i in indices], device=self.device)
                for index, logits in zip(indices, self.forward(batch).tolist(), strict=True):
                    answers[index] = logits
        self.fill_what_fits(lengths)
        return answers

    def fill_what_fits(self, lengths: Iterable[int]) -> None:
        """Set the size of Serve's next dynamic batches to what the guard learned fits
        for the longest sequences of this batch, at most ``max_batch_size``.

        A batch that ran out of memory taught the guard its limit for that length:
        the next batches are formed to it, and run whole, instead of being
        gathered to ``max_batch_size`` and split. The size rises with the
        guard's limit for the longest length, and goes back to ``max_batch_size``
        when a batch's lengths have no limit.
        """
        longest = max(lengths)
        learned = self.forward.oom_guard.learned()
        limits = [limit for key, limit in learned.items() if key.shapes == ((longest,),)]
        size = min([self.max_batch_size, *limits])
        if size != self.batch_size:
            self.batch_size = size
            self.classify.set_max_batch_size(size)

    def batch_sizes(self) -> tuple[int, int]:
        """The size of Serve's dynamic batches now, and the largest configured."""
        return self.batch_size, self.max_batch_size

    def budget(self) -> torchmemguard.memory_budget:
        """The replica's cap for one dynamic batch.

        On the CPU, the address space now plus the headroom: Ray's own threads
        map memory while the replica runs, so a cap fixed at start would drift.
        """
        if self.device.type == "cuda":
            return torchmemguard.memory_budget(self.share, device=self.device)
        if self.cpu_headroom is None:
            raise RuntimeError("a CPU budget needs a headroom")
        return torchmemguard.memory_budget(bytes=_address_space() + self.cpu_headroom, device="cpu")

    def __del__(self) -> None:
        if self.target is not None:
            with contextlib.suppress(OSError):
                self.target.unlink()
        self.server.shutdown()


def _address_space() -> int:
    """Bytes of address space this process uses now (``VmSize``)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024  # in kB
    raise RuntimeError("a CPU budget needs VmSize in /proc/self/status: this needs Linux")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _write_target(directory: Path, replica: str, address: str) -> Path:
    """Write this replica's file_sd target, atomically: Prometheus may read at any time."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"torchmemguard-{replica}.json"
    partial = directory / f".{target.name}.partial"
    partial.write_text(json.dumps([{"targets": [address], "labels": {"replica": replica}}]))
    os.replace(partial, target)
    return target


def application(
    replicas: int = 2,
    *,
    share: float | None = None,
    cpu_headroom: int | None = None,
    max_batch_size: int = 32,
    batch_wait_s: float = 0.05,
    metrics_host: str = "127.0.0.1",
    targets_dir: str | None = None,
) -> serve.Application:
    """The Serve application: ``replicas`` replicas, each with ``share`` of the GPU
    (``1 / replicas`` by default) or ``cpu_headroom`` bytes on the CPU."""
    if share is None:
        share = 1.0 / replicas
    gpu = torch.cuda.is_available()
    options: dict[str, Any] = {"num_gpus": share if gpu else 0, "num_cpus": 0}
    if not gpu:
        # A CPU cap is the whole replica process's, Ray's own threads included.
        # User code on Serve's main event loop: while a batch runs under the cap,
        # no request is unpacked beside it. Blocks from 64 KiB up mapped as they
        # are allocated, not served from memory glibc kept: the cap sees what a
        # batch takes. (Ray's threads keep their own glibc arenas.)
        variables = {
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
            "MALLOC_MMAP_THRESHOLD_": str(2**16),
        }
        options["runtime_env"] = {"env_vars": variables}
    deployment = GuardedClassifier.options(
        num_replicas=replicas,
        max_ongoing_requests=max_batch_size,  # a burst is spread over the replicas
        ray_actor_options=options,
    )
    return deployment.bind(
        share=share,
        cpu_headroom=cpu_headroom,
        max_batch_size=max_batch_size,
        batch_wait_s=batch_wait_s,
        metrics_host=metrics_host,
        targets_dir=targets_dir,
    )


async def burst(handle: Any, requests: list[list[int]], timeout_s: float) -> list[list[float]]:
    """Send every request at once through ``handle``; their answers, in order."""
    responses = [handle.remote(token_ids) for token_ids in requests]
    answers: list[list[float]] = await asyncio.wait_for(asyncio.gather(*responses), timeout_s)
    return answers


def _counters(address: str) -> dict[str, float]:
    """The guard counters a replica's metrics show, summed over their labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    wanted = ("torchmemguard_oom", "torchmemguard_split_calls", "torchmemguard_unrecovered")
    return {
        family.name: sum(s.value for s in family.samples if s.name.endswith("_total"))
        for family in text_string_to_metric_families(text)
        if family.name in wanted
    }


def main(argv: list[str] | None = None) -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument(
        "--cpu-headroom-mib",
        type=int,
        default=64,
        help="MiB each CPU replica may take above its address space during a batch",
    )
    parser.add_argument("--targets-dir", default=None)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args(argv)
    ray.init(num_cpus=max(2, args.replicas))
    try:
        app = application(
            args.replicas, cpu_headroom=args.cpu_headroom_mib * 2**20, targets_dir=args.targets_dir
        )
        handle = serve.run(app, name="torchmemguard", route_prefix=None)
        generator = torch.Generator().manual_seed(0)
        requests = torch.randint(VOCAB, (args.requests, args.length), generator=generator)
        asyncio.run(burst(handle, requests.tolist(), timeout_s=300))
        if args.targets_dir is not None:
            for target in sorted(Path(args.targets_dir).glob("torchmemguard-*.json")):
                address = json.loads(target.read_text())[0]["targets"][0]
                print(f"replica at {address}: {_counters(address)}")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
