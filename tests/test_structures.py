"""Tests for torchmemguard._structures: splitting batches along dimension 0 and merging back."""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchmemguard import BatchError, MergeError
from torchmemguard._merging import Merger
from torchmemguard._structures import BatchInfo, batch_size_of, describe, split

merge = Merger().merge


class Pair(NamedTuple):
    first: Any
    second: Any


@dataclasses.dataclass
class Box:
    first: Any
    second: Any = None


class Record(collections.OrderedDict):  # type: ignore[type-arg]
    """A dict subclass, as model outputs and feature dicts often are."""


class Features(Mapping[str, Any]):
    """A read-only Mapping that is not a dict, rebuilt from a dict."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


class Opaque:
    """A value of a type torchmemguard knows nothing about."""


SETTINGS = settings(max_examples=200, deadline=None)


def rows(n: int, width: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` distinct rows, so that a misplaced row cannot go unnoticed."""
    return torch.arange(n * width, dtype=dtype).reshape(n, width)


def chunks_of(value: Any, n: int, sizes: list[int]) -> list[Any]:
    chunks = []
    start = 0
    for size in sizes:
        chunks.append(split(value, n, start, start + size))
        start += size
    return chunks


def assert_same_batch(actual: Any, expected: Any, n: int) -> None:
    """``actual`` equals ``expected``, a structure holding a batch of ``n`` samples.

    Split tensors and sample lists come back equal; everything that went whole to
    every chunk comes back as the very same object.
    """
    assert type(actual) is type(expected)
    if isinstance(expected, torch.Tensor):
        if expected.dim() > 0 and expected.shape[0] == n:
            assert actual.dtype == expected.dtype
            assert torch.equal(actual, expected)
        else:
            assert actual is expected
    elif isinstance(expected, list):
        if len(expected) == n:
            assert actual == expected
        else:
            assert actual is expected
    elif dataclasses.is_dataclass(expected):
        for field in dataclasses.fields(expected):
            assert_same_batch(getattr(actual, field.name), getattr(expected, field.name), n)
    elif isinstance(expected, Mapping):
        assert list(actual.keys()) == list(expected.keys())
        for key in expected:
            assert_same_batch(actual[key], expected[key], n)
    elif isinstance(expected, tuple):
        assert len(actual) == len(expected)
        for got, want in zip(actual, expected, strict=True):
            assert_same_batch(got, want, n)
    else:
        assert actual is expected


def import_transformers() -> Any:
    return pytest.importorskip("transformers")


# ---------------------------------------------------------------------------
# batch_size_of
# ---------------------------------------------------------------------------


def test_batch_size_of_tensor_is_its_leading_size() -> None:
    assert batch_size_of(rows(5)) == 5


def test_batch_size_of_list_is_its_length() -> None:
    assert batch_size_of(["a cat", "a dog", "a bird"]) == 3


def test_batch_size_is_leading_size_of_first_tensor_found() -> None:
    batch = {"input_ids": rows(4), "position_ids": torch.arange(3).unsqueeze(0)}
    assert batch_size_of(batch) == 4


def test_batch_size_follows_dataclass_field_order() -> None:
    assert batch_size_of(Box(first=None, second=rows(2))) == 2


def test_batch_size_skips_zero_dim_tensors() -> None:
    assert batch_size_of((torch.tensor(0.7), rows(6))) == 6


def test_batch_size_skips_non_tensor_leaves() -> None:
    assert batch_size_of({"temperature": 0.7, "mode": "greedy", "prompts": ["a", "b"]}) == 2


def test_batch_size_of_structure_without_tensor_or_list_is_none() -> None:
    assert batch_size_of({"a": None, "b": 3, "c": torch.tensor(1.0)}) is None


# ---------------------------------------------------------------------------
# split: leaves
# ---------------------------------------------------------------------------


def test_split_slices_tensor_with_batch_leading_size() -> None:
    assert torch.equal(split(rows(5), 5, 1, 3), rows(5)[1:3])


def test_split_passes_tensor_with_other_leading_size_whole() -> None:
    position_ids = torch.arange(7).unsqueeze(0)
    assert split(position_ids, 4, 0, 2) is position_ids


def test_split_passes_zero_dim_tensor_whole() -> None:
    scale = torch.tensor(0.5)
    assert split(scale, 4, 0, 2) is scale


