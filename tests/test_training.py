"""accumulate_gradients: exact gradients over micro-batches, nothing accumulated twice."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import torchmemguard
from tests.realcap import address_space_cap, prepare_child, run_child
from tests.training_models import Net, Scarce, batch, net, wide_step


def reference_grads(model: Net, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> list:
    """The gradients of one whole-batch backward on a copy of ``model``."""
    twin = copy.deepcopy(model)
    twin.scarce = Scarce()
    F.cross_entropy(twin(x), y, reduction=reduction).backward()
    return [p.grad for p in twin.parameters()]


def assert_grads_equal(model: torch.nn.Module, expected: list) -> None:
    for p, want in zip(model.parameters(), expected, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, want, rtol=0, atol=1e-12)


def stepper(model: Net, reduction: str = "mean", **options: object):
    return torchmemguard.accumulate_gradients(
        model,
        lambda x, y: F.cross_entropy(model(x), y, reduction=reduction),
        reduction=reduction,  # type: ignore[arg-type]
        **options,  # type: ignore[arg-type]
    )


def eval_net(scarce: Scarce) -> Net:
    model = net(scarce=scarce)
    model.norm.eval()  # batch statistics would couple the samples
    return model


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_gradients_equal_the_whole_batch_after_an_oom(phase: str) -> None:
    scarce = Scarce(12, phase)
    model = eval_net(scarce)
    x, y = batch(40)
    expected = reference_grads(model, x, y)
    loss = stepper(model)(x, y)
    assert_grads_equal(model, expected)
    twin = copy.deepcopy(model)
    twin.scarce = Scarce()
    torch.testing.assert_close(loss, F.cross_entropy(twin(x), y).detach(), rtol=0, atol=1e-12)
    assert not loss.requires_grad


def test_the_micro_batch_halves_until_it_fits_then_every_sample_runs_once() -> None:
    scarce = Scarce(12, "backward")
    model = eval_net(scarce)
    stepper(model)(*batch(40))
    # 8, 4, 4: the check, before the first micro-batches, that the loss splits (no gradients).
    assert scarce.sizes == [40, 8, 4, 4, 20, 10, 10, 10, 10]


def test_the_next_step_raises_no_oom() -> None:
    scarce = Scarce(12, "forward")
    model = eval_net(scarce)
    step = stepper(model)
    step(*batch(40))
    scarce.sizes.clear()
    model.zero_grad()
    step(*batch(40, seed=1))
    assert scarce.sizes == [10, 10, 10, 10]
    assert step.oom_guard.stats.ooms == 2  # type: ignore[attr-defined]


def test_every_recovery_empties_the_cache_when_the_oom_names_no_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torchmemguard._device import recovery

    emptied: list[object] = []
    monkeypatch.setattr(recovery, "empty_cache", emptied.append)
    scarce = Scarce(12, "forward", message="out of memory")
    model = eval_net(scarce)
    step = stepper(model)
    for seed in range(2):
        model.zero_grad()
        step(*batch(40, seed=seed))
        scarce.rows = 6  # the next step runs out again, below what was learned
    ooms = step.oom_guard.stats.ooms  # type: ignore[attr-defined]
    assert ooms >= 3
    # No other thread recovered in between: every OOM's recovery empties the cache.
    assert emptied == [torch.device("cpu")] * ooms


def test_gradients_present_at_the_start_are_kept_and_added_to_once() -> None:
    scarce = Scarce(12, "backward")
    model = eval_net(scarce)
    x, y = batch(40)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    expected = [g + 0.5 for g in reference_grads(model, x, y)]
    stepper(model)(x, y)
    assert_grads_equal(model, expected)


def test_sum_reduced_losses_accumulate_unscaled() -> None:
    model = eval_net(Scarce(12, "forward"))
    x, y = batch(40)
    expected = reference_grads(model, x, y, reduction="sum")
    loss = stepper(model, reduction="sum")(x, y)
    assert_grads_equal(model, expected)
    model.scarce.rows = None
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y, reduction="sum").detach())


def test_batch_norm_buffers_are_those_of_the_micro_batches_that_ran() -> None:
    scarce = Scarce(12, "backward")
    model = net(scarce=scarce)  # BatchNorm in training mode
    twin = copy.deepcopy(model)
    twin.scarce = Scarce()
    x, y = batch(40)
    with pytest.warns(RuntimeWarning, match="BatchNorm1d"):
        stepper(model)(x, y)
    for begin in range(0, 40, 10):  # what ran without error: four micro-batches of 10
        F.cross_entropy(twin(x[begin : begin + 10]), y[begin : begin + 10]).backward()
    assert int(model.norm.num_batches_tracked) == 4
    torch.testing.assert_close(model.norm.running_mean, twin.norm.running_mean)
    torch.testing.assert_close(model.norm.running_var, twin.norm.running_var)


def test_a_batch_that_fits_runs_whole_with_the_gradients_of_a_plain_step() -> None:
    scarce = Scarce()
    model = net(scarce=scarce)
    x, y = batch(40)
    twin = copy.deepcopy(model)
    plain = F.cross_entropy(twin(x), y)
    plain.backward()
    loss = stepper(model)(x, y)
    assert scarce.sizes == [40]
    assert torch.equal(loss, plain.detach())
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)  # type: ignore[arg-type]


def test_another_exception_passes_through_with_the_gradients_restored() -> None:
    model = eval_net(Scarce(12, "forward"))
    calls = []

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        loss = F.cross_entropy(model(x), y)
        if len(calls) == 4:  # the second micro-batch, after one has accumulated
            raise KeyError("not an OOM")
        return loss

    step = torchmemguard.accumulate_gradients(model, loss_fn)
    with pytest.raises(KeyError, match="not an OOM"):
        step(*batch(40))
    assert all(p.grad is None for p in model.parameters())


def test_a_step_that_cannot_fit_raises_our_oom_error_with_gradients_restored() -> None:
    model = eval_net(Scarce(0, "backward"))
    step = stepper(model, max_retries=3)
    with pytest.raises(torchmemguard.OutOfMemoryError, match="as it was when the step started"):
        step(*batch(8))
    assert all(p.grad is None for p in model.parameters())
    assert step.oom_guard.stats.unrecovered == 1  # type: ignore[attr-defined]


def test_a_grown_back_size_returns_to_the_whole_batch() -> None:
    scarce = Scarce(12, "forward")
    model = eval_net(scarce)
    step = stepper(model, grow_after=1)
    step(*batch(40))
    scarce.rows = None  # memory was freed
    for _ in range(10):
        model.zero_grad()
        scarce.sizes.clear()
        step(*batch(40))
    assert scarce.sizes == [40]
    assert step.oom_guard.stats.ooms == 2  # type: ignore[attr-defined]


def test_a_step_with_nothing_to_split_runs_whole_then_refuses_on_an_oom() -> None:
    model = eval_net(Scarce(0, "forward"))
    x, y = batch(4)
    step = torchmemguard.accumulate_gradients(
        model, lambda scale: F.cross_entropy(model(x), y) * scale
    )
    with pytest.raises(torchmemguard.BatchError, match="nothing to split"):
        step(2.0)
    assert model.scarce.sizes == [4]
    assert all(p.grad is None for p in model.parameters())


def test_a_loss_that_is_not_a_scalar_is_refused() -> None:
    model = eval_net(Scarce())
    step = torchmemguard.accumulate_gradients(model, lambda x: model(x))
    with pytest.raises(TypeError, match="scalar tensor"):
        step(batch(4)[0])


def test_bad_arguments_are_all_named_at_once() -> None:
    model = eval_net(Scarce())
    with pytest.raises(TypeError) as found:
        torchmemguard.accumulate_gradients(model, reduction="max", merge=list)  # type: ignore[call-overload]
    assert "reduction" in str(found.value)
    assert "merge" in str(found.value)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        torchmemguard.accumulate_gradients(lambda x: x)  # type: ignore[call-overload]
    # The options of oom_safe are checked with the rest, and a bad value is a ValueError.
    with pytest.raises(ValueError, match=r"reduction must be .*min_chunk must be at least 1"):
        torchmemguard.accumulate_gradients(model, reduction="max", min_chunk=0)  # type: ignore[call-overload]


def test_grad_scaler_scales_every_micro_batch() -> None:
    model = eval_net(Scarce(12, "backward"))
    x, y = batch(40)
    expected = reference_grads(model, x, y)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    stepper(model, scaler=scaler)(x, y)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler.unscale_(optimizer)
    assert_grads_equal(model, expected)


def test_autocast_runs_each_micro_batch_in_lower_precision() -> None:
    model = eval_net(Scarce(12, "forward")).float()
    x, y = batch(40)
    dtypes = []
    step = torchmemguard.accumulate_gradients(model, lambda x, y: F.cross_entropy(logits(x), y))

    def logits(x: torch.Tensor) -> torch.Tensor:
        out = model(x.float())
        dtypes.append(out.dtype)
        return out

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = step(x, y)
    assert set(dtypes) == {torch.bfloat16}
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


# ---------------------------------------------------------------------------
# Under a real cap (RLIMIT_AS), in a child process


def _scenario_capped_step(headrooms_mib: list[float]) -> dict[str, Any]:
    prepare_child()
    import torch

    import torchmemguard

    # The whole batch runs out in the forward under 32 MiB of headroom, in the backward
    # under 60.
    model, x, y = wide_step()
    F.cross_entropy(model(x), y).backward()
    reference = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    runs = []
    for headroom in headrooms_mib:
        model.zero_grad(set_to_none=True)
        phase = "forward"
        with address_space_cap(headroom):
            try:
                loss = F.cross_entropy(model(x), y)
                phase = "backward"
                loss.backward()
                phase = "none"
            except RuntimeError:
                pass
            loss = None
        model.zero_grad(set_to_none=True)
        step = torchmemguard.accumulate_gradients(model, lambda x, y: F.cross_entropy(model(x), y))
        with address_space_cap(headroom):
            step(x, y)
        runs.append(
            {
                "plain_ran_out_in": phase,
                "ooms": step.oom_guard.stats.ooms,  # type: ignore[attr-defined]
                "learned": list(step.oom_guard.learned().values()),  # type: ignore[attr-defined]
                "equal": all(
                    torch.allclose(p.grad, r, rtol=1e-5, atol=1e-6)  # type: ignore[arg-type]
                    for p, r in zip(model.parameters(), reference, strict=True)
                ),
            }
        )
    return {"runs": runs}


@pytest.mark.slow
def test_a_step_under_a_real_cap_has_the_whole_batch_gradients() -> None:
    found = run_child("tests.test_training:_scenario_capped_step", [32, 60], tuned=True)
    phases = [run["plain_ran_out_in"] for run in found["runs"]]
    assert phases == ["forward", "backward"], found
    for run in found["runs"]:
        assert run["ooms"] >= 1, found
        assert run["learned"], found
        assert run["learned"][0] < 4096, found
        assert run["equal"], found
