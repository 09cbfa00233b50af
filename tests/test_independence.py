"""The row check: a split call answers what the whole batch would, or is refused."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import torchmemguard
from tests.conftest import ScarceModule, oom_above
from torchmemguard import SplitRefusedError
from torchmemguard._independence import difference, tolerance
from torchmemguard._merging import Merger

# The out-of-memory errors here are raised by the tests and take no memory.
pytestmark = pytest.mark.usefixtures("unmeasured")


# ---------------------------------------------------------------------------
# Outputs that couple the batch are refused, never merged


def test_a_softmax_over_the_batch_is_refused_with_both_numbers() -> None:
    @torchmemguard.oom_safe
    def rerank(scores: torch.Tensor) -> torch.Tensor:
        oom_above(16, scores.shape[0])
        return scores.softmax(0)

    with pytest.raises(SplitRefusedError) as caught:
        rerank(torch.randn(64))
    message = str(caught.value)
    assert "rerank" in message
    assert "depend on each other" in message
    assert "alone against" in message
    assert "softmax" in message  # what to do


def test_a_standardisation_over_the_batch_is_refused() -> None:
    @torchmemguard.oom_safe
    def standardise(x: torch.Tensor) -> torch.Tensor:
        oom_above(16, x.shape[0])
        return (x - x.mean(0)) / x.std(0)

    with pytest.raises(SplitRefusedError, match="depend on each other"):
        standardise(torch.randn(64, 5))


def reranker(sizes: list[int], check_rows: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """A guarded softmax over the batch that runs out above 16 rows and records each
    attempt's size in ``sizes``."""

    @torchmemguard.oom_safe(check_rows=check_rows)
    def rerank(scores: torch.Tensor) -> torch.Tensor:
        sizes.append(scores.shape[0])
        oom_above(16, scores.shape[0])
        return scores.softmax(0)

    return rerank


def test_a_refusal_is_remembered_and_later_calls_refuse_before_any_chunk() -> None:
    sizes: list[int] = []
    rerank = reranker(sizes)
    with pytest.raises(SplitRefusedError):
        rerank(torch.randn(64))
    sizes.clear()
    with pytest.raises(SplitRefusedError, match="depend on each other"):
        rerank(torch.randn(64))
    assert sizes == [64]
    assert rerank.oom_guard.refusal is not None  # type: ignore[attr-defined]
    assert torch.allclose(rerank(torch.ones(4)), torch.full((4,), 0.25))  # fits: runs whole


def test_clear_forgets_a_refusal() -> None:
    @torchmemguard.oom_safe
    def rerank(scores: torch.Tensor) -> torch.Tensor:
        oom_above(16, scores.shape[0])
        return scores.softmax(0)

    with pytest.raises(SplitRefusedError):
        rerank(torch.randn(64))
    rerank.oom_guard.clear()  # type: ignore[attr-defined]
    assert rerank.oom_guard.refusal is None  # type: ignore[attr-defined]


def test_a_refusal_is_an_out_of_memory_error_and_a_batch_error() -> None:
    refusal = SplitRefusedError("x")
    assert isinstance(refusal, torch.OutOfMemoryError)
    assert isinstance(refusal, torchmemguard.OutOfMemoryError)
    assert isinstance(refusal, torchmemguard.BatchError)
    assert torchmemguard.is_oom(refusal)


def test_a_call_whose_rows_raise_alone_is_refused_from_that_error() -> None:
    @torchmemguard.oom_safe
    def needs_company(x: torch.Tensor) -> torch.Tensor:
        oom_above(8, x.shape[0])
        if x.shape[0] < 2:
            raise ValueError("needs two samples")
        return x - x.mean(0)

    with pytest.raises(SplitRefusedError, match="raised ValueError: needs two samples") as caught:
        needs_company(torch.randn(16, 3))
    assert isinstance(caught.value.__cause__, ValueError)


def test_a_random_call_is_left_unchecked_and_answered() -> None:
    @torchmemguard.oom_safe
    def noisy(x: torch.Tensor) -> torch.Tensor:
        oom_above(8, x.shape[0])
        return x + torch.rand_like(x)

    out = noisy(torch.zeros(32, 4))
    assert out.shape == (32, 4)


def test_check_rows_false_skips_the_check() -> None:
    sizes: list[int] = []
    reranker(sizes, check_rows=False)(torch.randn(64))
    assert sizes == [64, 32, 16, 16, 16, 16]


