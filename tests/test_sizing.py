"""The size memory: what chunk to try, how it shrinks, grows and transfers."""

from __future__ import annotations

import threading

from torchmemguard.sizing import CallShape, SizeMemory

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


def test_a_shape_whose_room_has_not_grown_never_tries_a_larger_chunk() -> None:
    memory = failed_with_room(Room(100 * MIB))
    limits = {memory.fitted(SHAPE, 32, limited=True) for _ in range(50)}
    assert limits == {32}


def test_room_is_read_on_the_device_that_ran_out() -> None:
    room = Room(100 * MIB)
    memory = failed_with_room(room, "cuda:1")
    memory.fitted(SHAPE, 32, limited=True)
    assert room.asked == ["cuda:1", "cuda:1"]  # at the recovery, and at the success


def test_a_shape_grows_at_once_in_proportion_to_the_room_freed() -> None:
    room = Room(100 * MIB)
    memory = failed_with_room(room, grow_after=1000)
    room.now = 250 * MIB
    assert memory.fitted(SHAPE, 32, limited=True) == 80


def test_growth_from_freed_room_does_not_compound() -> None:
    room = Room(100 * MIB)
    memory = failed_with_room(room)
    room.now = 200 * MIB
    sizes = [memory.fitted(SHAPE, size, limited=True) for size in (32, 64, 64)]
    assert sizes == [64, 64, 64]


def test_a_little_more_room_is_noise_not_growth() -> None:
    room = Room(100 * MIB)
    memory = failed_with_room(room)
    room.now = 106 * MIB
    assert memory.fitted(SHAPE, 32, limited=True) == 32


def test_without_a_room_reading_growth_waits_for_grow_after() -> None:
    memory = failed_with_room(Room(None), "mps", grow_after=2)
    sizes = [memory.fitted(SHAPE, 32, limited=True) for _ in range(2)]
    assert sizes == [32, 48]


def test_without_a_room_reader_growth_waits_for_grow_after() -> None:
    memory = SizeMemory(grow_after=2)
    memory.failed(SHAPE, 64)
    memory.recovered(SHAPE, "cuda:0")
    sizes = [memory.fitted(SHAPE, 32, limited=True) for _ in range(2)]
    assert sizes == [32, 48]


def test_a_later_failure_notes_the_room_it_left() -> None:
    room = Room(100 * MIB)
    memory = failed_with_room(room)
    room.now = 200 * MIB
    memory.fitted(SHAPE, 32, limited=True)  # to 64
    memory.failed(SHAPE, 64)  # back to 32
    memory.recovered(SHAPE, "cuda:0")
    assert memory.fitted(SHAPE, 32, limited=True) == 32


def test_a_shape_sized_from_its_group_grows_with_the_groups_room() -> None:
    room = Room(100 * MIB)
    memory = failed_with_room(room, grow_after=1000)
    other = CallShape(64, ("fn", "cpu", "float32", ((256,),)), GROUP, 1024)
    assert memory.start(other) == 16  # half the bytes per sample
    assert memory.fitted(other, 16, limited=True) == 16
    room.now = 300 * MIB
    assert memory.fitted(other, 16, limited=True) == 48


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
