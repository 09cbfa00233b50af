"""Small models and out-of-memory injectors for the training-step tests (also used by the
distributed tests' spawned ranks, so everything here is importable and picklable)."""

from __future__ import annotations

import time
from typing import Any

import torch


class Scarce:
    """Where an injected out-of-memory error fires: micro-batches above ``rows`` samples,
    in the ``phase`` ("forward" or "backward"); ``rows=None`` never fires."""

    def __init__(
        self, rows: int | None = None, phase: str = "forward", message: str = "CUDA out of memory."
    ) -> None:
        self.rows = rows
        self.phase = phase
        self.message = message
        self.sizes: list[int] = []  # the micro-batch sizes that reached the forward

    def check(self, n: int, phase: str) -> None:
        if phase == "forward":
            self.sizes.append(n)
        if self.rows is not None and phase == self.phase and n > self.rows:
            raise torch.OutOfMemoryError(f"{self.message} (injected in {phase}, {n} rows)")


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


VOCAB = 11


class TokenNet(torch.nn.Module):
    """An embedding and a linear head over a vocabulary of ``VOCAB``: a language model's
    shape, with injected OOMs between its layers."""

    def __init__(self, scarce: Scarce | None = None, width: int = 8) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, width)
        self.head = torch.nn.Linear(width, VOCAB)
        self.scarce = scarce or Scarce()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.scarce.check(ids.shape[0], "forward")
        return self.head(torch.tanh(_Backward.apply(self.embed(ids), self.scarce)))


def token_net(seed: int = 0, scarce: Scarce | None = None) -> TokenNet:
    torch.manual_seed(seed)
    return TokenNet(scarce).double()


def token_batch(n: int = 16, length: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels of ``n`` padded sequences of very different lengths: labels
    past a sequence's end are -100, and one sequence has no valid label at all."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=generator)
    lengths = torch.randint(1, length + 1, (n,), generator=generator)
    lengths[n // 3] = 0
    labels = ids.roll(-1, dims=1)
    labels[torch.arange(length).expand(n, length) >= lengths.unsqueeze(1)] = -100
    return ids, labels


def token_loss(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean over the valid tokens, as language models compute it."""
    logits = model(ids)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100
    )


def token_items(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (labels != -100).sum(-1)


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
        tokens = scenario.get("tokens", False)
        model: torch.nn.Module = token_net(scarce=scarce) if tokens else net(scarce=scarce)
        if not tokens:
            model.norm.eval()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        n = scenario["per_rank"] * world
        x, y = token_batch(n) if tokens else batch(n)
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
            return token_loss(ddp, x, y) if tokens else F.cross_entropy(ddp(x), y)

        items = token_items if tokens else None
        step = torchmemguard.accumulate_gradients(ddp, loss_fn, items=items)
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
    if "error" not in found:
        dist.barrier()  # every rank is past its last collective
    # gloo's teardown may abort the process ("terminate called without an active
    # exception") while a peer's connection closes: after a failed collective on a peer
    # that never answered, and now and then (2 runs in 12) after a step that succeeded
    # everywhere. What the rank saw is saved: it leaves without the teardown, as a worker
    # of torchrun does after an error.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
