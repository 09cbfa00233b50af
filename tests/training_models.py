"""Small models and out-of-memory injectors for the training-step tests (also used by the
distributed tests' spawned ranks, so everything here is importable and picklable)."""

from __future__ import annotations

import time
from typing import Any

import torch


class Scarce:
    """Where an injected out-of-memory error fires: micro-batches above ``rows`` samples,
    in the ``phase`` ("forward" or "backward"); ``rows=None`` never fires."""

    def __init__(self, rows: int | None = None, phase: str = "forward") -> None:
        self.rows = rows
        self.phase = phase
        self.sizes: list[int] = []  # the micro-batch sizes that reached the forward

    def check(self, n: int, phase: str) -> None:
        if phase == "forward":
            self.sizes.append(n)
        if self.rows is not None and phase == self.phase and n > self.rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory. (injected in {phase}, {n} rows)")


class _Backward(torch.autograd.Function):
    """The identity, whose backward checks the micro-batch's size."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scarce: Scarce) -> torch.Tensor:
        ctx.rows = x.shape[0]
        ctx.scarce = scarce
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.scarce.check(ctx.rows, "backward")
        return grad, None


class Net(torch.nn.Module):
    """Linear, BatchNorm, ReLU, Linear, with injected OOMs between its layers."""

    def __init__(self, scarce: Scarce | None = None, width: int = 16) -> None:
        super().__init__()
        self.first = torch.nn.Linear(6, width)
        self.norm = torch.nn.BatchNorm1d(width)
        self.last = torch.nn.Linear(width, 3)
        self.scarce = scarce or Scarce()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.scarce.check(x.shape[0], "forward")
        h = _Backward.apply(self.first(x), self.scarce)
        return self.last(torch.relu(self.norm(h)))


def wide_step() -> tuple[torch.nn.Sequential, torch.Tensor, torch.Tensor]:
    """A model and a batch of 4096 for a training step under a real cap: two 1024-wide
    activations of 16 MiB each, with narrow layers between to keep it quick. The whole
    batch needs about 50 MiB more than a child holds for the forward, 20 more for the
    backward."""
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    )
    return model, torch.randn(4096, 64), torch.randint(0, 10, (4096,))


def batch(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and class targets of ``n`` samples, in float64 so that sums of micro-batch
    gradients differ from the whole batch's only in the last bits."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=generator)


def net(seed: int = 0, scarce: Scarce | None = None) -> Net:
    torch.manual_seed(seed)
    return Net(scarce).double()


def free_port() -> int:
    """A TCP port free on the loopback now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rank_main(rank: int, world: int, port: int, scenario: dict[str, Any], out: str) -> None:
    """One rank of a gloo job on the loopback: a DDP training step on its share of a
    global batch, with what ``scenario`` injects; what it saw goes to ``out``/rank<N>.pt."""
    import datetime
    import os
    import sys

    import torch.distributed as dist
    import torch.nn.functional as F

    import torchmemguard

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=scenario.get("timeout", 60)),
    )
    found: dict[str, Any] = {}
    try:
        inject = scenario.get("oom_on") == rank
        scarce = Scarce(scenario["rows"], scenario["phase"]) if inject else Scarce()
        model = net(scarce=scarce)
        model.norm.eval()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        x, y = batch(scenario["per_rank"] * world)
        share = slice(rank * scenario["per_rank"], (rank + 1) * scenario["per_rank"])
        calls = [0]

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            if scenario.get("fail_on") == rank and calls[0] == 2:
                if scenario.get("how") == "exit":
                    os._exit(3)
                if scenario.get("how") == "hang":
                    time.sleep(600)
                raise KeyError("not an OOM")
            return F.cross_entropy(ddp(x), y)

        step = torchmemguard.accumulate_gradients(ddp, loss_fn)
        started = time.monotonic()
        try:
            found["loss"] = step(x[share], y[share])
        except Exception as exc:
            found["error"] = f"{type(exc).__name__}: {exc}"
        found["seconds"] = time.monotonic() - started
        found["sizes"] = model.scarce.sizes
        found["grads"] = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        found["ooms"] = step.oom_guard.stats.ooms  # type: ignore[attr-defined]
    finally:
        torch.save(found, f"{out}/rank{rank}.pt")
    if "error" in found:
        # A group whose collective failed cannot be torn down safely: gloo's destructor,
        # run at interpreter exit, may abort on a peer that never answered. The rank
        # leaves without it, as a worker of torchrun does after an error.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    dist.destroy_process_group()
