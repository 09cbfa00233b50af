"""The size memory: what chunk to try, how it shrinks, grows and transfers."""

from __future__ import annotations

import threading

from torchmemguard._sizing import CallShape, SizeMemory

KEY = ("fn", "cpu", "float32", ((128,),))
GROUP = ("fn", "cpu", "float32")


def at(n: int) -> CallShape:
    """A call of ``n`` samples of 512 bytes, of the shape KEY."""
    return CallShape(n, KEY, GROUP, 512)


def test_unknown_shape_starts_with_the_whole_batch() -> None:
    assert SizeMemory().start(at(64)) == 64


def test_failure_halves_the_chunk() -> None:
    memory = SizeMemory()
    assert memory.failed(at(64), 64) == 32
    assert memory.failed(at(32), 32) == 16


def test_learned_limit_caps_the_next_start() -> None:
    memory = SizeMemory()
    memory.failed(at(64), 64)
    memory.fitted(at(32), 32, limited=True)
    assert memory.start(at(100)) == 32
    assert memory.start(at(10)) == 10


def test_failed_probe_falls_back_to_the_known_fit() -> None:
    memory = SizeMemory(grow_after=1)
    memory.failed(at(64), 64)  # limit 32
    assert memory.fitted(at(32), 32, limited=True) == 48  # halfway to 64
    assert memory.failed(at(48), 48) == 32


def test_growth_waits_twice_as_long_after_a_failed_probe() -> None:
    memory = SizeMemory(grow_after=2)
    memory.failed(at(64), 64)
    limits = [memory.fitted(at(32), 32, limited=True) for _ in range(2)]
    assert limits == [32, 48]
    memory.failed(at(48), 48)
    limits = [memory.fitted(at(32), 32, limited=True) for _ in range(4)]
    assert limits == [32, 32, 32, 40]


def test_growth_doubles_when_no_failure_is_known() -> None:
    memory = SizeMemory(grow_after=1)
    memory.failed(at(64), 64)
    memory.fitted(at(64), 64, limited=False)  # memory was freed: 64 fits now
    assert memory.fitted(at(32), 32, limited=True) == 64


def test_converged_limit_probes_the_known_failure_itself() -> None:
    memory = SizeMemory(grow_after=1)
    memory.failed(at(64), 64)
    memory.fitted(at(32), 32, limited=True)  # probe 48
    assert memory.fitted(at(48), 48, limited=True) == 56  # halfway to 64
    memory.fitted(at(56), 56, limited=True)  # 60
    memory.fitted(at(60), 60, limited=True)  # 62
    memory.fitted(at(62), 62, limited=True)  # 63
    # Converged one below the failure: try the failure itself, and once it fits,
    # the failure is forgotten and the limit doubles.
    assert memory.fitted(at(63), 63, limited=True) == 64
    assert memory.fitted(at(64), 64, limited=True) == 128


def test_unlimited_success_does_not_count_towards_growth() -> None:
    memory = SizeMemory(grow_after=1)
    memory.failed(at(64), 64)
    assert memory.fitted(at(10), 10, limited=False) == 32


def test_failure_at_a_size_that_fitted_before_halves_it() -> None:
    memory = SizeMemory()
    memory.failed(at(64), 64)
    memory.fitted(at(32), 32, limited=True)
    assert memory.failed(at(32), 32) == 16


def test_new_shape_starts_in_proportion_to_bytes_per_sample() -> None:
    memory = SizeMemory()
    memory.failed(at(64), 64)
    memory.fitted(at(32), 32, limited=True)
    longer = ("fn", "cpu", "float32", ((256,),))
    assert memory.start(CallShape(64, longer, GROUP, 1024)) == 16


def test_new_shape_of_another_group_starts_whole() -> None:
    memory = SizeMemory()
    memory.failed(at(64), 64)
    other = ("fn", "cpu", "float16")
    assert memory.start(CallShape(64, ("fn", "cpu", "float16", ((128,),)), other, 256)) == 64


def test_memory_is_bounded_least_recently_used_first() -> None:
    memory = SizeMemory(capacity=2)
    for shape in (1, 2, 3):
        memory.failed(CallShape(64, ("k", shape), GROUP, 1), 64)
    assert list(memory.learned()) == [("k", 2), ("k", 3)]


