"""Batching single requests under a real memory cap: torchmemguard's Batcher, fixed sizes, none.

A server process answers requests of one sequence each (token ids of varied
lengths) with a transformer encoder (2 layers, width 128, 4 heads, feed-forward
512, mean-pooled to 4 classes), one torch thread, its address space capped
(``RLIMIT_AS``) at what it holds after its warm-up plus ``--headroom`` MiB,
with glibc's defaults. ``--clients`` clients on loopback each send their
requests one after another (a line of JSON each way) until ``--requests`` in
all were answered. The servers:

- ``none``: every request runs on its own;
- ``fixed N``: a fixed-size dynamic batcher, as Ray Serve's ``@serve.batch``
  and the others set by hand: requests of one length wait together until ``N``
  of them are there, or ``--max-wait`` seconds passed, then run as one batch
  (unguarded: a batch that runs out of memory fails every request in it);
- ``torchmemguard``: ``torchmemguard.Batcher`` over ``guard(model)``, with the
  same ``max_wait`` and ``max_batch`` the largest fixed size of the sweep: each
  length's batch is filled to what the guard knows fits, up to it.

Each server runs in a fresh process per run, the order rotating from run to
run. Throughput counts the requests answered (failed ones too) over the time
from the first request sent to the last answer; latencies are measured by the
clients. The figures are medians over runs.

    python -m benchmarks.batching [--runs 3] [--requests 1200] [--clients 128]
        [--headroom 16] [--max-wait 0.005] [--sizes 4 16 32 64]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import json
import random
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from benchmarks.results import address_space, child_environment, environment, save

MIB = 2**20
VOCAB, MAX_LENGTH, WIDTH, CLASSES = 1000, 512, 128, 4
LENGTHS = (16, 32, 64, 128, 256)  # each request's, drawn uniformly
TARGET_OF_BEST = 0.95


class Encoder(torch.nn.Module):
    """Token ids (batch, length) in, class logits (batch, CLASSES) out."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(VOCAB, WIDTH)
        self.positions = torch.nn.Embedding(MAX_LENGTH, WIDTH)
        layer = torch.nn.TransformerEncoderLayer(
            WIDTH, nhead=4, dim_feedforward=512, dropout=0.0, batch_first=True
        )
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(WIDTH, CLASSES)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(token_ids.shape[1])
        hidden = self.encoder(self.tokens(token_ids) + self.positions(positions))
        logits: torch.Tensor = self.head(hidden.mean(dim=1))
        return logits


# The server: one contender under the cap.


class FixedBatcher:
    """A fixed-size dynamic batcher: up to ``size`` requests of one length, or what came
    within ``max_wait``; a batch that fails fails every request in it."""

    def __init__(self, model: torch.nn.Module, size: int, max_wait: float) -> None:
        self.model, self.size, self.max_wait = model, size, max_wait
        self.worker = concurrent.futures.ThreadPoolExecutor(1)
        self.worker.submit(lambda: None).result()  # its thread starts before the cap
        self.waiting: dict[int, list[tuple[torch.Tensor, asyncio.Future[Any]]]] = {}
        self.timers: dict[int, asyncio.TimerHandle] = {}
        self.lock = asyncio.Lock()  # one batch at a time, as on one device
        self.running: set[asyncio.Task[None]] = set()
        self.ooms = 0

    async def __call__(self, request: torch.Tensor) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        length = request.shape[1]
        group = self.waiting.setdefault(length, [])
        group.append((request, future))
        if len(group) >= self.size:
            self._flush(length)
        elif len(group) == 1:
            self.timers[length] = loop.call_later(self.max_wait, self._flush, length)
        result: torch.Tensor = await future
        return result

    def _flush(self, length: int) -> None:
        group = self.waiting.pop(length, [])
        timer = self.timers.pop(length, None)
        if timer is not None:
            timer.cancel()
        if group:
            task = asyncio.ensure_future(self._run(group))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def _run(self, group: list[tuple[torch.Tensor, asyncio.Future[Any]]]) -> None:
        batch = torch.cat([request for request, _ in group])
        loop = asyncio.get_running_loop()
        async with self.lock:
            try:
                output = await loop.run_in_executor(self.worker, self._forward, batch)
            except Exception as exc:
                self.ooms += isinstance(exc, torch.OutOfMemoryError) or "can't allocate" in str(exc)
                for _, future in group:
                    future.set_exception(exc)
                return
        for i, (_, future) in enumerate(group):
            future.set_result(output[i : i + 1])

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out: torch.Tensor = self.model(batch)
            return out


