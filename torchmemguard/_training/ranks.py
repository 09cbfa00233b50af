"""Keep the ranks of a torch.distributed job in step around a training step.

Every rank runs its micro-batches with no collective inside them; then the
ranks agree, in one small all-reduce, whether any of them failed and on the
micro-batch size to use next. Only when every rank succeeded are the
gradients averaged, once, as DistributedDataParallel would have averaged them.
A rank that raises an exception still takes part in the agreement, so the
others learn of it and raise too instead of waiting; a rank that dies or hangs
leaves the others to the process group's timeout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

# What a rank reports after its micro-batches, the worst of all ranks winning.
SUCCEEDED, RAN_OUT, FAILED = 0, 1, 2


class Alone:
    """A single process: nothing to agree on."""

    def size(self, proposed: int) -> int:
        """The micro-batch size every rank uses: here, the one proposed."""
        return proposed

    def outcome(self, status: int, proposed: int) -> tuple[int, int]:
        """The worst status of all ranks, and the smallest next size proposed."""
        return status, proposed

    def synchronize(self, start: dict[torch.nn.Parameter, torch.Tensor]) -> None:
        """Make the gradients and buffers those of the whole job (nothing to do here)."""

    @contextlib.contextmanager
    def local(self) -> Iterator[None]:
        """Run the micro-batches with no collective inside them."""
        yield


class Ranks(Alone):
    """The ranks of ``group``, training ``module`` (DistributedDataParallel or not)."""

    def __init__(self, group: Any, module: torch.nn.Module) -> None:
        self.group = group
        self.module = module
        self.ddp = module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else None
        self.world = dist.get_world_size(group)
        # NCCL reduces device tensors; gloo and the rest reduce host tensors.
        nccl = dist.get_backend(group) == "nccl"
        self.device = next(module.parameters()).device if nccl else torch.device("cpu")

    def size(self, proposed: int) -> int:
        found = torch.tensor([proposed], dtype=torch.int64, device=self.device)
        dist.all_reduce(found, op=dist.ReduceOp.MIN, group=self.group)
        return int(found.item())

    def outcome(self, status: int, proposed: int) -> tuple[int, int]:
        # One all-reduce: the largest status, and the largest negated size (the smallest size).
        found = torch.tensor([status, -proposed], dtype=torch.int64, device=self.device)
        dist.all_reduce(found, op=dist.ReduceOp.MAX, group=self.group)
        return int(found[0].item()), -int(found[1].item())

    def synchronize(self, start: dict[torch.nn.Parameter, torch.Tensor]) -> None:
        """Average what each rank accumulated in this step over the ranks; keep the gradients
        the step started with (``start``, by parameter). Then give every rank the first
        rank's buffers, where DistributedDataParallel broadcasts them."""
        module, device = self.module, self.device
        params = [p for p in module.parameters() if p.requires_grad]
        # A parameter that no rank used keeps no gradient; one that some rank used gets one
        # everywhere, as DistributedDataParallel gives it.
        used = torch.tensor([p.grad is not None for p in params], dtype=torch.int64, device=device)
        dist.all_reduce(used, op=dist.ReduceOp.MAX, group=self.group)
        shared = [p for p, flag in zip(params, used.tolist(), strict=True) if flag]
        grads: dict[torch.nn.Parameter, torch.Tensor] = {}
        for p in shared:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads[p] = p.grad
        by_kind: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
        for p, grad in grads.items():
            by_kind.setdefault((grad.dtype, grad.device), []).append(p)
        for group in by_kind.values():
            # What this rank added in the step, in one flat buffer per dtype and device.
            added = [grads[p] - start[p] if p in start else grads[p] for p in group]
            flat = torch.cat([a.reshape(-1) for a in added]).to(device)
            dist.all_reduce(flat, group=self.group)
            flat.div_(self.world)
            offset = 0
            for p in group:
                grad = grads[p]
                mean = flat[offset : offset + grad.numel()].view_as(grad).to(grad.device)
                offset += grad.numel()
                grad.copy_(start[p] + mean if p in start else mean)
        if self.ddp is not None and self.ddp.forward_sync_buffers:
            source = dist.get_global_rank(self.group, 0)
            for buffer in module.buffers():
                dist.broadcast(buffer, src=source, group=self.group)

    @contextlib.contextmanager
    def local(self) -> Iterator[None]:
        """Under DistributedDataParallel: no gradient reduction in backward
        (``no_sync``) and no buffer broadcast in forward, for the whole attempt."""
        if self.ddp is None:
            yield
            return
        forward_sync = self.ddp.require_forward_param_sync
        self.ddp.require_forward_param_sync = False
        try:
            with self.ddp.no_sync():
                yield
        finally:
            self.ddp.require_forward_param_sync = forward_sync


def ranks_for(module: torch.nn.Module, group: Any) -> Alone:
    """The ranks a step of ``module`` keeps in step: those of its DistributedDataParallel
    wrapper, or of ``group``; :class:`Alone` for a single process."""
    ddp = module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else None
    if ddp is not None and group is None:
        group = ddp.process_group
    if group is None or not dist.is_available() or not dist.is_initialized():
        return Alone()
    return Ranks(group, module)