def test_lookup_refreshes_recency() -> None:
    memory = SizeMemory(capacity=2)
    memory.failed(CallShape(64, ("k", 1), GROUP, 1), 64)
    memory.failed(CallShape(64, ("k", 2), GROUP, 1), 64)
    memory.start(CallShape(64, ("k", 1), GROUP, 1))
    memory.failed(CallShape(64, ("k", 3), GROUP, 1), 64)
    assert list(memory.learned()) == [("k", 1), ("k", 3)]


def test_clear_forgets_everything() -> None:
    memory = SizeMemory()
    memory.failed(at(64), 64)
    memory.clear()
    assert memory.learned() == {}
    assert memory.start(at(64)) == 64


def test_concurrent_updates_keep_the_memory_consistent() -> None:
    memory = SizeMemory(grow_after=1_000_000)
    keys = [("k", i) for i in range(8)]

    def work(key: tuple[str, int]) -> None:
        for _ in range(200):
            memory.failed(CallShape(64, key, GROUP, 1), 64)
            memory.fitted(CallShape(32, key, GROUP, 1), 32, limited=True)

    threads = [threading.Thread(target=work, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert memory.learned() == {key: 32 for key in keys}


def test_group_guess_is_at_least_one_sample() -> None:
    memory = SizeMemory()
    memory.failed(at(2), 2)  # fits 1 x 512 bytes
    assert memory.start(CallShape(64, ("other",), GROUP, 1024)) == 1


def test_new_shape_with_no_bytes_per_sample_starts_whole() -> None:
    memory = SizeMemory()
    memory.failed(at(64), 64)
    assert memory.start(CallShape(64, ("fn", "cpu", "float32", ((0,),)), GROUP, 0)) == 64


def test_a_new_best_fit_brings_the_wait_back_to_grow_after() -> None:
    memory = SizeMemory(grow_after=1)
    memory.failed(at(64), 64)  # limit 32
    memory.fitted(at(32), 32, limited=True)  # probe 48
    memory.failed(at(48), 48)  # back to 32, wait 2
    memory.fitted(at(40), 40, limited=False)  # 40 fits: looser than known
    assert memory.fitted(at(32), 32, limited=True) == 40


def test_a_failure_restarts_the_count_towards_growth() -> None:
    memory = SizeMemory(grow_after=2)
    memory.failed(at(64), 64)  # limit 32
    memory.fitted(at(32), 32, limited=True)  # 1 of 2
    memory.failed(at(32), 32)  # tighter: limit 16
    assert memory.fitted(at(16), 16, limited=True) == 16


def test_the_smallest_failure_is_remembered() -> None:
    memory = SizeMemory(grow_after=1)
    memory.failed(at(48), 48)  # bad 48
    memory.failed(at(64), 64)  # a larger failure keeps bad at 48
    assert memory.fitted(at(32), 32, limited=True) == 40  # halfway to 48


def test_the_wait_between_probes_is_capped() -> None:
    memory = SizeMemory(grow_after=1)
    memory.failed(at(64), 64)
    for _ in range(10):
        while (limit := memory.fitted(at(32), 32, limited=True)) == 32:
            pass
        memory.failed(at(limit), limit)  # every probe fails
    waits = 1
    while memory.fitted(at(32), 32, limited=True) == 32:
        waits += 1
    assert waits == 64  # grow_after * 64


def test_a_failure_never_raises_the_group_fit() -> None:
    memory = SizeMemory()
    memory.failed(CallShape(8, ("a",), GROUP, 512), 8)  # fits 4 x 512 bytes
    memory.failed(CallShape(64, ("b",), GROUP, 512), 64)  # limit 32, but the group keeps 4
    assert memory.start(CallShape(64, ("c",), GROUP, 512)) == 4


def test_group_memory_is_bounded_least_recently_updated_first() -> None:
    memory = SizeMemory(capacity=2)
    memory.fitted(CallShape(4, ("a",), "g1", 1), 4, limited=True)
    memory.fitted(CallShape(4, ("b",), "g2", 1), 4, limited=True)
    memory.fitted(CallShape(8, ("a",), "g1", 1), 8, limited=True)  # g1 refreshed
    memory.fitted(CallShape(4, ("c",), "g3", 1), 4, limited=True)  # evicts g2
    assert memory.start(CallShape(64, ("new1",), "g1", 1)) == 8
    assert memory.start(CallShape(64, ("new2",), "g2", 1)) == 64


MIB = 2**20
SHAPE = at(64)


class Room:
    """A room reader whose answer the test sets, recording the devices asked about."""

    def __init__(self, now: int | None) -> None:
        self.now = now
        self.asked: list[object] = []

    def __call__(self, device: object) -> int | None:
        self.asked.append(device)
        return self.now


def failed_with_room(room: Room, device: object = "cuda:0", grow_after: int = 1) -> SizeMemory:
    """A memory whose shape ran out at 64 (limit 32), leaving ``room.now`` on ``device``."""
    memory = SizeMemory(grow_after=grow_after, room=room)
    memory.failed(SHAPE, 64)
    memory.recovered(SHAPE, device)
    return memory


def measured(memory: SizeMemory, size: int, mib_per_sample: float = 1.0) -> int:
    """Record that a chunk of ``size`` fitted, at a peak of ``mib_per_sample`` MiB a sample."""
    return memory.fitted(at(size), size, limited=True, peak=int(size * mib_per_sample * MIB))


def test_a_measured_chunk_sizes_the_next_from_the_room_below_the_failure() -> None:
    memory = failed_with_room(Room(40 * MIB))  # 64 ran out: limit 32
    # 1 MiB a sample: 15/16 of 40 MiB holds 37, and 37 is below the failure.
    assert measured(memory, 32) == 37


def test_a_measured_size_never_reaches_a_failure_while_the_room_stays() -> None:
    memory = failed_with_room(Room(100 * MIB))
    # The room would hold 93, but 64 ran out with this room: stay below it.
    assert {measured(memory, 32) for _ in range(5)} == {63}


def test_a_measured_size_grows_at_most_four_times_the_chunk_measured() -> None:
    room = Room(100 * MIB)
    memory = failed_with_room(room)
    room.now = 1000 * MIB
    assert measured(memory, 8) == 32


def test_freed_memory_lifts_the_failure_and_the_next_call_runs_whole() -> None:
    room = Room(100 * MIB)
    memory = failed_with_room(room)
    measured(memory, 32)
    room.now = 200 * MIB  # memory was freed since 64 ran out
    assert memory.start(at(100), quick="q") == 100
    assert memory.whole == {"q"}


def test_a_room_grown_by_noise_does_not_lift_the_failure() -> None:
    room = Room(100 * MIB)
    memory = failed_with_room(room)
    measured(memory, 32)
    room.now = 106 * MIB
    assert memory.start(at(100)) == 63


def test_less_room_gives_smaller_chunks_at_the_next_call() -> None:
    room = Room(100 * MIB)
    memory = failed_with_room(room)
    measured(memory, 32)
    room.now = 20 * MIB
    assert memory.start(at(100)) == 18  # 15/16 of 20 MiB at 1 MiB a sample


def test_a_failure_of_a_measured_size_holds_the_shape_at_what_fitted() -> None:
    room = Room(100 * MIB)
    memory = failed_with_room(room)
    assert measured(memory, 32, mib_per_sample=0.5) == 63  # 187 by the measurement
    memory.failed(at(63), 63)  # it did not fit: back to 32
    memory.recovered(SHAPE, "cuda:0")
    # The measurement missed part of the cost: no size between 32 and 63 is tried
    # while the room stays as it is.
    assert {measured(memory, 32, mib_per_sample=0.5) for _ in range(5)} == {32}
    room.now = 200 * MIB  # memory was freed
    assert memory.start(at(100)) == 100


def test_a_smaller_chunk_does_not_replace_the_measurement() -> None:
    memory = failed_with_room(Room(40 * MIB))
    measured(memory, 32)
    # The remainder of a batch: 16 samples that took 32 MiB say less than the 32 did.
    assert measured(memory, 16, mib_per_sample=2.0) == 37


def test_a_peak_below_the_noise_counts_as_a_quarter_mib() -> None:
    memory = failed_with_room(Room(40 * MIB))
    # 4 samples that took nothing measurable: at most 64 KiB each, so the room
    # holds 600; the step from 4 allows 16.
    assert memory.fitted(at(4), 4, limited=True, peak=0) == 16


def test_a_new_shape_of_a_measured_group_starts_with_a_sixteenth_of_the_room() -> None:
    memory = failed_with_room(Room(64 * MIB))
    measured(memory, 32)  # 1 MiB a sample of 512 bytes: 2048 bytes per input byte
    other = CallShape(64, ("fn", "cpu", "float32", ((256,),)), GROUP, 1024)
    # A 16th of 60 MiB at 2 MiB a sample, by the group's cost per input byte.
    assert memory.start(other) == 1


def test_room_is_read_on_the_device_that_ran_out() -> None:
    room = Room(100 * MIB)
    memory = failed_with_room(room, "cuda:1")
    measured(memory, 32)
    assert room.asked == ["cuda:1", "cuda:1"]  # at the recovery, and at the success


def test_unmeasured_a_shape_whose_room_has_not_grown_never_tries_a_larger_chunk() -> None:
    memory = failed_with_room(Room(100 * MIB))
    limits = {memory.fitted(SHAPE, 32, limited=True) for _ in range(50)}
    assert limits == {32}


def test_unmeasured_a_shape_grows_at_once_in_proportion_to_the_room_freed() -> None:
    room = Room(100 * MIB)
    memory = failed_with_room(room, grow_after=1000)
    room.now = 250 * MIB
    assert memory.fitted(SHAPE, 32, limited=True) == 80


def test_without_a_room_reading_growth_waits_for_grow_after() -> None:
    memory = failed_with_room(Room(None), "mps", grow_after=2)
    sizes = [measured(memory, 32) for _ in range(2)]
    assert sizes == [32, 48]


def test_without_a_room_reader_growth_waits_for_grow_after() -> None:
    memory = SizeMemory(grow_after=2)
    memory.failed(SHAPE, 64)
    memory.recovered(SHAPE, "cuda:0")
    sizes = [measured(memory, 32) for _ in range(2)]
    assert sizes == [32, 48]


def test_a_batch_that_starts_whole_is_remembered_by_its_quick_key() -> None:
    memory = SizeMemory()
    memory.failed(SHAPE, 64)  # limit 32
    assert memory.start(at(20), quick="twenty") == 20
    assert memory.start(at(40), quick="forty") == 32
    assert memory.whole == {"twenty"}


def test_a_batch_that_starts_split_is_not_remembered() -> None:
    memory = SizeMemory()
    memory.failed(SHAPE, 64)  # limit 32
    assert memory.start(SHAPE, quick="q") == 32
    assert memory.whole == set()


def test_a_failure_forgets_every_batch_that_ran_whole() -> None:
    memory = SizeMemory()
    memory.failed(SHAPE, 64)
    memory.start(at(20), quick="q")
    memory.failed(CallShape(16, ("other",), GROUP, 512), 16)
    assert memory.whole == set()


# ---------------------------------------------------------------------------
# A room reading never overrules what just ran


def test_a_reading_too_low_after_a_chunk_fitted_does_not_shrink_it() -> None:
    room = Room(100 * MIB)
    memory = failed_with_room(room)
    assert measured(memory, 32) == 63
    # The chunk freed what it took, but the reading misses it (an allocator kept it).
    room.now = 2 * MIB
    assert measured(memory, 63) == 60  # 15/16 of 63: what just ran fits again
    assert memory.start(at(100)) == 60
    assert {measured(memory, 60) for _ in range(5)} == {60}


def test_the_room_s_fall_since_the_largest_chunk_ran_shrinks_by_what_it_holds() -> None:
    room = Room(100 * MIB)
    memory = failed_with_room(room)
    measured(memory, 32)
    room.now = 30 * MIB
    assert measured(memory, 63) == 60  # the largest that fitted, read at 30 MiB
    room.now = 20 * MIB  # something else took 10 MiB since
    assert memory.start(at(100)) == 60 - 10


def test_a_shape_shrinks_below_what_fitted_on_an_out_of_memory_error() -> None:
    room = Room(100 * MIB)
    memory = failed_with_room(room)
    measured(memory, 32)
    room.now = 2 * MIB
    measured(memory, 63)
    assert memory.failed(at(60), 60) == 30  # 60 fitted as 63 did: now memory is tighter
    memory.recovered(SHAPE, "cuda:0")
    # The reading is as low as it was: the halved chunk, not what it would hold.
    assert memory.start(at(100)) == 30
    room.now = 0  # and 2 MiB went since the recovery: 2 samples fewer
    assert memory.start(at(100)) == 28


def test_a_call_s_first_measurement_replaces_an_earlier_call_s_higher_one() -> None:
    room = Room(100 * MIB)
    memory = failed_with_room(room)
    # Other work ran beside this chunk: 4 MiB a sample, four times the cost.
    assert measured(memory, 32, mib_per_sample=4.0) == 30  # 15/16 of what fitted
    room.now = 200 * MIB
    assert memory.start(at(100)) == 46  # 15/16 of 200 MiB at 4 MiB a sample
    # The next call measures alone, a smaller chunk: its cost replaces the old one.
    renewed = memory.fitted(at(16), 16, limited=True, peak=16 * MIB, renew=True)
    assert renewed == 64  # at most four times the 16 measured, below 187
    assert memory.start(at(100)) == 64


def test_within_a_call_a_similar_chunk_keeps_the_higher_cost() -> None:
    room = Room(100 * MIB)
    memory = failed_with_room(room)
    measured(memory, 32, mib_per_sample=2.0)
    # 40 samples at 1 MiB: the measurement missed memory, the higher cost stays.
    assert measured(memory, 40) == 46  # 15/16 of 100 MiB at 2 MiB a sample


def test_a_chunk_as_large_as_the_failure_that_pinned_the_shape_unpins_it() -> None:
    room = Room(100 * MIB)
    memory = failed_with_room(room)
    measured(memory, 32)
    # A chunk sized from the measurement runs out: the shape holds at what fitted.
    assert memory.failed(at(63), 63) == 32
    memory.recovered(SHAPE, "cuda:0")
    assert memory.start(at(200)) == 32
    # Another call's chunk of that size fits after all (memory was freed meanwhile):
    # the failure no longer holds, and the room sizes the chunks again.
    measured(memory, 63)
    room.now = 400 * MIB
    assert memory.start(at(200)) == 200


def test_a_measured_chunk_that_ran_out_widens_its_device_s_margin_to_a_quarter() -> None:
    room = Room(100 * MIB)
    memory = failed_with_room(room)
    assert measured(memory, 32) == 63  # 15/16 of 100 MiB, below the failure at 64
    memory.failed(at(63), 63)
    memory.recovered(SHAPE, "cuda:0")
    # Memory is freed and every failure lifted: the room sizes the chunks again,
    # now leaving a quarter of it, on that device, for every shape.
    room.now = 200 * MIB
    assert memory.start(at(1000)) == 128  # four times the chunk measured: below 150
    assert measured(memory, 128) == 150  # 3/4 of 200 MiB at 1 MiB a sample
    other = CallShape(1000, ("other",), "g", 1)
    memory.failed(other, 1000)
    memory.recovered(other, "cuda:0")
    assert memory.fitted(other, 100, limited=True, peak=100 * MIB) == 150
    # Another device keeps the narrow margin.
    third = CallShape(1000, ("third",), "g2", 1)
    memory.failed(third, 1000)
    memory.recovered(third, "cuda:1")
    assert memory.fitted(third, 100, limited=True, peak=100 * MIB) == 187


def test_a_device_whose_heaps_fragment_is_sized_with_the_wide_margin_from_the_start() -> None:
    heaps = {"cpu": True, "cuda:0": False}
    memory = SizeMemory(grow_after=1, room=Room(100 * MIB), fragments=heaps.__getitem__)
    for device in ("cpu", "cuda:0"):
        shape = CallShape(1000, (device,), device, 1)
        memory.failed(shape, 1000)
        memory.recovered(shape, device)
        assert memory.fitted(shape, 100, limited=True, peak=100 * MIB) == (
            75 if device == "cpu" else 94  # what just ran, less a 16th
        )