def test_split_slices_list_of_samples() -> None:
    assert split(["a", "b", "c", "d"], 4, 1, 3) == ["b", "c"]


def test_split_passes_list_of_other_length_whole() -> None:
    stop_words = ["</s>", "<eos>"]
    assert split(stop_words, 4, 0, 2) is stop_words


@pytest.mark.parametrize("leaf", [7, 0.5, "greedy", Opaque()], ids=["int", "float", "str", "obj"])
def test_split_passes_non_tensor_leaf_whole(leaf: object) -> None:
    assert split(leaf, 4, 0, 2) is leaf


def test_split_hook_cuts_a_leaf_of_a_custom_type() -> None:
    class Samples:
        def __init__(self, items: list[int]) -> None:
            self.items = items

    def hook(value: Any, start: int, stop: int) -> Any:
        return Samples(value.items[start:stop]) if isinstance(value, Samples) else value

    chunk = split({"x": rows(4), "s": Samples([10, 11, 12, 13])}, 4, 1, 3, hook)
    assert chunk["s"].items == [11, 12]


def test_split_hook_is_asked_first_about_every_value_with_the_bounds() -> None:
    calls: list[tuple[Any, int, int]] = []

    def hook(value: Any, start: int, stop: int) -> Any:
        calls.append((type(value).__name__, start, stop))
        return value

    split((rows(4), "greedy"), 4, 2, 4, hook)
    assert calls == [("tuple", 2, 4), ("Tensor", 2, 4), ("str", 2, 4)]


def test_split_hook_is_not_called_for_none() -> None:
    calls: list[Any] = []

    def hook(value: Any, start: int, stop: int) -> Any:
        calls.append(value)
        return value

    split({"x": rows(4), "mask": None}, 4, 0, 2, hook)
    assert None not in calls


def test_split_hook_cuts_a_structure_before_it_is_traversed() -> None:
    def hook(value: Any, start: int, stop: int) -> Any:
        if isinstance(value, collections.defaultdict):
            return collections.defaultdict(list, {k: v[start:stop] for k, v in value.items()})
        return value

    batch = collections.defaultdict(list, {"x": rows(4)})
    chunk = split(batch, 4, 1, 3, hook)
    assert isinstance(chunk, collections.defaultdict)
    assert torch.equal(chunk["x"], rows(4)[1:3])


def test_batch_size_of_a_sized_user_type_needs_a_split_hook() -> None:
    class Samples:
        def __len__(self) -> int:
            return 5

    assert batch_size_of(Samples()) is None
    assert batch_size_of(Samples(), hook=lambda value, start, stop: value) == 5


def test_broadcast_leading_size_one_does_not_set_the_batch_size() -> None:
    assert batch_size_of({"position_ids": rows(1), "input_ids": rows(8)}) == 8


# ---------------------------------------------------------------------------
# split: structures
# ---------------------------------------------------------------------------


def test_split_rebuilds_dict_with_same_keys() -> None:
    chunk = split({"input_ids": rows(4), "attention_mask": rows(4)}, 4, 0, 2)
    assert list(chunk) == ["input_ids", "attention_mask"]


def test_split_slices_every_batch_tensor_in_a_dict() -> None:
    chunk = split({"input_ids": rows(4), "attention_mask": rows(4) + 100}, 4, 1, 3)
    assert torch.equal(chunk["attention_mask"], rows(4)[1:3] + 100)


def test_split_passes_broadcast_position_ids_whole_inside_a_dict() -> None:
    position_ids = torch.arange(3).unsqueeze(0)
    chunk = split({"input_ids": rows(4), "position_ids": position_ids}, 4, 0, 2)
    assert chunk["position_ids"] is position_ids


@pytest.mark.parametrize(
    "value",
    [
        (rows(4), rows(4)),
        Pair(rows(4), ["a", "b", "c", "d"]),
        Box(rows(4), None),
        Record(x=rows(4)),
        Features({"x": rows(4)}),
        collections.OrderedDict(x=rows(4)),
    ],
    ids=["tuple", "namedtuple", "dataclass", "dict-subclass", "mapping", "ordereddict"],
)
def test_split_rebuilds_structure_as_same_type(value: Any) -> None:
    assert type(split(value, 4, 0, 2)) is type(value)


