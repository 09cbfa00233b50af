"""A guarded call that runs backward() is never retried or split on top of its gradients."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch

import torchmemguard
from tests.conftest import oom_above
from torchmemguard import _attempt as run
from torchmemguard._gradients import BackwardWatch

X = torch.arange(12.0).reshape(4, 3) / 10
Y = torch.arange(4.0).unsqueeze(1)


def model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


def reference_grads(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    net = model()
    torch.nn.functional.mse_loss(net(x), y).backward()
    return [p.grad.clone() for p in net.parameters() if p.grad is not None]


class FailingBackward(torch.autograd.Function):
    """Identity whose backward runs out of memory."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_oom_in_forward_of_a_training_step_is_refused_naming_backward() -> None:
    net = model()

    @torchmemguard.oom_safe
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        oom_above(2, x.shape[0])
        torch.nn.functional.mse_loss(net(x), y).backward()

    with pytest.raises(torchmemguard.OutOfMemoryError, match=r"calls backward\(\)") as caught:
        step(X, Y)
    assert isinstance(caught.value, torch.OutOfMemoryError)


def test_refused_training_step_leaves_the_gradients_untouched() -> None:
    net = model()

    @torchmemguard.oom_safe
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        oom_above(2, x.shape[0])
        torch.nn.functional.mse_loss(net(x), y).backward()

    with pytest.raises(torchmemguard.OutOfMemoryError):
        step(X, Y)
    assert all(p.grad is None for p in net.parameters())


def test_oom_in_backward_is_not_retried_on_top_of_the_gradients() -> None:
    net = model()
    attempts = []

    @torchmemguard.oom_safe
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        attempts.append(x.shape[0])
        loss = torch.nn.functional.mse_loss(FailingBackward.apply(net(x)), y)
        loss.backward()

    with pytest.raises(torchmemguard.OutOfMemoryError, match=r"calls backward\(\)") as caught:
        step(X, Y)
    assert "Tried to allocate 2.00 GiB" in str(caught.value.__cause__)
    assert all(p.grad is None for p in net.parameters())
    assert step.oom_guard.stats.unrecovered == 1


def test_a_step_that_catches_the_stopped_backward_itself_is_still_refused() -> None:
    net = model()

    @torchmemguard.oom_safe
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        oom_above(2, x.shape[0])
        with contextlib.suppress(Exception):
            torch.nn.functional.mse_loss(net(x), y).backward()

    with pytest.raises(torchmemguard.OutOfMemoryError, match=r"calls backward\(\)"):
        step(X, Y)


def test_a_learned_split_that_meets_backward_runs_the_call_whole_with_exact_gradients() -> None:
    net = model()

    @torchmemguard.oom_safe
    def step(x: torch.Tensor, y: torch.Tensor, train: bool) -> torch.Tensor:
        if not train:
            oom_above(2, x.shape[0])  # inference ran out, and taught the guard a limit
            return net(x).detach()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        return torch.stack([loss.detach()] * x.shape[0])

    step(X, Y, False)
    assert step.oom_guard.learned()
    step(X, Y, True)
    expected = reference_grads(X, Y)
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), expected, strict=True))


def test_once_a_call_ran_backward_the_guard_never_splits_again() -> None:
    net = model()
    attempts = []

    @torchmemguard.oom_safe
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        attempts.append(x.shape[0])
        oom_above(2, x.shape[0])
        torch.nn.functional.mse_loss(net(x), y).backward()

    with pytest.raises(torchmemguard.OutOfMemoryError):
        step(X, Y)
    attempts.clear()
    with pytest.raises(torchmemguard.OutOfMemoryError, match=r"calls backward\(\)"):
        step(X, Y)
    assert attempts == [4]
    assert step.oom_guard.runs_backward
    assert not step.oom_guard.learned()


def test_autograd_grad_in_a_split_call_is_not_stopped() -> None:
    @torchmemguard.oom_safe
    def input_gradients(x: torch.Tensor) -> torch.Tensor:
        oom_above(2, x.shape[0])
        x = x.detach().requires_grad_()
        (grad,) = torch.autograd.grad((x**2).sum(), x)
        return grad

    assert torch.equal(input_gradients(X), 2 * X)


def test_a_split_call_without_gradients_is_not_watched(monkeypatch: pytest.MonkeyPatch) -> None:
    made = []

    class Recorded(BackwardWatch):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    monkeypatch.setattr(run, "BackwardWatch", Recorded)

    @torchmemguard.oom_safe
    def double(x: torch.Tensor) -> torch.Tensor:
        oom_above(2, x.shape[0])
        return x * 2

    with torch.no_grad():
        assert torch.equal(double(X), X * 2)
    assert made == []
    assert torch.equal(double(X), X * 2)  # with gradients on, the chunks are watched
    assert len(made) == 2


def test_a_call_that_fits_runs_backward_unwatched() -> None:
    net = model()

    @torchmemguard.oom_safe
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        torch.nn.functional.mse_loss(net(x), y).backward()

    step(X, Y)
    expected = reference_grads(X, Y)
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), expected, strict=True))
    assert not step.oom_guard.runs_backward


def test_refusal_after_a_stopped_backward_is_chained_from_the_oom() -> None:
    net = model()

    @torchmemguard.oom_safe
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        oom_above(2, x.shape[0])
        torch.nn.functional.mse_loss(net(x), y).backward()

    with pytest.raises(torchmemguard.OutOfMemoryError) as caught:
        step(X, Y)
    cause = caught.value.__cause__
    assert isinstance(cause, torch.OutOfMemoryError)
    assert str(cause) == "CUDA out of memory."
    assert cause.__traceback__ is None  # its frames went, with the failed attempt's tensors
