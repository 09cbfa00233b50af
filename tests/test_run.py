"""One guarded call: chunk sequences, recovery, giving up."""

from __future__ import annotations

import gc
import traceback
import weakref
from typing import Any

import pytest
import torch

import torchmemguard
from tests.conftest import ChunkLimit, rows
from torchmemguard import _decide as decide

# The out-of-memory errors here are raised by the tests and take no memory: the
# chunk sequences are those of a device whose memory cannot be measured. The
# measured sizing is tested in test_sizing.py, and under real caps.
pytestmark = pytest.mark.usefixtures("unmeasured")


def test_first_call_halves_until_a_chunk_fits() -> None:
    fn = ChunkLimit(16)
    torchmemguard.oom_safe(fn)(rows(64))
    # Once every chunk ran, rows 1-2 and 14-15 run alone: the check that rows are independent.
    assert fn.sizes == [64, 32, 16, 16, 16, 16, 2, 2]


def test_the_last_two_chunks_share_what_is_left_rather_than_end_on_a_few_rows() -> None:
    fn = ChunkLimit(16)
    guarded = torchmemguard.oom_safe(fn, check_rows=False)
    out = guarded(rows(67))
    # 67 = 16 * 3 + 19: chunks of 16 would end on one of 3 rows; the last two share 19.
    assert fn.sizes == [67, 33, 16, 16, 16, 10, 9]
    assert torch.equal(out, rows(67) * 2 + 1)
    fn.sizes.clear()
    guarded(rows(56))
    assert fn.sizes == [16, 16, 16, 8]  # 8 rows or more: the chunks as they are


def test_the_rows_are_checked_once_per_shape_one_row_into_the_first_chunk() -> None:
    fn = ChunkLimit(16)
    guarded = torchmemguard.oom_safe(fn)
    guarded(rows(64))
    assert fn.rows[64:] == [1, 2, 14, 15]
    fn.sizes.clear()
    guarded(rows(64))
    assert fn.sizes == [16, 16, 16, 16]


def test_second_identical_call_raises_no_oom() -> None:
    fn = ChunkLimit(16)
    guarded = torchmemguard.oom_safe(fn)
    guarded(rows(64))
    fn.sizes.clear()
    guarded(rows(64))
    assert fn.sizes == [16, 16, 16, 16]
    assert guarded.oom_guard.stats.ooms == 2


def test_chunked_result_equals_the_whole_result() -> None:
    x = rows(100)
    assert torch.equal(torchmemguard.oom_safe(ChunkLimit(7))(x), x * 2 + 1)


def test_every_sample_is_computed_once_and_in_order() -> None:
    fn = ChunkLimit(10)
    torchmemguard.oom_safe(fn, check_rows=False)(rows(77))
    assert fn.rows == list(range(77))


def test_only_the_failed_chunk_is_split_again() -> None:
    fn = ChunkLimit(10)
    guarded = torchmemguard.oom_safe(fn, grow_after=1000)
    guarded(rows(40))  # learns 10
    fn.limit = 6  # memory got tighter
    fn.sizes.clear()
    fn.rows.clear()
    guarded(rows(40))
    assert fn.sizes == [10, 5, 5, 5, 5, 5, 5, 5, 5]
    assert fn.rows == list(range(40))


def test_learned_size_grows_back_when_memory_is_freed() -> None:
    fn = ChunkLimit(16)
    guarded = torchmemguard.oom_safe(fn, grow_after=2)
    guarded(rows(64))
    ooms = guarded.oom_guard.stats.ooms
    fn.limit = 1000
    for _ in range(16):
        fn.sizes.clear()
        guarded(rows(64))
    assert fn.sizes == [64]
    assert guarded.oom_guard.stats.ooms == ooms


def test_failed_growth_probe_returns_to_the_known_fit() -> None:
    fn = ChunkLimit(16)
    guarded = torchmemguard.oom_safe(fn, grow_after=2)
    guarded(rows(64))
    fn.sizes.clear()
    guarded(rows(64))  # the second call held back by the limit tries halfway to 32
    assert fn.sizes == [16, 24, 16, 16, 16]


def test_growth_counts_calls_not_chunks() -> None:
    fn = ChunkLimit(16)
    guarded = torchmemguard.oom_safe(fn, grow_after=2)
    guarded(rows(1024))  # 64 chunks of 16 after the OOMs: one call all the same
    assert max(fn.sizes[fn.sizes.index(16) :]) == 16


