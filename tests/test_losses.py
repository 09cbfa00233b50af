"""accumulate_gradients and losses that are not a mean over samples: token-level and
weighted means made exact by ``items``, and losses whose micro-batches would not add up
refused before any gradient is touched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import torchmemguard
from tests.training_models import (
    Scarce,
    TokenNet,
    token_batch,
    token_items,
    token_loss,
    token_net,
)
from torchmemguard import SplitRefusedError

TOL = 1e-12


def whole_batch(model: TokenNet, loss_fn, *batch) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The gradients and the loss of one whole-batch backward on a copy of ``model``."""
    twin = copy.deepcopy(model)
    twin.scarce = Scarce()
    loss = loss_fn(twin, *batch)
    loss.backward()
    return [p.grad for p in twin.parameters()], loss.detach()


def assert_equal_to(model: torch.nn.Module, loss: torch.Tensor, expected) -> None:
    grads, whole = expected
    torch.testing.assert_close(loss, whole, rtol=0, atol=TOL)
    for p, want in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=0, atol=TOL)


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_a_token_level_mean_with_items_equals_the_whole_batch(phase: str) -> None:
    model = token_net(scarce=Scarce(5, phase))
    ids, labels = token_batch(16)
    expected = whole_batch(model, token_loss, ids, labels)
    step = torchmemguard.accumulate_gradients(
        model, lambda i, y: token_loss(model, i, y), items=token_items
    )
    loss = step(ids, labels)
    assert max(model.scarce.sizes) == 16  # the whole batch was tried first
    assert_equal_to(model, loss, expected)


def test_a_class_weighted_mean_with_items_equals_the_whole_batch() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4).double()
    x = torch.randn(30, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (30,))
    weight = torch.tensor([0.2, 1.0, 3.0, 7.0], dtype=torch.float64)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 8:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return F.cross_entropy(model(x), y, weight=weight)

    twin = copy.deepcopy(model)
    whole = F.cross_entropy(twin(x), y, weight=weight)
    whole.backward()
    step = torchmemguard.accumulate_gradients(model, loss_fn, items=lambda x, y: weight[y])
    loss = step(x, y)
    torch.testing.assert_close(loss, whole.detach(), rtol=0, atol=TOL)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=TOL)


def test_micro_batches_without_items_are_skipped_and_nothing_is_nan() -> None:
    model = token_net(scarce=Scarce(4, "forward"))
    ids, labels = token_batch(16)
    labels[:4] = -100  # the whole first micro-batch of 4 holds no valid token
    expected = whole_batch(model, token_loss, ids, labels)
    step = torchmemguard.accumulate_gradients(
        model, lambda i, y: token_loss(model, i, y), items=token_items
    )
    loss = step(ids, labels)
    assert_equal_to(model, loss, expected)
    assert torch.isfinite(loss)


def test_a_batch_without_any_item_contributes_nothing() -> None:
    model = token_net(scarce=Scarce(4, "forward"))
    ids, labels = token_batch(16)
    labels[:] = -100
    step = torchmemguard.accumulate_gradients(
        model, lambda i, y: token_loss(model, i, y), items=token_items
    )
    loss = step(ids, labels)
    assert float(loss) == 0.0
    assert all(p.grad is None for p in model.parameters())


def test_a_token_level_mean_without_items_is_refused_naming_the_labels() -> None:
    model = token_net(scarce=Scarce(5, "forward"))
    ids, labels = token_batch(16)
    step = torchmemguard.accumulate_gradients(model, lambda i, y: token_loss(model, i, y))
    with pytest.raises(SplitRefusedError, match=r"'y' holds ignored positions.*items=") as caught:
        step(ids, labels)
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    assert all(p.grad is None for p in model.parameters())
    assert step.oom_guard.refusal is not None  # type: ignore[attr-defined]
    model.scarce.sizes.clear()
    with pytest.raises(SplitRefusedError, match="ignored positions"):
        step(ids, labels)  # refused at the first OOM, before any micro-batch
    assert model.scarce.sizes == [16]