def test_split_treats_tuple_as_structure_not_samples() -> None:
    # A tuple as long as the batch is still traversed, not cut.
    chunk = split((rows(3), rows(3), rows(3)), 3, 0, 1)
    assert [tuple(part.shape) for part in chunk] == [(1, 3), (1, 3), (1, 3)]


def test_split_treats_list_as_samples_not_structure() -> None:
    images = [rows(2), rows(2), rows(2)]
    chunk = split(images, 3, 1, 3)
    assert chunk[0] is images[1]


def test_split_reaches_tensors_nested_in_structures() -> None:
    value = {"encoder": Pair(Box(rows(4), None), "tag")}
    chunk = split(value, 4, 2, 4)
    assert torch.equal(chunk["encoder"].first.first, rows(4)[2:4])


class Registry(dict[str, Any]):
    """A Mapping that cannot be built from a dict alone."""

    def __init__(self, data: dict[str, Any], owner: str) -> None:
        super().__init__(data)
        self.owner = owner


def test_split_of_unrebuildable_mapping_raises_type_error_suggesting_hooks() -> None:
    value = Registry({"x": rows(4)}, owner="me")
    with pytest.raises(TypeError, match="split= and merge="):
        split(value, 4, 0, 2)


def test_split_rebuilds_a_defaultdict_with_its_default_factory() -> None:
    value = collections.defaultdict(list, x=rows(4))
    chunk = split(value, 4, 0, 2)
    assert type(chunk) is collections.defaultdict
    assert chunk.default_factory is list
    assert torch.equal(chunk["x"], rows(2))


# ---------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------


def test_merge_concatenates_tensors_along_dim_zero() -> None:
    assert torch.equal(merge([rows(4)[:1], rows(4)[1:]], [1, 3]), rows(4))


def test_merge_concatenates_lists_of_samples() -> None:
    assert merge([["a", "b"], ["c"]], [2, 1]) == ["a", "b", "c"]


def test_merge_keeps_none_as_none() -> None:
    assert merge([(rows(2), None), (rows(2), None)], [2, 2])[1] is None


def test_merge_keeps_object_identical_in_every_chunk() -> None:
    vocab = {"<pad>": 0}
    assert merge([(rows(2), vocab), (rows(2), vocab)], [2, 2])[1] is vocab


def test_merge_of_single_chunk_returns_it_unchanged() -> None:
    output = (rows(4), torch.tensor(1.5))
    assert merge([output], [4]) is output


@pytest.mark.parametrize(
    ("outputs", "kind"),
    [
        ([Pair(rows(2), rows(2)), Pair(rows(1), rows(1))], Pair),
        ([Box(rows(2), None), Box(rows(1), None)], Box),
        ([Record(x=rows(2)), Record(x=rows(1))], Record),
        ([Features({"x": rows(2)}), Features({"x": rows(1)})], Features),
        ([(rows(2),), (rows(1),)], tuple),
        ([{"x": rows(2)}, {"x": rows(1)}], dict),
    ],
    ids=["namedtuple", "dataclass", "dict-subclass", "mapping", "tuple", "dict"],
)
def test_merge_rebuilds_structure_as_same_type(outputs: list[Any], kind: type) -> None:
    assert type(merge(outputs, [2, 1])) is kind


def test_merge_keeps_the_order_of_mapping_keys() -> None:
    outputs = [{"logits": rows(1), "hidden": rows(1)}, {"logits": rows(2), "hidden": rows(2)}]
    assert list(merge(outputs, [1, 2])) == ["logits", "hidden"]


def test_merge_concatenates_tensors_nested_in_structures() -> None:
    outputs = [{"out": Pair(rows(4)[:3], None)}, {"out": Pair(rows(4)[3:], None)}]
    assert torch.equal(merge(outputs, [3, 1])["out"].first, rows(4))


def test_merge_error_is_a_value_error() -> None:
    assert issubclass(MergeError, ValueError)


def test_merge_of_scalar_loss_raises_merge_error_naming_its_index() -> None:
    outputs = [(rows(2), torch.tensor(0.3)), (rows(2), torch.tensor(0.4))]
    with pytest.raises(MergeError, match=r"output\[1\]"):
        merge(outputs, [2, 2])


def test_merge_of_scalar_loss_raises_merge_error_naming_its_key() -> None:
    outputs = [
        {"logits": rows(2), "loss": torch.tensor(0.3)},
        {"logits": rows(2), "loss": torch.tensor(0.4)},
    ]
    with pytest.raises(MergeError, match=r"output\['loss'\]"):
        merge(outputs, [2, 2])