def test_a_chunk_that_failed_is_not_retried_in_the_same_call() -> None:
    attempts: list[tuple[int, bool]] = []
    guards = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        fits = x.shape[0] <= 4
        attempts.append((x.shape[0], fits))
        if not fits:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        for entry in guards[0].memory.entries.values():
            entry.limit = 64  # as if another thread had just raised the shared limit
        return x

    guarded = torchmemguard.oom_safe(fn, check_rows=False)
    guards.append(guarded._self_guard)  # type: ignore[attr-defined]  # the internal Guard
    guarded(rows(32))
    smallest_failed = None
    for size, fits in attempts:
        assert smallest_failed is None or size < smallest_failed
        if not fits:
            smallest_failed = size
    assert sum(size for size, fits in attempts if fits) == 32


def test_non_oom_exception_passes_through_untouched(
    recoveries: list[tuple[object, bool]],
) -> None:
    error = ValueError("bad input")
    attempts = []

    @torchmemguard.oom_safe
    def fn(x: torch.Tensor) -> torch.Tensor:
        attempts.append(x.shape[0])
        raise error

    with pytest.raises(ValueError, match="bad input") as caught:
        fn(rows(8))
    assert caught.value is error
    assert traceback.extract_tb(caught.value.__traceback__)[-1].name == "fn"
    assert attempts == [8]
    assert recoveries == []


def test_non_oom_exception_in_a_later_chunk_passes_through() -> None:
    error = KeyError("late")

    @torchmemguard.oom_safe
    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        if x[0, 0] >= 4:
            raise error
        return x

    with pytest.raises(KeyError) as caught:
        fn(rows(8))
    assert caught.value is error


def test_cleanup_runs_after_the_exception_is_gone(
    recoveries: list[tuple[object, bool]],
) -> None:
    fn = ChunkLimit(16)
    torchmemguard.oom_safe(fn)(rows(64))
    assert recoveries == [(torch.device("cuda"), False), (torch.device("cuda"), False)]


def test_cleanup_targets_the_device_the_error_names(
    recoveries: list[tuple[object, bool]],
) -> None:
    fn = ChunkLimit(16, message="CUDA out of memory. GPU 1 has a total capacity of 80 GiB.")
    torchmemguard.oom_safe(fn)(rows(32))  # the batch is on the CPU, the OOM on cuda:1
    assert recoveries == [(torch.device("cuda", 1), False)]


def test_cleanup_falls_back_to_the_batch_device(
    recoveries: list[tuple[object, bool]],
) -> None:
    fn = ChunkLimit(16, message="Allocation failed.")
    fn_guarded = torchmemguard.oom_safe(fn)
    fn_guarded(rows(32))
    assert recoveries == [(torch.device("cpu"), False)]


def test_smallest_chunk_failing_raises_our_error_chained_from_the_last_oom() -> None:
    fn = ChunkLimit(0)
    guarded = torchmemguard.oom_safe(fn)
    with pytest.raises(torchmemguard.OutOfMemoryError) as caught:
        guarded(rows(8))
    error = caught.value
    assert isinstance(error, torch.OutOfMemoryError)
    assert isinstance(error.__cause__, torch.OutOfMemoryError)
    assert "limit 0" in str(error.__cause__)
    assert guarded.oom_guard.stats.unrecovered == 1


def test_final_error_names_function_device_batch_and_smallest_chunk() -> None:
    fn = ChunkLimit(0, message="DefaultCPUAllocator: can't allocate memory.")
    with pytest.raises(torchmemguard.OutOfMemoryError) as caught:
        torchmemguard.oom_safe(fn)(rows(8))
    message = str(caught.value)
    assert "ChunkLimit" in message
    assert "on cpu" in message
    assert "batch of 8 samples" in message
    assert "smallest chunk tried 1" in message
    assert "resident" in message  # the CPU memory state


def test_smallest_chunk_is_retried_once_after_a_full_collection(
    recoveries: list[tuple[object, bool]],
) -> None:
    fn = ChunkLimit(0)
    with pytest.raises(torchmemguard.OutOfMemoryError):
        torchmemguard.oom_safe(fn)(rows(2))
    assert fn.sizes == [2, 1, 1]
    assert recoveries[-1] == (torch.device("cuda"), True)


