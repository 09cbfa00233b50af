"""Ranks of a gloo job kept in step by accumulate_gradients: no hang, the same micro-batch
size everywhere, and every rank's gradients equal to the single-process whole batch's.

Each test starts its ranks with torch.multiprocessing (spawn) on the loopback, and
waits for them a bounded time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.training_models import (
    Scarce,
    batch,
    free_port,
    net,
    rank_main,
    token_batch,
    token_loss,
    token_net,
)

DEADLINE_S = 180
PER_RANK = 24


def launch(
    world: int, scenario: dict[str, Any], out: Path, hangs: int | None = None
) -> tuple[list[Any], list[int | None]]:
    """Run ``world`` ranks to the end, but for rank ``hangs``, killed once the others are
    done; any rank still running at the deadline is killed too. What each saved, and
    their exit codes (None for a rank that had to be killed)."""
    context = torch.multiprocessing.get_context("spawn")
    port = free_port()
    scenario = {"per_rank": PER_RANK, "rows": None, "phase": "forward", **scenario}
    ranks = [
        context.Process(target=rank_main, args=(rank, world, port, scenario, str(out)))
        for rank in range(world)
    ]
    for process in ranks:
        process.start()
    deadline = time.monotonic() + DEADLINE_S
    for rank, process in enumerate(ranks):
        if rank != hangs:
            process.join(max(0.0, deadline - time.monotonic()))
    codes = [process.exitcode for process in ranks]
    for process in ranks:
        if process.is_alive():
            process.kill()
            process.join(10)
    saved = [
        torch.load(out / f"rank{rank}.pt") if (out / f"rank{rank}.pt").exists() else None
        for rank in range(world)
    ]
    return saved, codes


def whole_batch_grads(world: int) -> list[torch.Tensor]:
    model = net()
    model.norm.eval()
    x, y = batch(PER_RANK * world)
    F.cross_entropy(model(x), y).backward()
    return [p.grad for p in model.parameters()]  # type: ignore[misc]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_an_oom_on_one_rank_leaves_every_rank_with_the_whole_batch_gradients(
    world: int, phase: str, tmp_path: Path
) -> None:
    saved, codes = launch(world, {"oom_on": world - 1, "rows": 7, "phase": phase}, tmp_path)
    assert codes == [0] * world, codes
    expected = whole_batch_grads(world)
    for rank, found in enumerate(saved):
        assert "error" not in found, (rank, found["error"])
        for grad, want in zip(found["grads"], expected, strict=True):
            torch.testing.assert_close(grad, want, rtol=0, atol=1e-12)
    # The same size on every rank in every attempt: 24 runs out on the last rank, and so
    # does the check before micro-batches of 12 (8, then 4 and 4: the loss of 8 samples
    # against its halves'); the last rank stops there, while the others finish each
    # attempt; then 6 everywhere, checked once more on the last rank only.
    sizes = [found["sizes"] for found in saved]
    if phase == "forward":
        assert sizes[-1] == [24, 8, 6, 3, 3, 6, 6, 6, 6]
    else:  # the check runs no backward: it fits, and micro-batches of 12 run out
        assert sizes[-1] == [24, 8, 4, 4, 12, 6, 6, 6, 6]
    assert all(found == [24, 8, 4, 4, 12, 12, 6, 6, 6, 6] for found in sizes[:-1])
    assert [found["ooms"] for found in saved] == [0] * (world - 1) + [2]


def test_a_token_level_loss_with_items_on_two_ranks_equals_ddp_on_the_whole_batch(
    tmp_path: Path,
) -> None:
    world = 2
    scenario = {"oom_on": 1, "rows": 5, "tokens": True, "per_rank": 16}
    saved, codes = launch(world, scenario, tmp_path)
    assert codes == [0] * world, codes
    # Plain DDP without micro-batches: each rank's token-level mean over its own share,
    # the gradients averaged over the ranks.
    ids, labels = token_batch(16 * world)
    expected = None
    for rank in range(world):
        model = token_net()
        share = slice(rank * 16, (rank + 1) * 16)
        token_loss(model, ids[share], labels[share]).backward()
        grads = [p.grad / world for p in model.parameters()]
        expected = (
            grads if expected is None else [a + b for a, b in zip(expected, grads, strict=True)]
        )
    assert expected is not None
    for rank, found in enumerate(saved):
        assert "error" not in found, (rank, found["error"])
        for grad, want in zip(found["grads"], expected, strict=True):
            torch.testing.assert_close(grad, want, rtol=0, atol=1e-12)
    assert saved[1]["ooms"] >= 1


def test_a_rank_that_raises_another_error_makes_every_rank_raise_at_once(
    tmp_path: Path,
) -> None:
    saved, codes = launch(2, {"oom_on": 0, "rows": 12, "fail_on": 1}, tmp_path)
    assert codes == [0, 0]
    assert saved[1]["error"] == "KeyError: 'not an OOM'"
    assert saved[0]["error"].startswith("TorchMemGuardError: ")
    assert "another rank failed" in saved[0]["error"]
    assert all(grad is None for grad in saved[0]["grads"])  # back as they were: none
    assert saved[0]["seconds"] < 30


def test_a_rank_that_dies_makes_the_others_raise_instead_of_waiting(tmp_path: Path) -> None:
    scenario = {"oom_on": 0, "rows": 12, "fail_on": 1, "how": "exit", "timeout": 10}
    saved, codes = launch(2, scenario, tmp_path)
    assert codes == [0, 3]
    assert saved[1] is None
    assert saved[0]["error"].startswith("RuntimeError: ")  # gloo saw the peer go
    assert saved[0]["seconds"] < 10 + 30


def test_a_rank_that_hangs_leaves_the_others_to_the_process_group_timeout(
    tmp_path: Path,
) -> None:
    scenario = {"oom_on": 0, "rows": 12, "fail_on": 1, "how": "hang", "timeout": 5}
    saved, codes = launch(2, scenario, tmp_path, hangs=1)
    assert codes == [0, None]  # the hung rank had to be killed
    assert saved[0]["error"].startswith("RuntimeError: ")
    assert 5 <= saved[0]["seconds"] < 5 + 30


def test_ranks_stay_alone_in_a_single_process() -> None:
    from torchmemguard._training.ranks import Alone, ranks_for

    assert type(ranks_for(net(), None)) is Alone
    assert Scarce().rows is None