def info_nce(model: torch.nn.Module, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """In-batch negatives: every other sample's key is a negative."""
    q = F.normalize(model(queries), dim=-1)
    k = F.normalize(model(keys), dim=-1)
    scores = q @ k.T / 0.05
    return F.cross_entropy(scores, torch.arange(len(q)))


def test_an_info_nce_loss_is_refused_with_both_numbers() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 6).double()
    queries = torch.randn(32, 6, dtype=torch.float64)
    keys = queries + 0.3 * torch.randn(32, 6, dtype=torch.float64)

    def loss_fn(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        if queries.shape[0] > 8:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return info_nce(model, queries, keys)

    step = torchmemguard.accumulate_gradients(model, loss_fn)
    with pytest.raises(SplitRefusedError, match=r"do not add up: the loss of samples 0 to 7 is"):
        step(queries, keys)
    assert all(p.grad is None for p in model.parameters())


def test_the_loss_check_runs_in_eval_mode_and_puts_the_modes_back() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3)
    )
    model.double().train()
    modes: list[bool] = []
    x = torch.randn(32, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        modes.append(model[1].training)
        if x.shape[0] > 8:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return F.cross_entropy(model(x), y)

    torchmemguard.accumulate_gradients(model, loss_fn)(x, y)
    # The whole batch, the check (8 samples, then its halves), micro-batches of 16 that
    # run out, then of 8.
    assert modes == [True, False, False, False, True, True, True, True, True]
    assert all(m.training for m in model.modules())


def test_check_rows_false_accepts_a_loss_that_does_not_split() -> None:
    model = token_net(scarce=Scarce(5, "forward"))
    ids, labels = token_batch(16)
    step = torchmemguard.accumulate_gradients(
        model, lambda i, y: token_loss(model, i, y), check_rows=False
    )
    assert torch.isfinite(step(ids, labels))


def test_items_of_the_wrong_shape_are_refused_naming_items_and_the_shape() -> None:
    model = token_net(scarce=Scarce(5, "forward"))
    ids, labels = token_batch(16)
    step = torchmemguard.accumulate_gradients(
        model, lambda i, y: token_loss(model, i, y), items=lambda i, y: (y != -100).sum()
    )
    with pytest.raises(ValueError, match=r"items must return one count per sample.*shape \(\)"):
        step(ids, labels)


def test_items_with_a_sum_and_items_that_are_not_callable_are_refused_at_once() -> None:
    model = token_net()
    with pytest.raises(TypeError, match="items must be callable, got 3") as caught:
        torchmemguard.accumulate_gradients(model, token_loss, items=3, reduction="sum")  # type: ignore[arg-type]
    assert "items applies to reduction='mean'" in str(caught.value)


def test_an_input_changed_in_place_before_the_oom_is_refused_by_name() -> None:
    model = torch.nn.Linear(3, 2).double()

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)
        if x.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return F.cross_entropy(model(x), y)

    step = torchmemguard.accumulate_gradients(model, loss_fn)
    with pytest.raises(SplitRefusedError, match="changed 'x' in place"):
        step(torch.ones(8, 3, dtype=torch.float64), torch.zeros(8, dtype=torch.long))


# ---------------------------------------------------------------------------
# A transformers causal language model, called as users call it, with padded labels


def gpt2() -> torch.nn.Module:
    """The GPT-2 of the transformers tests (no dropout), in float64 and training mode."""
    pytest.importorskip("transformers")
    from tests.test_transformers import gpt2_model

    return gpt2_model().double().train()


def gpt2_batch() -> dict[str, torch.Tensor]:
    ids, labels = token_batch(12, length=10, seed=3)
    mask = (labels != -100).long()
    mask[:, 0] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def scarce_gpt2(model: torch.nn.Module, limit: int) -> None:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs["input_ids"].shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory.")

    model.register_forward_pre_hook(hook, with_kwargs=True)


def test_gpt2_with_padded_labels_and_items_equals_the_whole_batch() -> None:
    model = gpt2()
    batch = gpt2_batch()
    twin = copy.deepcopy(model)
    whole = twin(**batch).loss
    whole.backward()
    scarce_gpt2(model, 4)
    step = torchmemguard.accumulate_gradients(
        model,
        lambda input_ids, attention_mask, labels: (
            model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        ),
        # The model shifts its labels by one: the first label of each row is never used.
        items=lambda input_ids, attention_mask, labels: (labels[:, 1:] != -100).sum(-1),
    )
    loss = step(**batch)
    # The model computes its loss in float32 (transformers casts the logits with .float()),
    # so float32 rounding is all that may differ; without items, the gradients differ by
    # a large fraction of their size.
    torch.testing.assert_close(loss, whole.detach(), rtol=1e-6, atol=1e-7)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7)


def test_gpt2_with_padded_labels_and_no_items_is_refused() -> None:
    model = gpt2()
    scarce_gpt2(model, 4)
    step = torchmemguard.accumulate_gradients(
        model,
        lambda input_ids, attention_mask, labels: (
            model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        ),
    )
    with pytest.raises(SplitRefusedError, match=r"'labels' holds ignored positions \(-100\)"):
        step(**gpt2_batch())
    assert all(p.grad is None for p in model.parameters())