def test_min_chunk_bounds_the_split() -> None:
    fn = ChunkLimit(3)
    with pytest.raises(torchmemguard.OutOfMemoryError, match="smallest chunk tried 4"):
        torchmemguard.oom_safe(fn, min_chunk=4)(rows(32))
    assert min(fn.sizes) == 4


def test_max_retries_bounds_the_attempts() -> None:
    fn = ChunkLimit(0)
    with pytest.raises(torchmemguard.OutOfMemoryError, match="after 3 out-of-memory errors"):
        torchmemguard.oom_safe(fn, max_retries=2)(rows(1024))
    assert fn.sizes == [1024, 512, 256]


def test_empty_batch_is_called_once() -> None:
    fn = ChunkLimit(16)
    out = torchmemguard.oom_safe(fn)(rows(0))
    assert out.shape == (0, 3)
    assert fn.sizes == [0]


def test_single_sample_that_fits_is_called_once() -> None:
    fn = ChunkLimit(16)
    torchmemguard.oom_safe(fn)(rows(1))
    assert fn.sizes == [1]


def test_broadcast_tensor_passes_whole_to_every_chunk() -> None:
    seen = []

    @torchmemguard.oom_safe(batch_args=("x", "position_ids"))
    def fn(x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(position_ids.shape))
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return x + position_ids

    x = torch.ones(4, 5)
    out = fn(x, position_ids=torch.arange(5).unsqueeze(0))
    assert torch.equal(out, x + torch.arange(5))
    assert seen == [(1, 5), (1, 5), (1, 5), (1, 5)]  # the third: the row check


def test_list_of_samples_is_a_valid_batch() -> None:
    @torchmemguard.oom_safe
    def fn(prompts: list[str]) -> list[str]:
        if len(prompts) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return [p.upper() for p in prompts]

    assert fn(["a", "b", "c", "d", "e"]) == ["A", "B", "C", "D", "E"]


def test_batch_argument_with_nothing_to_split_names_it() -> None:
    @torchmemguard.oom_safe
    def fn(config: dict[str, int]) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory.")

    with pytest.raises(ValueError, match="'config' holds nothing to split"):
        fn({"depth": 3})


def test_disagreeing_batch_sizes_are_named_with_their_sizes() -> None:
    @torchmemguard.oom_safe(batch_args=("a", "b"))
    def fn(a: torch.Tensor, b: torch.Tensor) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory.")

    with pytest.raises(ValueError, match="a=4, b=3"):
        fn(torch.ones(4), torch.ones(3))


