"""Checked by mypy --strict in `make test`: the decorators keep the signatures.

Each ``type: ignore`` below must be needed; with ``warn_unused_ignores`` (part
of strict mode) mypy fails if a decorator loses the wrapped signature.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

import torchmemguard


@torchmemguard.oom_safe
def bare(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return x * scale


@torchmemguard.oom_safe(batch_args=("x",), min_chunk=2)
def configured(x: torch.Tensor) -> list[float]:
    return [float(v) for v in x]


@torchmemguard.oom_safe(batch_dim=1, check_rows=False)
def time_major(x: torch.Tensor) -> torch.Tensor:
    return x


@torchmemguard.oom_safe
async def asynchronous(x: torch.Tensor) -> torch.Tensor:
    return x


@torchmemguard.memory_budget(0.5)
def budgeted(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return x * scale


@torchmemguard.memory_budget(bytes="1GiB")
async def budgeted_async(x: torch.Tensor) -> torch.Tensor:
    return x


def use() -> None:
    out: torch.Tensor = bare(torch.ones(2), scale=2.0)
    values: list[float] = configured(torch.ones(2))
    bare("not a tensor")  # type: ignore[arg-type]
    bare(torch.ones(2), factor=2.0)  # type: ignore[call-arg]
    wrong: str = configured(torch.ones(2))  # type: ignore[assignment]
    module: torch.nn.Linear = torchmemguard.guard(torch.nn.Linear(2, 2))
    del out, values, wrong, module
    within: torch.Tensor = budgeted(torch.ones(2), scale=2.0)
    budgeted("not a tensor")  # type: ignore[arg-type]
    with torchmemguard.memory_budget(0.5) as budget:
        cap: int = budget.bytes
    found: torchmemguard.Budget | None = torchmemguard.current_budget("cpu")
    del within, cap, found


_model = torch.nn.Linear(2, 2)


@torchmemguard.accumulate_gradients(_model)
def training_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(_model(x), y)


def train() -> None:
    loss: torch.Tensor = training_step(torch.ones(2, 2), torch.ones(2, 2))
    training_step(torch.ones(2, 2))  # type: ignore[call-arg]
    step = torchmemguard.accumulate_gradients(_model, lambda x: _model(x).sum(), reduction="sum")
    total: torch.Tensor = step(torch.ones(2, 2))
    tokens = torchmemguard.accumulate_gradients(
        _model,
        lambda ids, labels: torch.nn.functional.cross_entropy(_model(ids), labels),
        items=lambda ids, labels: (labels != -100).sum(-1),
    )
    token_loss: torch.Tensor = tokens(torch.ones(2, 2), torch.zeros(2, dtype=torch.long))
    del loss, total, token_loss


def read_state(state: torchmemguard.GuardState) -> None:
    ooms: int = state.stats.ooms
    sizes: dict[Hashable, int] = state.learned()
    backward: bool = state.runs_backward
    refusal: str | None = state.refusal
    state.clear()
    state.stats = state.stats  # type: ignore[misc]
    del ooms, sizes, backward, refusal


def refused(error: torchmemguard.SplitRefusedError) -> torch.OutOfMemoryError:
    return error


async def use_async() -> None:
    out: torch.Tensor = await asynchronous(torch.ones(2))
    within: torch.Tensor = await budgeted_async(torch.ones(2))
    del out, within
