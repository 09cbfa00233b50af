"""Tests for torchmemguard._arguments: which arguments of a call hold the batch."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import pytest

from torchmemguard._arguments import BatchPlan


def encode(input_ids: Any, attention_mask: Any = None, *, scale: float = 1.0) -> None:
    """A function whose batch is its first argument."""


def with_catch_alls(images: Any, *extra: Any, labels: Any = None, **options: Any) -> None:
    """A function with both catch-all parameters."""


def keyword_only(*, pixel_values: Any, labels: Any = None) -> None:
    """A function that takes no positional argument."""


def only_var_args(*samples: Any) -> None:
    """A function whose batch can only be passed positionally, through ``*samples``."""


def positional_only(x: Any, /, **options: Any) -> None:
    """A function whose batch cannot be passed by keyword: ``x=`` lands in ``options``."""


class Model:
    def forward(self, input_ids: Any, attention_mask: Any = None) -> None:
        """A method, as a plain function in the class body."""

    @classmethod
    def from_batch(cls, batch: Any, size: int = 0) -> None:
        """A classmethod."""

    @staticmethod
    def tokenize(texts: Any, max_length: int = 0) -> None:
        """A staticmethod."""


class Scorer:
    def __call__(self, pairs: Any, normalize: bool = True) -> None:
        """A callable object: its signature does not include ``self``."""


def slot_places(plan: BatchPlan, skip: int = 0) -> list[tuple[str, int | None, str | None]]:
    return [(slot.label, slot.position, slot.keyword) for slot in plan.slots(skip)]


# ---------------------------------------------------------------------------
# The default batch argument
# ---------------------------------------------------------------------------


def test_default_batch_argument_is_first_positional_parameter() -> None:
    assert slot_places(BatchPlan(encode, None)) == [("input_ids", 0, "input_ids")]


def test_plain_function_has_self_offset_one() -> None:
    assert BatchPlan(Model.forward, None).self_offset == 1


def test_default_batch_argument_of_a_method_skips_self() -> None:
    assert slot_places(BatchPlan(Model.forward, None), skip=1) == [("input_ids", 0, "input_ids")]


def test_callable_object_has_self_offset_zero() -> None:
    assert BatchPlan(Scorer(), None).self_offset == 0


def test_default_batch_argument_of_callable_object_is_first_after_self() -> None:
    assert slot_places(BatchPlan(Scorer(), None)) == [("pairs", 0, "pairs")]


def test_partial_has_self_offset_zero() -> None:
    assert BatchPlan(functools.partial(encode, scale=2.0), None).self_offset == 0


def test_default_batch_argument_of_only_var_args_is_first_positional_value() -> None:
    assert slot_places(BatchPlan(only_var_args, None)) == [("args[0]", 0, None)]


def test_classmethod_object_skips_cls_when_bound() -> None:
    method = Model.__dict__["from_batch"]
    assert slot_places(BatchPlan(method, None), skip=1) == [("batch", 0, "batch")]


def test_staticmethod_object_batch_argument_is_its_first_parameter() -> None:
    method = Model.__dict__["tokenize"]
    assert slot_places(BatchPlan(method, None)) == [("texts", 0, "texts")]


def test_bound_method_has_self_offset_zero() -> None:
    assert BatchPlan(Model().forward, None).self_offset == 0


def test_default_batch_argument_of_bound_method_is_first_after_self() -> None:
    assert slot_places(BatchPlan(Model().forward, None)) == [("input_ids", 0, "input_ids")]


def test_named_batch_argument_of_bound_method_has_position_after_self() -> None:
    plan = BatchPlan(Model().forward, ("input_ids",))
    assert slot_places(plan) == [("input_ids", 0, "input_ids")]


# ---------------------------------------------------------------------------
# Named batch arguments
# ---------------------------------------------------------------------------


def test_named_batch_arguments_resolve_to_positions_and_keywords() -> None:
    plan = BatchPlan(encode, ("attention_mask", "input_ids"))
    assert slot_places(plan) == [
        ("attention_mask", 1, "attention_mask"),
        ("input_ids", 0, "input_ids"),
    ]


def test_named_batch_argument_of_a_method_has_position_after_self() -> None:
    plan = BatchPlan(Model.forward, ("attention_mask",))
    assert slot_places(plan, skip=1) == [("attention_mask", 1, "attention_mask")]


def test_named_keyword_only_argument_has_no_position() -> None:
    plan = BatchPlan(keyword_only, ("pixel_values",))
    assert slot_places(plan) == [("pixel_values", None, "pixel_values")]


def test_name_caught_by_var_keyword_is_accepted_as_keyword() -> None:
    plan = BatchPlan(with_catch_alls, ("pixel_values",))
    assert slot_places(plan) == [("pixel_values", None, "pixel_values")]


def test_slots_are_worked_out_for_each_skip_separately() -> None:
    plan = BatchPlan(Model.forward, ("input_ids",))
    plan.slots(1)
    assert slot_places(plan, skip=0) == [("input_ids", 1, "input_ids")]


# ---------------------------------------------------------------------------
# get
# ---------------------------------------------------------------------------


def test_get_finds_a_value_passed_positionally() -> None:
    (slot,) = BatchPlan(encode, ("attention_mask",)).slots(0)
    assert BatchPlan.get(slot, ("ids", "mask"), {}) == (True, "mask")


def test_get_finds_a_value_passed_by_keyword() -> None:
    (slot,) = BatchPlan(encode, ("attention_mask",)).slots(0)
    assert BatchPlan.get(slot, ("ids",), {"attention_mask": "mask"}) == (True, "mask")


def test_get_reports_an_argument_that_was_not_passed() -> None:
    (slot,) = BatchPlan(encode, ("attention_mask",)).slots(0)
    assert BatchPlan.get(slot, ("ids",), {"scale": 2.0}) == (False, None)


def test_get_finds_keyword_only_value() -> None:
    (slot,) = BatchPlan(keyword_only, ("pixel_values",)).slots(0)
    assert BatchPlan.get(slot, (), {"pixel_values": "pixels"}) == (True, "pixels")


def test_get_finds_first_var_args_value() -> None:
    (slot,) = BatchPlan(only_var_args, None).slots(0)
    assert BatchPlan.get(slot, ("a", "b"), {}) == (True, "a")


def test_get_ignores_a_keyword_named_like_a_positional_only_parameter() -> None:
    (slot,) = BatchPlan(positional_only, None).slots(0)
    assert BatchPlan.get(slot, ("batch",), {"x": "option"}) == (True, "batch")


# ---------------------------------------------------------------------------
# replace
# ---------------------------------------------------------------------------


def replaced(
    batch_args: tuple[str, ...], values: list[Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return BatchPlan(encode, batch_args).bind(0, args, kwargs).replace(values, args, kwargs)


def test_replace_puts_a_positional_value_back_in_its_position() -> None:
    found = replaced(("attention_mask",), ["chunk"], ("ids", "mask"), {"scale": 2.0})
    assert found == (("ids", "chunk"), {"scale": 2.0})


def test_replace_puts_a_keyword_value_back_under_its_keyword() -> None:
    found = replaced(("attention_mask",), ["chunk"], ("ids",), {"attention_mask": "m"})
    assert found == (("ids",), {"attention_mask": "chunk"})


def test_replace_sets_several_batch_arguments_each_in_its_place() -> None:
    found = replaced(
        ("input_ids", "attention_mask"),
        ["ids-chunk", "mask-chunk"],
        ("ids",),
        {"attention_mask": "m"},
    )
    assert found == (("ids-chunk",), {"attention_mask": "mask-chunk"})


def test_bind_leaves_out_a_named_argument_that_was_not_passed() -> None:
    bound = BatchPlan(encode, ("input_ids", "attention_mask")).bind(0, ("ids",), {})
    assert bound.labels == ["input_ids"]


def test_replace_leaves_the_callers_arguments_unchanged() -> None:
    args = ("ids",)
    kwargs = {"attention_mask": "mask"}
    replaced(("input_ids", "attention_mask"), ["ids-chunk", "mask-chunk"], args, kwargs)
    assert (args, kwargs) == (("ids",), {"attention_mask": "mask"})


def test_default_bind_puts_the_first_positional_argument_first() -> None:
    bound = BatchPlan(encode, None).bind(0, (), {"scale": 2.0, "input_ids": "ids"})
    assert bound.labels == ["input_ids", "scale"]


def test_default_bind_leaves_out_whole_args() -> None:
    bound = BatchPlan(encode, None, whole_args=("attention_mask",)).bind(0, ("i", "m"), {})
    assert bound.labels == ["input_ids"]


def test_named_bind_lists_the_other_arguments_not_declared_whole() -> None:
    plan = BatchPlan(encode, ("input_ids",), whole_args=("scale",))
    bound = plan.bind(0, ("ids", "mask"), {"scale": 2.0})
    assert bound.others == [("attention_mask", "mask")]


# ---------------------------------------------------------------------------
# Bad options
# ---------------------------------------------------------------------------


def test_unknown_batch_argument_raises_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="'pixel_values'"):
        BatchPlan(encode, ("pixel_values",))


def test_unknown_batch_argument_error_lists_the_known_arguments() -> None:
    with pytest.raises(TypeError, match=r"\['input_ids', 'attention_mask', 'scale'\]"):
        BatchPlan(encode, ("pixel_values",))


def test_naming_var_positional_raises_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="'extra'"):
        BatchPlan(with_catch_alls, ("extra",))


def test_naming_var_keyword_raises_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="'options'"):
        BatchPlan(with_catch_alls, ("options",))


def test_empty_batch_args_raises_value_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        BatchPlan(encode, ())


def test_duplicate_batch_args_raise_value_error_naming_them() -> None:
    with pytest.raises(ValueError, match="'input_ids', 'input_ids'"):
        BatchPlan(encode, ("input_ids", "input_ids"))


def test_default_plan_of_keyword_only_function_binds_every_keyword_argument() -> None:
    bound = BatchPlan(keyword_only, None).bind(0, (), {"labels": "l", "pixel_values": "p"})
    assert (bound.labels, bound.values) == (["labels", "pixel_values"], ["l", "p"])


def test_callable_without_readable_signature_raises_type_error() -> None:
    # Some builtins expose no signature at all; which ones depends on the Python version.
    unreadable = [fn for fn in (getattr, iter, next, min, max, vars) if not _has_signature(fn)]
    if not unreadable:
        pytest.skip("every candidate builtin has a signature on this Python")
    with pytest.raises(TypeError, match="signature"):
        BatchPlan(unreadable[0], None)


def _has_signature(fn: Any) -> bool:
    try:
        inspect.signature(fn)
    except ValueError:
        return False
    return True