def test_unmergeable_output_asks_for_a_merge_hook() -> None:
    @torchmemguard.oom_safe
    def loss(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return x.mean()

    with pytest.raises(torchmemguard.MergeError, match="merge="):
        loss(torch.ones(4))


def test_merge_hook_combines_the_chunk_outputs() -> None:
    @torchmemguard.oom_safe(merge=lambda outs: sum(outs))
    def total(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return x.sum()

    assert total(torch.arange(8.0)).item() == 28.0


def test_split_hook_cuts_a_value_of_a_user_type() -> None:
    class Ragged:
        def __init__(self, items: list[int]) -> None:
            self.items = items

    def cut(value: object, start: int, stop: int) -> object:
        return Ragged(value.items[start:stop]) if isinstance(value, Ragged) else value

    @torchmemguard.oom_safe(split=cut)
    def fn(batch: dict[str, object]) -> torch.Tensor:
        x, extra = batch["x"], batch["extra"]
        assert isinstance(x, torch.Tensor)
        assert isinstance(extra, Ragged)
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return x + torch.tensor(extra.items)

    out = fn({"x": torch.zeros(4), "extra": Ragged([1, 2, 3, 4])})
    assert out.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_oom_while_merging_raises_our_error() -> None:
    def tight_merge(outputs: list[torch.Tensor]) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB.")

    guarded = torchmemguard.oom_safe(ChunkLimit(2), merge=tight_merge)
    with pytest.raises(torchmemguard.OutOfMemoryError, match="merging their outputs") as caught:
        guarded(rows(4))
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    assert guarded.oom_guard.stats.unrecovered == 1


@pytest.mark.parametrize(
    "batch_args", [None, ("input_ids", "attention_mask")], ids=["default", "named"]
)
def test_every_per_sample_tensor_is_split_keyword_arguments_too(
    batch_args: tuple[str, ...] | None,
) -> None:
    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return input_ids * attention_mask

    guarded = torchmemguard.oom_safe(batch_args=batch_args)(forward)
    mask = torch.arange(4.0).unsqueeze(1).expand(4, 3)
    assert torch.equal(guarded(torch.ones(4, 3), attention_mask=mask), mask)


def test_broadcast_batch_argument_named_first_does_not_set_the_batch_size() -> None:
    @torchmemguard.oom_safe(batch_args=("position_ids", "x"))
    def fn(position_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return x + position_ids

    out = fn(torch.arange(3.0).unsqueeze(0), torch.zeros(8, 3))
    assert torch.equal(out, torch.arange(3.0).expand(8, 3))


def test_single_sample_with_a_broadcast_extra_is_not_per_sample() -> None:
    @torchmemguard.oom_safe
    def fn(x, position_ids):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    with pytest.raises(torchmemguard.OutOfMemoryError):
        fn(torch.ones(1, 3), torch.arange(3).unsqueeze(0))


def test_min_chunk_bounds_the_first_chunk_of_a_later_call() -> None:
    fn = ChunkLimit(4)
    guarded = torchmemguard.oom_safe(fn, min_chunk=4)
    guarded(rows(10))
    fn.sizes.clear()
    guarded(rows(10))
    assert fn.sizes == [4, 4, 2]


def test_split_calls_counts_only_calls_cut_into_chunks() -> None:
    guarded = torchmemguard.oom_safe(ChunkLimit(16))
    guarded(rows(64))
    assert guarded.oom_guard.stats.split_calls == 1
    guarded(rows(16))  # exactly the learned limit: runs whole
    assert guarded.oom_guard.stats.split_calls == 1


def test_a_call_that_fits_whole_teaches_nothing() -> None:
    fn = ChunkLimit(16)
    guarded = torchmemguard.oom_safe(fn)
    guarded(rows(64))
    guarded(torch.zeros(4, 3, dtype=torch.float64))  # fits whole, no OOM
    fn.sizes.clear()
    guarded(torch.zeros(8, 6, dtype=torch.float64))  # a new shape of that group
    assert fn.sizes == [8]


def test_min_chunk_holds_after_a_success() -> None:
    fn = ChunkLimit(4)
    torchmemguard.oom_safe(fn, min_chunk=4)(rows(10))
    # Only the remainder, and the row check's runs of one row, are below min_chunk.
    assert fn.sizes == [10, 5, 4, 4, 2, 1, 1]


def test_failing_min_chunk_is_retried_once_after_a_full_collection(recoveries) -> None:
    fn = ChunkLimit(3)
    with pytest.raises(torchmemguard.OutOfMemoryError, match="even the smallest chunk"):
        torchmemguard.oom_safe(fn, min_chunk=4)(rows(8))
    assert fn.sizes == [8, 4, 4]
    assert recoveries[-1][1] is True


def test_retries_count_the_attempts_after_an_oom() -> None:
    guarded = torchmemguard.oom_safe(ChunkLimit(16))
    guarded(rows(64))  # 64 and 32 fail
    assert guarded.oom_guard.stats.retries == 2


def test_function_returning_none_after_sizes_are_learned() -> None:
    @torchmemguard.oom_safe
    def fn(x):
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory.")

    assert fn(torch.ones(4)) is None
    assert fn(torch.ones(2)) is None  # whole, under the learned limit


def test_module_with_a_list_batch_recovers_its_parameters_device(recoveries) -> None:
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, prompts):
            if len(prompts) > 2:
                raise torch.OutOfMemoryError("Allocation failed.")
            return prompts

    torchmemguard.guard(M())(["a", "b", "c", "d"])
    assert recoveries == [(torch.device("cpu"), False)]


def test_small_batch_of_a_new_shape_is_sized_from_its_group_not_from_other_limits() -> None:
    fn = ChunkLimit(16)
    guarded = torchmemguard.oom_safe(fn)
    guarded(rows(64))  # learns 16 samples of 3 values
    fn.sizes.clear()
    # 8 is within the limit learned for rows of 3, but a row of 30 is ten times as
    # large: the group's fit in bytes holds one.
    guarded(rows(8, width=30))
    # A new shape is checked anew: chunks of one row, so two rows stand in for the chunk.
    assert fn.sizes == [1] * 8 + [2, 1]


def test_batch_above_the_smallest_limit_starts_from_the_transferred_size() -> None:
    fn = ChunkLimit(16)
    guarded = torchmemguard.oom_safe(fn)
    guarded(rows(64))  # learns 16 samples of 12 bytes
    fn.sizes.clear()
    guarded(rows(32, width=6))  # 24 bytes per sample: half as many
    assert fn.sizes[0] == 8


@pytest.mark.parametrize(
    ("ran_out", "batch", "named"),
    [
        ("cuda", "cuda:1", "cuda:1"),
        ("cuda:0", "cuda:1", "cuda:0"),
        ("cuda", "cpu", "cuda"),
        (None, "cuda:1", "cuda:1"),
        (None, None, None),
    ],
)
def test_an_oom_is_named_by_its_device_as_exactly_as_known(
    ran_out: str | None, batch: str | None, named: str | None
) -> None:
    device = decide.named(
        None if ran_out is None else torch.device(ran_out),
        None if batch is None else torch.device(batch),
    )
    assert device == (None if named is None else torch.device(named))


def test_a_guard_whose_device_freed_nothing_never_retries_a_larger_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(decide.devices, "room", lambda device: 100 * 2**20)
    fn = ChunkLimit(5)
    guarded = torchmemguard.oom_safe(fn, grow_after=1)
    for _ in range(20):
        guarded(rows(8))
    assert fn.sizes[:5] == [8, 4, 4, 1, 1]  # 1, 1: the row check
    assert set(fn.sizes[5:]) == {4}
    assert guarded.oom_guard.stats.ooms == 1  # type: ignore[attr-defined]


def test_a_guard_grows_as_soon_as_its_device_has_room_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    room = {"now": 100 * 2**20}
    monkeypatch.setattr(decide.devices, "room", lambda device: room["now"])
    fn = ChunkLimit(5)
    guarded = torchmemguard.oom_safe(fn)
    guarded(rows(8))  # 8 fails, then 4 and 4
    fn.limit, room["now"] = 8, 200 * 2**20  # memory was freed
    guarded(rows(8))  # 4 fits, the room is seen, the rest runs at 8
    guarded(rows(8))
    assert fn.sizes == [8, 4, 4, 1, 1, 4, 4, 8]  # 1, 1: the row check
    assert guarded.oom_guard.stats.ooms == 1  # type: ignore[attr-defined]


def test_a_call_whose_onednn_failed_under_a_cap_retries_without_onednn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torchmemguard._device import host

    monkeypatch.setattr(host, "can_cap_address_space", lambda: True)
    monkeypatch.setattr(host, "address_space_limit", lambda: 4 * 2**30)
    seen = []

    @torchmemguard.oom_safe
    def conv(x: torch.Tensor) -> torch.Tensor:
        seen.append((x.shape[0], bool(torch.backends.mkldnn.enabled)))
        if torch.backends.mkldnn.enabled:
            raise RuntimeError("could not create a primitive")
        return x * 2

    assert torch.equal(conv(rows(4)), rows(4) * 2)
    assert seen == [(4, True), (2, False), (2, False), (1, False)]  # 1: the row check
    assert torch.backends.mkldnn.enabled


def test_a_split_call_s_run_is_freed_as_soon_as_the_call_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A run that its own parts refer to lives on, with the chunks' outputs it holds,
    # until a garbage collection: under a tight cap, memory the next call needs.
    from torchmemguard._guarded import Guard

    runs = []
    real = Guard.run

    def kept(self: Guard, *args: Any, **kwargs: Any) -> Any:
        run = real(self, *args, **kwargs)
        runs.append(weakref.ref(run))
        return run

    monkeypatch.setattr(Guard, "run", kept)
    guarded = torchmemguard.oom_safe(ChunkLimit(2))
    gc.collect()
    gc.disable()
    try:
        assert torch.equal(guarded(rows(8)), rows(8) * 2 + 1)
        assert runs
        assert all(run() is None for run in runs)
    finally:
        gc.enable()
