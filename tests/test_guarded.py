"""The guard between calls: its quick look at a batch, its state, its options."""

from __future__ import annotations

import gc
import typing

import pytest
import torch

import torchmemguard
from tests.conftest import ChunkLimit, ScarceModule, rows
from torchmemguard import _knowledge as guarded_module
from torchmemguard._guarded import Guard
from torchmemguard._options import GuardOptions, Options


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of every call that took the full run instead of the quick look."""
    sizes: list[int] = []
    real = Guard.run

    def counted(self: Guard, *args: typing.Any, **kwargs: typing.Any) -> typing.Any:
        run = real(self, *args, **kwargs)
        sizes.append(run.n)
        return run

    monkeypatch.setattr(Guard, "run", counted)
    return sizes


def test_a_fresh_guard_takes_no_run(runs: list[int]) -> None:
    torchmemguard.oom_safe(ChunkLimit(100))(rows(64))
    assert runs == []


def test_a_batch_within_the_learned_limit_takes_the_run_once_then_the_quick_look(
    runs: list[int],
) -> None:
    guarded = torchmemguard.oom_safe(ChunkLimit(16))
    guarded(rows(64))  # learns 16
    runs.clear()
    for _ in range(3):
        guarded(rows(16))
    assert runs == [16]


def test_another_shape_takes_the_run_once_then_the_quick_look(runs: list[int]) -> None:
    fn = ChunkLimit(16)
    guarded = torchmemguard.oom_safe(fn, grow_after=1000)
    guarded(rows(64))  # learns 16 for rows of width 3
    fn.limit = 1000
    runs.clear()
    fn.sizes.clear()
    for _ in range(3):
        guarded(torch.zeros(20, 1))  # another shape, above 16: 20 runs whole
    assert runs == [20]
    assert fn.sizes == [20, 20, 20]


def test_each_of_ten_learned_shapes_runs_its_fitting_batches_without_a_run(
    runs: list[int],
) -> None:
    fn = ChunkLimit(16)
    guarded = torchmemguard.oom_safe(fn, grow_after=1000)
    for width in range(1, 11):
        guarded(rows(64, width=width))  # each shape learns a limit
    limits = list(guarded.oom_guard.learned().values())  # type: ignore[attr-defined]
    assert len(limits) == 10
    for width, limit in zip(range(1, 11), limits, strict=True):
        guarded(rows(limit, width=width))  # the first batch at the limit may take a run
    runs.clear()
    for width, limit in zip(range(1, 11), limits, strict=True):
        guarded(rows(limit, width=width))
    assert runs == []


def test_a_failure_sends_every_shape_back_through_the_run(runs: list[int]) -> None:
    room = {"elements": 96}

    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.numel() > room["elements"]:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return x

    guarded = torchmemguard.oom_safe(fn, grow_after=1000)
    guarded(rows(64))  # learns 32 rows of 3
    guarded(torch.zeros(40, 1))  # 40 of this shape runs whole
    runs.clear()
    guarded(torch.zeros(40, 1))
    assert runs == []  # remembered
    room["elements"] = 60
    guarded(rows(32))  # another failure: what ran whole is forgotten
    runs.clear()
    guarded(torch.zeros(40, 1))
    assert runs == [40]


def test_a_batch_above_its_shapes_limit_still_splits(runs: list[int]) -> None:
    fn = ChunkLimit(16)
    guarded = torchmemguard.oom_safe(fn, grow_after=1000)
    guarded(rows(64))
    runs.clear()
    fn.sizes.clear()
    guarded(rows(32))
    assert runs == [32]
    assert fn.sizes == [16, 16]


def test_the_state_counts_and_shows_what_was_learned() -> None:
    guarded = torchmemguard.oom_safe(ChunkLimit(16))
    guarded(rows(64))
    state = guarded.oom_guard  # type: ignore[attr-defined]
    assert isinstance(state, torchmemguard.GuardState)
    assert (state.stats.ooms, state.stats.split_calls) == (2, 1)
    assert list(state.learned().values()) == [16]
    assert state.options.min_chunk == 1
    assert not state.runs_backward


def test_the_state_is_read_only() -> None:
    state = torchmemguard.oom_safe(ChunkLimit(16)).oom_guard  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        state.stats = None
    state.stats.ooms = 100  # a copy: the guard's counters are untouched
    assert state.stats.ooms == 0


def test_clear_forgets_the_learned_sizes_and_keeps_the_counters() -> None:
    fn = ChunkLimit(16)
    guarded = torchmemguard.oom_safe(fn)
    guarded(rows(64))
    guarded.oom_guard.clear()  # type: ignore[attr-defined]
    assert guarded.oom_guard.learned() == {}  # type: ignore[attr-defined]
    assert guarded.oom_guard.stats.ooms == 2  # type: ignore[attr-defined]
    fn.sizes.clear()
    guarded(rows(64))
    assert fn.sizes[0] == 64


def test_a_guard_made_again_for_the_same_function_starts_from_what_was_learned() -> None:
    fn = ChunkLimit(16)
    torchmemguard.oom_safe(fn)(rows(64))
    fn.sizes.clear()
    again = torchmemguard.oom_safe(fn)
    assert torch.equal(again(rows(64)), rows(64) * 2 + 1)
    assert fn.sizes == [16, 16, 16, 16]
    assert again.oom_guard.stats.ooms == 0  # type: ignore[attr-defined]


def test_a_guard_of_a_bound_method_made_again_shares_with_its_instance_only() -> None:
    class Model:
        def __init__(self, limit: int) -> None:
            self.fn = ChunkLimit(limit)

        def predict(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.fn(x)
            return out

    first, second = Model(16), Model(16)
    torchmemguard.oom_safe(first.predict)(rows(64))
    first.fn.sizes.clear()
    torchmemguard.oom_safe(first.predict)(rows(64))
    torchmemguard.oom_safe(second.predict)(rows(64))
    assert first.fn.sizes == [16, 16, 16, 16]
    assert second.fn.sizes[:3] == [64, 32, 16]


def test_guards_with_other_options_learn_apart() -> None:
    fn = ChunkLimit(16)
    torchmemguard.oom_safe(fn)(rows(64))
    fn.sizes.clear()
    torchmemguard.oom_safe(fn, min_chunk=2)(rows(64))
    assert fn.sizes[0] == 64


def test_a_guarded_module_made_again_starts_from_what_was_learned() -> None:
    module = ScarceModule(torch.nn.Identity(), limit=16)
    torchmemguard.guard(module)(rows(64))
    module.sizes.clear()
    torchmemguard.guard(module)(rows(64))
    assert module.sizes == [16, 16, 16, 16]


def test_what_a_guard_learned_goes_with_its_function() -> None:
    def make() -> typing.Callable[[torch.Tensor], torch.Tensor]:
        limit = ChunkLimit(16)
        return lambda x: limit(x)

    gc.collect()
    before = len(guarded_module._known)
    for _ in range(5):
        torchmemguard.oom_safe(make())(rows(64))
    gc.collect()
    assert len(guarded_module._known) == before


def test_every_unknown_option_is_named_at_once() -> None:
    with pytest.raises(TypeError) as found:
        torchmemguard.oom_safe(batch_arg="x", min_chunks=2)  # type: ignore[call-overload]
    assert "'batch_arg'" in str(found.value)
    assert "'min_chunks'" in str(found.value)


def test_every_bad_option_value_is_named_at_once() -> None:
    with pytest.raises(ValueError, match=r"min_chunk.*max_retries"):
        torchmemguard.oom_safe(min_chunk=0, max_retries=0)


def test_options_are_declared_once() -> None:
    fields = [field.name for field in Options.__dataclass_fields__.values()]
    assert list(typing.get_type_hints(GuardOptions)) == fields


def test_the_learned_sizes_are_keyed_by_named_shapes() -> None:
    fn = ChunkLimit(2)
    guarded = torchmemguard.oom_safe(fn)
    guarded(rows(4))
    (key,) = guarded.oom_guard.learned()
    assert isinstance(key, torchmemguard.ShapeKey)
    assert (key.device, key.dtype, key.shapes) == (torch.device("cpu"), torch.float32, ((3,),))
    assert str(key) == "cpu torch.float32 [(3,)]"