def test_merge_of_dataclass_field_raises_merge_error_naming_the_field() -> None:
    outputs = [Box(rows(2), torch.tensor(0.3)), Box(rows(2), torch.tensor(0.4))]
    with pytest.raises(MergeError, match=r"output\.second"):
        merge(outputs, [2, 2])


@pytest.mark.parametrize(
    "outputs",
    [
        [torch.tensor(0.3), torch.tensor(0.4)],
        [torch.zeros(1), torch.zeros(1)],
        [torch.zeros(3), torch.zeros(3)],
        [rows(2), rows(1)],
        [["a"], ["b", "c"]],
        [3, 5],
        [rows(2), None],
        [None, rows(2)],
        [rows(2), ["a", "b"]],
        [Opaque(), Opaque()],
    ],
    ids=[
        "scalar",
        "one-row-per-chunk",
        "too-many-rows",
        "rows-swapped",
        "list-length",
        "int",
        "tensor-then-none",
        "none-then-tensor",
        "tensor-then-list",
        "opaque",
    ],
)
def test_unmergeable_outputs_raise_merge_error_suggesting_merge_hook(outputs: list[Any]) -> None:
    with pytest.raises(MergeError, match="merge="):
        merge(outputs, [2, 2])


def test_merge_rejects_equal_but_distinct_tensors_with_other_leading_size() -> None:
    # A fresh (1, L) tensor from each chunk is not known to stand for the whole batch.
    outputs = [torch.arange(5).unsqueeze(0), torch.arange(5).unsqueeze(0)]
    with pytest.raises(MergeError, match="merge="):
        merge(outputs, [2, 2])


def test_merge_of_per_chunk_counts_raises_merge_error_when_chunks_are_equal() -> None:
    outputs = [(rows(2), part.shape[0]) for part in (rows(4)[:2], rows(4)[2:])]
    with pytest.raises(MergeError, match=r"output\[1\]"):
        merge(outputs, [2, 2])


@pytest.mark.parametrize(
    "outputs",
    [
        [{"logits": rows(2)}, {"scores": rows(2)}],
        [{"logits": rows(2), "hidden": rows(2)}, {"hidden": rows(2), "logits": rows(2)}],
        [(rows(2),), (rows(2), rows(2))],
    ],
    ids=["different-keys", "different-key-order", "different-lengths"],
)
def test_merge_of_mismatched_structures_raises_merge_error(outputs: list[Any]) -> None:
    with pytest.raises(MergeError, match=r"^output"):
        merge(outputs, [2, 2])


@pytest.mark.parametrize(
    "outputs",
    [
        [{"logits": rows(2)}, {"scores": rows(2)}],
        [(rows(2),), (rows(2), rows(2))],
    ],
    ids=["different-keys", "different-lengths"],
)
def test_merge_error_for_mismatched_structures_suggests_merge_hook(outputs: list[Any]) -> None:
    with pytest.raises(MergeError, match="merge="):
        merge(outputs, [2, 2])


def test_merge_of_different_structure_types_raises_merge_error() -> None:
    with pytest.raises(MergeError, match="merge="):
        merge([Pair(rows(2), None), (rows(2), None)], [2, 2])


# ---------------------------------------------------------------------------
# describe
# ---------------------------------------------------------------------------


def described(value: Any, n: int) -> BatchInfo:
    info = BatchInfo()
    describe(value, n, info)
    return info


def test_describe_records_shapes_of_split_tensors_without_batch_dim() -> None:
    info = described({"x": torch.zeros(4, 3, 2), "mask": torch.zeros(4, 3)}, 4)
    assert info.shapes == [(3, 2), (3,)]


def test_describe_ignores_tensors_with_other_leading_size() -> None:
    info = described({"position_ids": torch.zeros(1, 3), "x": torch.zeros(4, 3)}, 4)
    assert info.shapes == [(3,)]


def test_describe_ignores_zero_dim_tensors() -> None:
    info = described((torch.tensor(2.0), torch.zeros(4, 3)), 4)
    assert info.shapes == [(3,)]


def test_describe_ignores_lists_of_samples() -> None:
    info = described({"images": [torch.zeros(3, 8, 8)] * 4}, 4)
    assert info == BatchInfo()


