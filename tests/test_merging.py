"""Tests for torchmemguard._merging: checking chunk outputs early, padded merges, caches."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import pytest
import torch

import torchmemguard
from torchmemguard import MergeError
from torchmemguard._merging import FIRST, Merger, merge_padded


class Cache:
    """Stands in for transformers' cache base class, which the merge recognises by name."""


Cache.__module__ = "transformers.cache_utils"


class DynamicCache(Cache):
    pass


@dataclasses.dataclass
class Generated:
    """Built like a transformers generation output."""

    sequences: torch.Tensor
    cache: object = None


def ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows)


# ---------------------------------------------------------------------------
# Checking one chunk's output against the first


def test_tensors_of_different_trailing_shapes_are_named_with_path_and_shapes() -> None:
    first = {"sequences": ids([1, 2, 3])}
    with pytest.raises(MergeError, match=r"output\['sequences'\].*\(1, 3\) and \(1, 2\)"):
        Merger().check({"sequences": ids([4, 5])}, 1, first, 1)


def test_tensors_of_different_trailing_shapes_suggest_merge_padded() -> None:
    with pytest.raises(MergeError, match="merge_padded"):
        Merger().check(ids([4, 5]), 1, ids([1, 2, 3]), 1)


def test_first_chunk_alone_is_not_judged_for_what_only_others_can_show() -> None:
    # A reduced value may still be an object every chunk returns as it is.
    Merger().check(torch.tensor(0.5), 2, FIRST)
    Merger().check(3, 2, FIRST)


def test_a_first_chunk_that_is_not_one_row_per_sample_is_named_at_the_second() -> None:
    with pytest.raises(MergeError, match=r"chunk of 2 samples returned a tensor of shape \(\)"):
        Merger().check(torch.tensor(0.4), 2, torch.tensor(0.5), 2)


def test_a_cache_in_the_first_chunk_is_refused_at_once() -> None:
    with pytest.raises(MergeError, match=r"output\.cache.*key-value cache \(DynamicCache\)"):
        Merger().check(Generated(ids([1]), DynamicCache()), 1, FIRST)


def test_tensors_on_different_devices_do_not_merge() -> None:
    with pytest.raises(MergeError, match="meta"):
        Merger().check(torch.zeros(2, device="meta"), 2, torch.zeros(2), 2)


def test_per_step_tuples_of_different_step_counts_name_both_lengths() -> None:
    first = (ids([1]), ids([2]), ids([3]))
    with pytest.raises(MergeError, match="lengths 3 and 2"):
        Merger().check((ids([1]), ids([2])), 1, first, 1)


# ---------------------------------------------------------------------------
# Padded merges


def test_merge_padded_pads_shorter_sequences_on_the_right() -> None:
    merged = merge_padded(pad_value=0)([ids([1, 2, 3], [4, 5, 6]), ids([7])])
    assert torch.equal(merged, ids([1, 2, 3], [4, 5, 6], [7, 0, 0]))


def test_merge_padded_pads_shorter_sequences_on_the_left() -> None:
    merged = merge_padded(pad_value=-1, side="left")([ids([1, 2, 3]), ids([7, 8])])
    assert torch.equal(merged, ids([1, 2, 3], [-1, 7, 8]))


def test_merge_padded_pads_every_dimension_past_the_first() -> None:
    merged = merge_padded()([torch.ones(1, 2, 3), torch.ones(1, 3, 1)])
    assert merged.shape == (2, 3, 3)
    assert merged[1, :, 1:].eq(0).all()
    assert merged[0, 2].eq(0).all()


def test_merge_padded_keeps_a_float_pad_value_in_float_outputs() -> None:
    merged = merge_padded(pad_value=float("-inf"))([torch.zeros(1, 2), torch.zeros(1, 1)])
    assert merged[1, 1].item() == float("-inf")


def test_merge_padded_pads_tensors_inside_structures() -> None:
    merged = merge_padded(pad_value=9)([{"x": ids([1, 2])}, {"x": ids([3])}])
    assert torch.equal(merged["x"], ids([1, 2], [3, 9]))


def test_merge_padded_refuses_tensors_of_different_ranks() -> None:
    with pytest.raises(MergeError, match="different numbers of dimensions"):
        merge_padded()([torch.zeros(1, 2), torch.zeros(1, 2, 2)])


def test_merge_padded_refuses_a_side_that_is_not_left_or_right() -> None:
    with pytest.raises(ValueError, match="'top'"):
        merge_padded(side="top")  # type: ignore[arg-type]


def test_merge_padded_refuses_a_pad_value_that_is_not_a_number() -> None:
    with pytest.raises(TypeError, match="'0'"):
        merge_padded(pad_value="0")  # type: ignore[arg-type]


def test_padding_only_at_the_named_paths_refuses_others() -> None:
    merger = Merger(pad_value=0, pad_paths=frozenset({"output[0]"}))
    merged = merger.merge([(ids([1, 2]), ids([1])), (ids([3]), ids([2]))], [1, 1])
    assert torch.equal(merged[0], ids([1, 2], [3, 0]))
    with pytest.raises(MergeError, match=r"output\[1\]"):
        merger.merge([(ids([1]), ids([1, 2])), (ids([3]), ids([2]))], [1, 1])