def test_a_row_independent_function_answers_exactly_after_one_check() -> None:
    sizes: list[int] = []

    @torchmemguard.oom_safe
    def score(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        oom_above(16, x.shape[0])
        return (x * 3).sum(1)

    x = torch.randn(64, 5, dtype=torch.float64)
    assert torch.equal(score(x), (x * 3).sum(1))
    assert sizes == [64, 32, 16, 16, 16, 16, 2, 2]  # 2, 2: rows 1-2 and 14-15 alone


def test_a_single_row_chunk_is_checked_against_a_run_of_two_rows() -> None:
    sizes: list[int] = []

    @torchmemguard.oom_safe
    def scan(x: torch.Tensor) -> torch.Tensor:
        # Each row depends on the rows before it. The first try of each size above one
        # runs out of memory, so the call runs in chunks of one row, each computed as it
        # would be alone: only a run of two rows shows the dependence.
        sizes.append(x.shape[0])
        if x.shape[0] > 1 and sizes.count(x.shape[0]) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return x.cumsum(0)

    with pytest.raises(SplitRefusedError, match="depend on each other"):
        scan(torch.arange(1.0, 9.0))
    # Once the eight chunks of one row ran, the check: two rows, row 1 alone, and again.
    assert sizes == [8, 4, 2] + [1] * 8 + [2, 1, 1]


# ---------------------------------------------------------------------------
# Low-precision and batch-size-dependent numerics are never refused


def test_a_bfloat16_mlp_is_split_and_not_refused() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).to(torch.bfloat16)
    model = ScarceModule(mlp.eval(), limit=25)
    x = torch.randn(100, 64, dtype=torch.bfloat16)
    guarded = torchmemguard.guard(model)
    with torch.no_grad():
        out = guarded(x)
        chunked = torch.cat([mlp(x[i : i + 25]) for i in range(0, 100, 25)])
    assert torch.equal(out, chunked)
    assert guarded.oom_guard.refusal is None
    assert model.sizes == [100, 50, 25, 25, 25, 25, 3, 3]  # 3, 3: the row check


def test_a_float32_transformer_encoder_is_split_and_not_refused() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    model = ScarceModule(encoder, limit=12)
    x = torch.randn(40, 10, 32)
    guarded = torchmemguard.guard(model)
    with torch.no_grad():
        out = guarded(x)
        whole = encoder(x)
    torch.testing.assert_close(out, whole, rtol=1e-4, atol=1e-5)
    assert guarded.oom_guard.refusal is None
    assert model.sizes == [40, 20, 10, 10, 10, 10, 1, 1]  # 1, 1: the row check


# ---------------------------------------------------------------------------
# The comparison


def test_difference_is_none_within_the_dtype_numerics() -> None:
    together = torch.randn(8, 4)
    alone = together[1:3] * (1 + 1e-4)
    assert difference(alone, together, 1, Merger(), []) is None


def test_difference_names_the_path_and_both_values() -> None:
    together = {"scores": torch.zeros(8, 2)}
    alone = {"scores": torch.ones(2, 2)}
    found = difference(alone, together, 1, Merger(), [])
    assert found is not None
    assert found.startswith("output['scores'] at [0, 0] of the rows alone: 1 alone against 0")


def test_difference_treats_nan_in_both_as_equal_and_in_one_as_a_difference() -> None:
    together = torch.tensor([[0.0], [float("nan")], [1.0]])
    assert difference(together[1:3].clone(), together, 1, Merger(), []) is None
    assert difference(torch.tensor([[0.0], [1.0]]), together, 1, Merger(), []) is not None


def test_tolerance_follows_the_least_precise_dtype() -> None:
    assert tolerance([torch.float64]) < tolerance([torch.float32]) < tolerance([torch.bfloat16])
    assert tolerance([torch.float32, torch.bfloat16]) == tolerance([torch.bfloat16])


def test_a_check_that_runs_out_of_memory_once_runs_again_after_recovery() -> None:
    sizes: list[int] = []

    @torchmemguard.oom_safe
    def score(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        oom_above(8, x.shape[0])
        if x.shape[0] == 1 and sizes.count(1) == 1:  # the check's first run, the first time
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return x.sum(1)

    x = torch.arange(16.0).unsqueeze(1).repeat(1, 3)
    assert torch.equal(score(x), x.sum(1))
    assert sizes == [16, 8, 8, 1, 1, 1]
    assert score.oom_guard.stats.ooms == 2  # type: ignore[attr-defined]


def test_a_check_that_never_fits_refuses_a_callable_never_checked_for_this_call() -> None:
    @torchmemguard.oom_safe
    def score(x: torch.Tensor) -> torch.Tensor:
        oom_above(8, x.shape[0])
        if x.shape[0] == 1:  # every run of the check
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return x.sum(1)

    x = torch.arange(16.0).unsqueeze(1).repeat(1, 3)
    with pytest.raises(SplitRefusedError, match="ran out of memory running 1 of them again"):
        score(x)
    assert score.oom_guard.refusal is None  # type: ignore[attr-defined]  # not remembered