def test_describe_sums_bytes_per_sample_of_split_tensors() -> None:
    value = {
        "x": torch.zeros(4, 3, dtype=torch.float32),  # 12 bytes a sample
        "ids": torch.zeros(4, 2, dtype=torch.int64),  # 16 bytes a sample
        "position_ids": torch.zeros(1, 50, dtype=torch.int64),  # not split
    }
    assert described(value, 4).bytes_per_sample == 28


def test_describe_takes_dtype_of_first_split_tensor() -> None:
    value = {"position_ids": torch.zeros(1, 3, dtype=torch.int64), "x": torch.zeros(4, 3).half()}
    assert described(value, 4).dtype == torch.float16


def test_describe_takes_device_of_first_split_tensor() -> None:
    value = (torch.zeros(2, 3, device="meta"), torch.zeros(4, 3))
    assert described(value, 4).device == torch.device("cpu")


def test_describe_reaches_tensors_nested_in_structures() -> None:
    info = described({"encoder": Pair(Box(torch.zeros(4, 5), None), "tag")}, 4)
    assert info.shapes == [(5,)]


def test_describe_leaves_info_empty_without_split_tensors() -> None:
    info = described({"scale": torch.tensor(1.0), "position_ids": torch.zeros(1, 3)}, 4)
    assert info == BatchInfo()


# ---------------------------------------------------------------------------
# Real transformers types
# ---------------------------------------------------------------------------


def batch_encoding(n: int = 4) -> Any:
    transformers = import_transformers()
    return transformers.BatchEncoding(
        {
            "input_ids": rows(n, dtype=torch.int64),
            "attention_mask": torch.ones(n, 3, dtype=torch.int64),
        },
        tensor_type="pt",
    )


def model_output(n: int) -> Any:
    import_transformers()
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(
        last_hidden_state=torch.arange(n * 6.0).reshape(n, 3, 2), pooler_output=rows(n, 2)
    )


def test_split_batch_encoding_gives_a_batch_encoding() -> None:
    encoding = batch_encoding()
    assert type(split(encoding, 4, 0, 2)) is type(encoding)


def test_split_batch_encoding_slices_each_field() -> None:
    chunk = split(batch_encoding(), 4, 1, 3)
    assert torch.equal(chunk.input_ids, rows(4, dtype=torch.int64)[1:3])


def test_merge_batch_encodings_round_trips() -> None:
    encoding = batch_encoding()
    merged = merge(chunks_of(encoding, 4, [3, 1]), [3, 1])
    assert_same_batch(merged, encoding, 4)


def test_merge_model_outputs_gives_the_same_class() -> None:
    merged = merge([model_output(2), model_output(3)], [2, 3])
    assert type(merged) is type(model_output(1))


def test_merge_model_outputs_keeps_none_fields_none() -> None:
    merged = merge([model_output(2), model_output(3)], [2, 3])
    assert (merged.hidden_states, merged.attentions) == (None, None)


def test_merge_model_outputs_concatenates_fields() -> None:
    merged = merge([model_output(2), model_output(3)], [2, 3])
    expected = torch.cat([model_output(2).pooler_output, model_output(3).pooler_output])
    assert torch.equal(merged.pooler_output, expected)


def test_merged_model_output_is_indexable_like_the_original() -> None:
    merged = merge([model_output(2), model_output(3)], [2, 3])
    assert list(merged.keys()) == ["last_hidden_state", "pooler_output"]


def test_merged_model_output_is_indexable_by_position() -> None:
    merged = merge([model_output(2), model_output(3)], [2, 3])
    assert merged[1] is merged.pooler_output


def test_split_model_output_round_trips() -> None:
    output = model_output(5)
    assert_same_batch(merge(chunks_of(output, 5, [2, 2, 1]), [2, 2, 1]), output, 5)


def test_merge_model_outputs_with_scalar_loss_names_the_field() -> None:
    import_transformers()
    from transformers.modeling_outputs import CausalLMOutput

    outputs = [CausalLMOutput(loss=torch.tensor(0.5), logits=rows(2)) for _ in range(2)]
    with pytest.raises(MergeError, match=r"output\.loss"):
        merge(outputs, [2, 2])


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

TAIL_SHAPES = st.lists(st.integers(0, 3), max_size=2).map(tuple)
DTYPES = st.sampled_from([torch.float32, torch.int64, torch.bool])


