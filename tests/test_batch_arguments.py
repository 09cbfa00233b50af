"""Which arguments of a guarded call are split, and the calls that are refused.

With the default ``batch_args`` every argument that holds the batch's rows is
split; with named ``batch_args``, a call that would send such an argument whole
to every chunk is refused before any chunk runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import torchmemguard
from tests.conftest import oom_above
from torchmemguard import BatchError


@dataclasses.dataclass
class Inputs:
    ids: torch.Tensor
    mask: torch.Tensor


def masked(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (ids * mask).sum(dim=1, keepdim=True)


IDS = torch.arange(12.0).reshape(4, 3)
MASK = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]])
EXPECTED = masked(IDS, MASK)


# ---------------------------------------------------------------------------
# The default: every per-sample argument is split


def test_default_splits_a_per_sample_positional_argument_after_the_batch() -> None:
    @torchmemguard.oom_safe
    def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        oom_above(2, ids.shape[0])
        return masked(ids, mask)

    assert torch.equal(fn(IDS, MASK), EXPECTED)


def test_default_splits_every_keyword_of_a_batch_encoding_call() -> None:
    @torchmemguard.oom_safe
    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: Any) -> Any:
        oom_above(2, input_ids.shape[0])
        return masked(input_ids, attention_mask) + token_type_ids[:, :1]

    types = torch.arange(4.0).unsqueeze(1).expand(4, 3)
    out = fn(**{"input_ids": IDS, "attention_mask": MASK, "token_type_ids": types})
    assert torch.equal(out, EXPECTED + types[:, :1])


def test_default_splits_per_sample_tensors_inside_a_mapping_argument() -> None:
    @torchmemguard.oom_safe
    def fn(ids: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
        oom_above(2, ids.shape[0])
        return masked(ids, extra["mask"])

    assert torch.equal(fn(IDS, {"mask": MASK}), EXPECTED)


def test_default_splits_per_sample_tensors_inside_a_dataclass_argument() -> None:
    @torchmemguard.oom_safe
    def fn(ids: torch.Tensor, extra: Inputs) -> torch.Tensor:
        oom_above(2, ids.shape[0])
        return masked(ids, extra.mask)

    assert torch.equal(fn(IDS, Inputs(ids=IDS, mask=MASK)), EXPECTED)


def test_default_splits_per_sample_tensors_inside_a_tuple_argument() -> None:
    @torchmemguard.oom_safe
    def fn(ids: torch.Tensor, extra: tuple[torch.Tensor, int]) -> torch.Tensor:
        oom_above(2, ids.shape[0])
        return masked(ids, extra[0]) * extra[1]

    assert torch.equal(fn(IDS, (MASK, 2)), EXPECTED * 2)


def test_default_splits_a_sample_list_beside_the_batch() -> None:
    @torchmemguard.oom_safe
    def fn(ids: torch.Tensor, names: list[str]) -> list[str]:
        oom_above(2, ids.shape[0])
        assert len(names) == ids.shape[0]
        return [f"{name}:{int(row[0])}" for name, row in zip(names, ids, strict=True)]

    assert fn(IDS, ["a", "b", "c", "d"]) == ["a:0", "b:3", "c:6", "d:9"]


def test_default_sends_other_leading_sizes_whole() -> None:
    seen = []

    @torchmemguard.oom_safe
    def fn(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(weights.shape))
        oom_above(2, ids.shape[0])
        return ids @ weights

    weights = torch.eye(3)
    assert torch.equal(fn(IDS, weights), IDS)
    assert seen == [(3, 3), (3, 3), (3, 3), (3, 3)]  # the third: the row check


def test_default_batch_size_is_the_first_positional_arguments() -> None:
    seen = []

    @torchmemguard.oom_safe
    def fn(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        seen.append((ids.shape[0], table.shape[0]))
        oom_above(2, ids.shape[0])
        return ids[:, :1] + table.sum()

    fn(IDS, torch.ones(5, 3))
    assert seen == [(4, 5), (2, 5), (2, 5), (1, 5)]  # the last: the row check


def test_default_takes_the_batch_size_from_a_keyword_when_the_first_holds_none() -> None:
    @torchmemguard.oom_safe
    def fn(input_ids: Any = None, inputs_embeds: Any = None, mask: Any = None) -> torch.Tensor:
        oom_above(2, inputs_embeds.shape[0])
        return masked(inputs_embeds, mask)

    assert torch.equal(fn(inputs_embeds=IDS, mask=MASK), EXPECTED)


def test_whole_args_go_whole_even_with_the_batch_size() -> None:
    seen = []

    @torchmemguard.oom_safe(whole_args=("weights",))
    def fn(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        seen.append(weights.shape[0])
        oom_above(2, ids.shape[0])
        return ids[:, :1] * weights.sum()

    fn(torch.ones(4, 3), torch.ones(4))
    assert seen == [4, 4, 4, 4]  # the third: the row check


def test_a_call_with_no_batch_anywhere_names_every_argument() -> None:
    @torchmemguard.oom_safe
    def fn(config: dict[str, int], depth: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory.")

    with pytest.raises(BatchError, match="'config', 'depth' hold nothing to split"):
        fn({"a": 1}, 3)


# ---------------------------------------------------------------------------
# Named batch_args: a per-sample argument left out is refused


def _named(batch_args: tuple[str, ...], whole_args: tuple[str, ...] = ()) -> Any:
    calls: list[int] = []

    @torchmemguard.oom_safe(batch_args=batch_args, whole_args=whole_args)
    def fn(input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> Any:
        calls.append(input_ids.shape[0])
        oom_above(2, input_ids.shape[0])
        # A mask shared by all samples has the same rows whichever are taken.
        return masked(input_ids, attention_mask[: input_ids.shape[0]])

    return fn, calls


def test_named_batch_args_leaving_out_a_mask_are_refused_naming_it() -> None:
    fn, _ = _named(("input_ids", "token_type_ids"))
    with pytest.raises(BatchError, match=r"argument 'attention_mask' has the batch's 4"):
        fn(IDS, attention_mask=MASK, token_type_ids=MASK)


def test_refusal_names_every_left_out_argument_in_one_message() -> None:
    fn, _ = _named(("input_ids",))
    with pytest.raises(BatchError, match=r"arguments 'attention_mask', 'token_type_ids' have"):
        fn(IDS, attention_mask=MASK, token_type_ids=MASK)


def test_refusal_says_what_to_write() -> None:
    fn, _ = _named(("input_ids",))
    expected = (
        r"batch_args=\('input_ids', 'attention_mask', 'token_type_ids'\).*"
        r"whole_args=\('attention_mask', 'token_type_ids'\)"
    )
    with pytest.raises(BatchError, match=expected):
        fn(IDS, attention_mask=MASK, token_type_ids=MASK)


def test_refusal_comes_before_any_chunk_runs() -> None:
    fn, calls = _named(("input_ids",))
    with pytest.raises(BatchError):
        fn(IDS, attention_mask=MASK)
    assert calls == [4]  # the whole attempt only


def test_refusal_of_a_learned_split_comes_before_any_chunk_runs() -> None:
    fn, calls = _named(("input_ids",), whole_args=("attention_mask",))
    fn(IDS, attention_mask=MASK[:1].expand(4, 3))  # learns a limit of 2
    calls.clear()
    with pytest.raises(BatchError, match="'token_type_ids'"):
        fn(IDS, attention_mask=MASK, token_type_ids=MASK)
    assert calls == []


def test_arguments_declared_whole_are_not_refused() -> None:
    fn, _ = _named(("input_ids",), whole_args=("attention_mask",))
    shared = torch.ones(4, 3)
    assert torch.equal(fn(IDS, attention_mask=shared), IDS.sum(dim=1, keepdim=True))


def test_named_batch_args_that_split_every_per_sample_argument_answer_correctly() -> None:
    fn, _ = _named(("input_ids", "attention_mask"))
    assert torch.equal(fn(IDS, attention_mask=MASK), EXPECTED)


def test_disagreeing_batch_arguments_are_all_named_with_their_sizes() -> None:
    @torchmemguard.oom_safe(batch_args=("a", "b", "c"))
    def fn(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory.")

    with pytest.raises(BatchError, match="a=4, b=3, c=5"):
        fn(torch.ones(4), torch.ones(3), torch.ones(5))


def test_batch_arguments_holding_nothing_are_all_named() -> None:
    @torchmemguard.oom_safe(batch_args=("a", "b"))
    def fn(a: Any, b: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory.")

    with pytest.raises(BatchError, match="batch arguments 'a', 'b' hold nothing to split"):
        fn(None, 3)


# ---------------------------------------------------------------------------
# Options


def test_whole_args_naming_an_unknown_argument_is_refused_at_decoration() -> None:
    with pytest.raises(TypeError, match="whole_args names 'weights'"):
        torchmemguard.oom_safe(whole_args=("weights",))(masked)


def test_an_argument_in_both_batch_args_and_whole_args_is_refused() -> None:
    with pytest.raises(ValueError, match=r"both name \['mask'\]"):
        torchmemguard.oom_safe(batch_args=("ids", "mask"), whole_args="mask")(masked)


def test_every_bad_argument_name_is_reported_at_once() -> None:
    with pytest.raises(TypeError, match=r"(?=.*batch_args names 'x')(?=.*whole_args names 'y')"):
        torchmemguard.oom_safe(batch_args=("x",), whole_args=("y",))(masked)


# ---------------------------------------------------------------------------
# The quick check of a call that fits


def test_second_identical_call_with_a_broadcast_first_batch_argument_raises_no_oom() -> None:
    calls: list[int] = []

    @torchmemguard.oom_safe(batch_args=("position_ids", "input_ids"))
    def fn(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        calls.append(input_ids.shape[0])
        oom_above(2, input_ids.shape[0])
        return input_ids + position_ids

    position_ids = torch.arange(3.0).unsqueeze(0)
    fn(IDS, position_ids)
    calls.clear()
    out = fn(IDS, position_ids)
    assert calls == [2, 2]
    assert torch.equal(out, IDS + position_ids)


def test_a_sparse_batch_that_must_be_split_gives_the_whole_batch_answer() -> None:
    @torchmemguard.oom_safe
    def fn(x: torch.Tensor) -> torch.Tensor:
        oom_above(2, x.shape[0])
        return x.to_dense() * 2

    assert torch.equal(fn(IDS.to_sparse()), IDS * 2)


def test_a_sparse_csr_batch_that_must_be_split_is_refused_naming_the_argument() -> None:
    @torchmemguard.oom_safe
    def fn(features: torch.Tensor) -> torch.Tensor:
        oom_above(2, features.shape[0])
        return features.to_dense()

    with pytest.raises(BatchError, match=r"features is a torch\.sparse_csr tensor"):
        fn(IDS.to_sparse_csr())