# ---------------------------------------------------------------------------
# Structures that merge


def test_a_defaultdict_output_merges_with_its_default_factory() -> None:
    outputs = [collections.defaultdict(list, x=ids([1])), collections.defaultdict(list, x=ids([2]))]
    merged = Merger().merge(outputs, [1, 1])
    assert type(merged) is collections.defaultdict
    assert merged.default_factory is list
    assert torch.equal(merged["x"], ids([1], [2]))


class Strict(dict[str, Any]):
    """A mapping that cannot be built from a dict alone."""

    def __init__(self, data: dict[str, Any], owner: str) -> None:
        super().__init__(data)
        self.owner = owner


def test_a_mapping_that_cannot_be_rebuilt_raises_merge_error_naming_the_path() -> None:
    outputs = [{"inner": Strict({"x": ids([1])}, "a")}, {"inner": Strict({"x": ids([2])}, "b")}]
    with pytest.raises(MergeError, match=r"output\['inner'\].*Strict"):
        Merger().merge(outputs, [1, 1])


# ---------------------------------------------------------------------------
# In a guarded call


def test_guarded_call_stops_at_the_second_chunk_when_shapes_differ_beyond_dim_zero() -> None:
    calls = []

    @torchmemguard.oom_safe(check_rows=False)  # chunks of one row: the merge alone
    def generate(prompts: torch.Tensor) -> torch.Tensor:
        calls.append(prompts.shape[0])
        if prompts.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return torch.ones(1, int(prompts[0, 0]))

    with pytest.raises(MergeError, match=r"\(1, 3\) and \(1, 1\)"):
        generate(torch.tensor([[3], [1], [2], [5]]))
    assert calls == [4, 2, 1, 1]


def test_guarded_call_with_merge_padded_returns_the_padded_sequences() -> None:
    @torchmemguard.oom_safe(merge=merge_padded(pad_value=0), check_rows=False)
    def generate(prompts: torch.Tensor) -> torch.Tensor:
        if prompts.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return torch.arange(1, int(prompts[0, 0]) + 1).unsqueeze(0)

    out = generate(torch.tensor([[3], [1]]))
    assert torch.equal(out, ids([1, 2, 3], [1, 0, 0]))


# ---------------------------------------------------------------------------
# Filled in as the chunks come back


def _split_in_chunks_of(limit: int, fn: Any) -> Any:
    """``fn`` guarded so that every batch above ``limit`` samples runs out of memory."""

    def body(x: torch.Tensor) -> Any:
        if x.shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return fn(x)

    return torchmemguard.oom_safe(body, check_rows=False)


def test_a_chunk_output_that_the_next_chunk_overwrites_merges_as_the_whole_batch() -> None:
    workspace = torch.empty(4, 3)  # a buffer the function reuses, as some kernels do

    def scaled(x: torch.Tensor) -> torch.Tensor:
        out = workspace[: x.shape[0]]
        torch.mul(x, 2, out=out)
        return out

    x = torch.arange(30.0).reshape(10, 3)
    assert torch.equal(_split_in_chunks_of(4, scaled)(x), x * 2)


@dataclasses.dataclass
class Encoded:
    """Built like a transformers model output."""

    last_hidden_state: torch.Tensor
    pooled: torch.Tensor
    attentions: object = None


def test_a_structure_of_tensors_fills_in_and_keeps_its_type() -> None:
    x = torch.arange(24.0).reshape(8, 3)
    out = _split_in_chunks_of(3, lambda t: Encoded(t.unsqueeze(1) + 1, t.sum(1)))(x)
    assert type(out) is Encoded
    assert out.attentions is None
    assert torch.equal(out.last_hidden_state, x.unsqueeze(1) + 1)
    assert torch.equal(out.pooled, x.sum(1))


def test_a_chunk_of_another_dtype_ends_the_filling_and_merges_as_a_concatenation() -> None:
    def widened(x: torch.Tensor) -> torch.Tensor:
        return x.double() if x[0, 0] >= 6 else x.clone()

    x = torch.arange(24.0).reshape(8, 3)
    out = _split_in_chunks_of(2, widened)(x)
    expected = torch.cat([x[:2], x[2:].double()])
    assert out.dtype == torch.float64
    assert torch.equal(out, expected)


def test_an_output_in_an_autograd_graph_is_concatenated_and_its_gradients_flow() -> None:
    weight = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    x = torch.arange(24.0).reshape(8, 3)
    out = _split_in_chunks_of(3, lambda t: t * weight)(x)
    assert out.grad_fn is not None
    out.sum().backward()
    assert torch.equal(weight.grad, x.sum(0))


def test_no_room_for_the_whole_output_is_recovered_from_once_then_the_chunks_are_kept_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tries = []

    def full(self: Merger, output: Any, size: int, n: int) -> Any:
        tries.append(n)
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(Merger, "whole_of", full)
    x = torch.arange(24.0).reshape(8, 3)
    guarded = _split_in_chunks_of(3, lambda t: t + 1)
    assert torch.equal(guarded(x), x + 1)
    assert tries == [8, 8]
    assert guarded.oom_guard.stats.ooms == 4  # the batch of 8's, of 4's, and the output's twice