def tensors(leading: int, tail: tuple[int, ...], dtype: torch.dtype, start: int) -> torch.Tensor:
    numel = leading
    for size in tail:
        numel *= size
    values = torch.arange(start, start + numel)
    return (values % 2 == 0 if dtype is torch.bool else values.to(dtype)).reshape(leading, *tail)


def batch_leaves(n: int) -> st.SearchStrategy[Any]:
    """Leaves that are split: tensors with ``n`` rows and lists of ``n`` samples."""
    return st.one_of(
        st.builds(tensors, st.just(n), TAIL_SHAPES, DTYPES, st.integers(-50, 50)),
        st.lists(st.text(max_size=3) | st.integers(), min_size=n, max_size=n),
    )


def whole_leaves(n: int) -> st.SearchStrategy[Any]:
    """Leaves that go whole to every chunk."""
    other_size = st.integers(0, 7).filter(lambda size: size != n)
    # No numbers or strings: an equal one from every chunk cannot be told from a
    # per-chunk value, so merge refuses them (see the int cases above).
    return st.one_of(
        st.none(),
        st.builds(Opaque),
        st.builds(torch.tensor, st.integers(-5, 5)),
        st.builds(tensors, other_size, TAIL_SHAPES, DTYPES, st.integers(-50, 50)),
        st.lists(st.integers(), max_size=7).filter(lambda items: len(items) != n),
    )