def serve(config: dict[str, Any]) -> None:
    """Start the contender's server under the cap; print its port, then, on a line
    ``stats`` from the parent, what it counted."""
    import gc
    import resource

    import torchmemguard

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Encoder().eval()
    name = config["contender"]
    answer: Any
    if name == "torchmemguard":
        batcher = torchmemguard.Batcher(
            torchmemguard.guard(model),
            max_wait=config["max_wait"],
            max_batch=config["max_batch"],
            max_queue=4096,
        )
        answer = batcher

        def ooms() -> int:
            stats: int = batcher.fn.oom_guard.stats.ooms  # type: ignore[attr-defined]
            return stats

        def learned() -> dict[int, int]:
            found = batcher.fn.oom_guard.learned()  # type: ignore[attr-defined]
            return {key.shapes[0][0]: limit for key, limit in found.items()}

    elif name.startswith("fixed"):
        fixed = FixedBatcher(model, int(name.split()[1]), config["max_wait"])
        answer = fixed

        def ooms() -> int:
            return fixed.ooms

        def learned() -> dict[int, int]:
            return {}

    else:
        worker = concurrent.futures.ThreadPoolExecutor(1)
        worker.submit(lambda: None).result()

        def forward(request: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                out: torch.Tensor = model(request)
                return out

        async def alone(request: torch.Tensor) -> torch.Tensor:
            return await asyncio.get_running_loop().run_in_executor(worker, forward, request)

        answer = alone

        def ooms() -> int:
            return 0

        def learned() -> dict[int, int]:
            return {}

    with torch.inference_mode():  # warm-up: every length, a small batch
        for length in LENGTHS:
            model(torch.zeros(4, length, dtype=torch.long))
    gc.collect()
    gc.freeze()

    async def main() -> None:
        failed = 0

        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal failed
            while line := await reader.readline():
                if line.strip() == b"stats":
                    stats = {"ooms": ooms(), "failed": failed, "learned": learned()}
                    writer.write(json.dumps(stats).encode() + b"\n")
                    await writer.drain()
                    continue
                ids = torch.tensor([json.loads(line)], dtype=torch.long)
                reply: dict[str, Any]
                try:
                    logits = await answer(ids)
                    reply = {"class": int(logits.argmax())}
                except Exception as exc:
                    failed += 1
                    reply = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(client, "127.0.0.1", 0)
        cap = address_space() + config["headroom"] * MIB
        resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
        print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# The parent: the clients, and the runs.


def requests(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.choice(LENGTHS))] for _ in range(count)]


async def drive(port: int, sent: list[list[int]], clients: int) -> dict[str, Any]:
    """Send ``sent`` from ``clients`` connections, each one request after another."""
    queue = collections.deque(sent)
    latencies: list[float] = []
    errors: list[str] = []

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while queue:
            ids = queue.popleft()
            started = time.perf_counter()
            writer.write(json.dumps(ids).encode() + b"\n")
            await writer.drain()
            reply = json.loads(await asyncio.wait_for(reader.readline(), 120))
            latencies.append(time.perf_counter() - started)
            if "error" in reply:
                errors.append(reply["error"])
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    seconds = time.perf_counter() - started
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"stats\n")
    stats = json.loads(await asyncio.wait_for(reader.readline(), 30))
    writer.close()
    return {
        "throughput": len(sent) / seconds,
        "p50_ms": 1e3 * statistics.median(latencies),
        "p99_ms": 1e3 * statistics.quantiles(latencies, n=100)[98],
        "failed": len(errors),
        "ooms": stats["ooms"],
        "learned": stats["learned"],
        "error": errors[0] if errors else None,
    }


def run_one(config: dict[str, Any], sent: list[list[int]], clients: int) -> dict[str, Any]:
    """Start one contender's server, drive it, stop it."""
    env = {**child_environment(), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "benchmarks.batching", "--serve", json.dumps(config)]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("ready "):
            raise RuntimeError(
                f"server did not start: {line}{proc.stderr.read() if proc.stderr else ''}"
            )
        return asyncio.run(asyncio.wait_for(drive(int(line.split()[1]), sent, clients), 600))
    finally:
        proc.kill()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--clients", type=int, default=128)
    parser.add_argument("--headroom", type=int, default=16, help="MiB above the warm-up")
    parser.add_argument("--max-wait", type=float, default=0.005)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 32, 64])
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(json.loads(args.serve))
        return
    started = time.perf_counter()
    contenders = ["none", *(f"fixed {size}" for size in args.sizes), "torchmemguard"]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    for run in range(args.runs):
        shift = run % len(contenders)
        sent = requests(args.requests, seed=run)
        for name in contenders[shift:] + contenders[:shift]:
            config = {
                "contender": name,
                "headroom": args.headroom,
                "max_wait": args.max_wait,
                "max_batch": max(args.sizes),
            }
            runs[name].append(run_one(config, sent, args.clients))
            print(name, runs[name][-1], flush=True)
    results = summarise(runs, args)
    results["seconds"] = round(time.perf_counter() - started)
    results["markdown"] = markdown(results)
    path = save("batching", results)
    print(results["markdown"])
    print(f"Wrote {path}.")