def nested(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        keys = st.text("abcdefgh", min_size=1, max_size=3)
        return st.one_of(
            st.dictionaries(keys, children, max_size=3),
            st.dictionaries(keys, children, max_size=3).map(Record),
            st.dictionaries(keys, children, max_size=3).map(Features),
            st.lists(children, max_size=3).map(tuple),
            st.builds(Pair, children, children),
            st.builds(Box, children, children),
        )

    return st.recursive(leaves, containers, max_leaves=8)


@st.composite
def chunk_sizes(draw: st.DrawFn, n: int) -> list[int]:
    cuts = sorted(draw(st.sets(st.integers(1, n - 1)))) if n > 1 else []
    bounds = [0, *cuts, n]
    return [stop - start for start, stop in itertools.pairwise(bounds)]


@functools.cache
def mixed_structures(n: int) -> st.SearchStrategy[Any]:
    """Structures that mix leaves that are split with leaves that go whole."""
    return nested(st.one_of(batch_leaves(n), whole_leaves(n)))


@functools.cache
def uniform_structures(n: int) -> st.SearchStrategy[Any]:
    """Structures whose every tensor with a leading size, and every list, has ``n`` rows."""
    others = st.one_of(st.none(), st.builds(Opaque), st.builds(torch.tensor, st.integers(-5, 5)))
    # The last item guarantees at least one leaf to split.
    return st.builds(Pair, nested(st.one_of(batch_leaves(n), others)), batch_leaves(n))


@st.composite
def split_batches(draw: st.DrawFn) -> tuple[Any, int, list[int]]:
    n = draw(st.integers(1, 6))
    return draw(mixed_structures(n)), n, draw(chunk_sizes(n))


@given(split_batches())
@SETTINGS
def test_merge_of_split_chunks_round_trips(case: tuple[Any, int, list[int]]) -> None:
    value, n, sizes = case
    assert_same_batch(merge(chunks_of(value, n, sizes), sizes), value, n)


@st.composite
def uniform_batches(draw: st.DrawFn) -> tuple[Any, int, list[int]]:
    n = draw(st.integers(1, 6))
    return draw(uniform_structures(n)), n, draw(chunk_sizes(n))


@given(uniform_batches())
@SETTINGS
def test_every_chunk_has_the_batch_size_of_its_bounds(case: tuple[Any, int, list[int]]) -> None:
    value, n, sizes = case
    assert [batch_size_of(chunk) for chunk in chunks_of(value, n, sizes)] == sizes


CONSTANT = Opaque()


def per_sample_output(template: Any, batch: dict[str, Any]) -> Any:
    """What a per-sample function returns for ``batch``, in the shape of ``template``."""
    x: torch.Tensor = batch["x"]
    if isinstance(template, str):
        return {
            "rows": lambda: x * 3 + batch["bias"],
            "row-sums": lambda: x.sum(dim=1),
            "labels": lambda: [f"sample-{int(v)}" for v in x[:, 0].tolist()],
            "ids": lambda: batch["ids"],
            "none": lambda: None,
            "constant": lambda: CONSTANT,
            "bias": lambda: batch["bias"],
        }[template]()
    kind, children = template
    items = [per_sample_output(child, batch) for child in children]
    if kind == "dict":
        return {f"k{i}": item for i, item in enumerate(items)}
    if kind == "record":
        return Record((f"k{i}", item) for i, item in enumerate(items))
    if kind == "tuple":
        return tuple(items)
    if kind == "pair":
        return Pair(*items)
    return Box(*items)


OUTPUT_TEMPLATES = st.recursive(
    st.sampled_from(["rows", "row-sums", "labels", "ids", "none", "constant", "bias"]),
    lambda children: st.one_of(
        st.tuples(st.sampled_from(["dict", "record", "tuple"]), st.lists(children, max_size=3)),
        st.tuples(st.sampled_from(["pair", "box"]), st.lists(children, min_size=2, max_size=2)),
    ),
    max_leaves=6,
)


@st.composite
def per_sample_calls(draw: st.DrawFn) -> tuple[Any, dict[str, Any], int, list[int]]:
    n = draw(st.integers(1, 8))
    width = draw(st.integers(1, 4))
    batch = {
        "x": tensors(n, (width,), torch.int64, draw(st.integers(-20, 20))),
        "ids": [f"id-{i}" for i in range(n)],
        # Broadcast over the batch: the same object goes to every chunk.
        "bias": torch.arange(width).unsqueeze(0),
    }
    return draw(OUTPUT_TEMPLATES), batch, n, draw(chunk_sizes(n))


@given(per_sample_calls())
@SETTINGS
def test_chunkwise_per_sample_function_merges_to_whole_batch_result(
    case: tuple[Any, dict[str, Any], int, list[int]],
) -> None:
    template, batch, n, sizes = case
    outputs = [per_sample_output(template, chunk) for chunk in chunks_of(batch, n, sizes)]
    assert_same_batch(merge(outputs, sizes), per_sample_output(template, batch), n)


def test_batch_info_takes_device_and_dtype_from_the_first_split_tensor() -> None:
    info = BatchInfo()
    describe((torch.ones(4, dtype=torch.int64), torch.ones(4, 2)), 4, info)
    assert info.dtype == torch.int64


def test_strings_are_not_batches_even_with_a_split_hook() -> None:
    value = {"name": "ab", "x": torch.ones(4)}
    assert batch_size_of(value, lambda v, a, b: v) == 4


@dataclasses.dataclass
class _WithDerived:
    x: torch.Tensor
    n: int = dataclasses.field(init=False, default=0)


def test_dataclass_field_without_init_is_left_alone() -> None:
    piece = split(_WithDerived(torch.arange(4)), 4, 0, 2)
    assert piece.x.tolist() == [0, 1]


# ---------------------------------------------------------------------------
# Sparse batches and option lists


def sparse_rows(n: int) -> torch.Tensor:
    return rows(n).to_sparse()


def test_split_cuts_a_sparse_coo_batch_into_its_rows() -> None:
    chunk = split(sparse_rows(4), 4, 1, 3)
    assert chunk.layout is torch.sparse_coo
    assert torch.equal(chunk.to_dense(), rows(4)[1:3])


def test_merge_joins_sparse_coo_chunks_back_into_the_batch() -> None:
    chunks = [split(sparse_rows(4), 4, 0, 1), split(sparse_rows(4), 4, 1, 4)]
    assert torch.equal(merge(chunks, [1, 3]).to_dense(), rows(4))


def test_split_refuses_a_sparse_csr_batch_naming_its_path() -> None:
    value = {"features": rows(4).to_sparse_csr()}
    with pytest.raises(BatchError, match=r"features\['features'\] is a torch.sparse_csr tensor"):
        split(value, 4, 0, 2, path="features")


def test_split_without_lists_sends_a_list_of_the_batch_length_whole() -> None:
    stop_tokens = [1, 2, 3, 4]
    assert split({"x": rows(4), "stop": stop_tokens}, 4, 0, 2, lists=False)["stop"] is stop_tokens


def test_batch_size_without_lists_skips_a_list_of_options() -> None:
    assert batch_size_of(([7, 8, 9], rows(4)), lists=False) == 4