def summarise(runs: dict[str, list[dict[str, Any]]], args: Any) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name, found in runs.items():
        rows[name] = {
            "throughput": statistics.median(r["throughput"] for r in found),
            "p50_ms": statistics.median(r["p50_ms"] for r in found),
            "p99_ms": statistics.median(r["p99_ms"] for r in found),
            "failed": [r["failed"] for r in found],
            "ooms": [r["ooms"] for r in found],
            "error": next((r["error"] for r in found if r["error"]), None),
            "learned": [r["learned"] for r in found],
        }
    env = environment()
    return {
        "environment": env,
        "benchmark": "batching",
        "summary_line": f"{env['cpu']}, 1 torch thread, torch {env['torch']}, "
        f"commit {env['git_commit']}",
        "runs": args.runs,
        "requests": args.requests,
        "clients": args.clients,
        "headroom_mib": args.headroom,
        "max_wait_s": args.max_wait,
        "lengths": list(LENGTHS),
        "target_of_best_fixed": TARGET_OF_BEST,
        "contenders": rows,
    }


def markdown(results: dict[str, Any]) -> str:
    rows = results["contenders"]
    fixed = {name: row for name, row in rows.items() if name.startswith("fixed")}
    clean = {name: row for name, row in fixed.items() if not any(row["failed"])}
    best_name = max(clean, key=lambda name: clean[name]["throughput"]) if clean else None
    ours = rows["torchmemguard"]
    lines = [
        f"Batching under a real cap ({results['summary_line']}): {results['requests']} "
        f"requests of one sequence ({', '.join(map(str, results['lengths']))} tokens, drawn "
        f"uniformly) from {results['clients']} clients on loopback, address space capped "
        f"{results['headroom_mib']} MiB above the warm-up, max_wait "
        f"{results['max_wait_s'] * 1e3:g} ms. Medians over {results['runs']} runs.",
        "",
        "| server | requests/s | of the best fixed size | p50 ms | p99 ms | failed per run "
        "| OOMs per run |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in rows.items():
        share = (
            "—"
            if best_name is None
            else f"{row['throughput'] / clean[best_name]['throughput']:.2f}"
        )
        lines.append(
            f"| {name} | {row['throughput']:.0f} | {share} | {row['p50_ms']:.1f} | "
            f"{row['p99_ms']:.1f} | {row['failed']} | {row['ooms']} |"
        )
    lines.append("")
    if best_name is None:
        lines.append("No fixed size ran without failed requests: the target has no reference.")
        return "\n".join(lines) + "\n"
    best = clean[best_name]
    share = ours["throughput"] / best["throughput"]
    slack = results["max_wait_s"] * 1e3
    met = {
        "throughput": share >= TARGET_OF_BEST,
        "failed": not any(ours["failed"]),
        "p99": ours["p99_ms"] <= best["p99_ms"] + slack,
    }
    lines.append(
        f"The best fixed size without failed requests is {best_name.split()[1]}. Targets: "
        f"at least {TARGET_OF_BEST} of its throughput ({share:.2f}: "
        f"{'met' if met['throughput'] else 'missed'}); no failed request "
        f"({'met' if met['failed'] else 'missed'}); p99 within max_wait of its p99 "
        f"({ours['p99_ms']:.1f} against {best['p99_ms']:.1f} + {slack:g} ms: "
        f"{'met' if met['p99'] else 'missed'})."
    )
    limits = "; ".join(
        ", ".join(
            f"{length}: {limit}" for length, limit in sorted(run.items(), key=lambda i: int(i[0]))
        )
        for run in ours["learned"]
    )
    lines.append(f"The limits torchmemguard's guard learned, by length, in each run: {limits}.")
    failing = [name for name, row in fixed.items() if any(row["failed"]) or any(row["ooms"])]
    if failing:
        examples = "; ".join(
            f"{name}: {rows[name]['error']}" for name in failing if rows[name]["error"]
        )
        lines.append(
            f"Fixed sizes that ran out of memory or failed requests: {', '.join(failing)}"
            + (f" ({examples[:300]})" if examples else "")
            + "."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
