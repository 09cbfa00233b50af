"""The size memory: what chunk to try, how it shrinks, grows and transfers."""

from __future__ import annotations

import threading

from torchmemguard.sizing import SizeMemory

KEY = ("fn", "cpu", "float32", ((128,),))
GROUP = ("fn", "cpu", "float32")


def test_unknown_shape_starts_with_the_whole_batch() -> None:
    assert SizeMemory().start(KEY, GROUP, 64, 512) == 64


def test_failure_halves_the_chunk() -> None:
    memory = SizeMemory()
    assert memory.failed(KEY, GROUP, 64, 512) == 32
    assert memory.failed(KEY, GROUP, 32, 512) == 16


def test_learned_limit_caps_the_next_start() -> None:
    memory = SizeMemory()
    memory.failed(KEY, GROUP, 64, 512)
    memory.fitted(KEY, GROUP, 32, 512, limited=True)
    assert memory.start(KEY, GROUP, 100, 512) == 32
    assert memory.start(KEY, GROUP, 10, 512) == 10


def test_failed_probe_falls_back_to_the_known_fit() -> None:
    memory = SizeMemory(grow_after=1)
    memory.failed(KEY, GROUP, 64, 512)  # limit 32
    assert memory.fitted(KEY, GROUP, 32, 512, limited=True) == 48  # halfway to 64
    assert memory.failed(KEY, GROUP, 48, 512) == 32


def test_growth_waits_twice_as_long_after_a_failed_probe() -> None:
    memory = SizeMemory(grow_after=2)
    memory.failed(KEY, GROUP, 64, 512)
    limits = [memory.fitted(KEY, GROUP, 32, 512, limited=True) for _ in range(2)]
    assert limits == [32, 48]
    memory.failed(KEY, GROUP, 48, 512)
    limits = [memory.fitted(KEY, GROUP, 32, 512, limited=True) for _ in range(4)]
    assert limits == [32, 32, 32, 40]


def test_growth_doubles_when_no_failure_is_known() -> None:
    memory = SizeMemory(grow_after=1)
    memory.failed(KEY, GROUP, 64, 512)
    memory.fitted(KEY, GROUP, 64, 512, limited=False)  # memory was freed: 64 fits now
    assert memory.fitted(KEY, GROUP, 32, 512, limited=True) == 64


def test_converged_limit_probes_the_known_failure_itself() -> None:
    memory = SizeMemory(grow_after=1)
    memory.failed(KEY, GROUP, 64, 512)
    memory.fitted(KEY, GROUP, 32, 512, limited=True)  # probe 48
    assert memory.fitted(KEY, GROUP, 48, 512, limited=True) == 56  # halfway to 64
    memory.fitted(KEY, GROUP, 56, 512, limited=True)  # 60
    memory.fitted(KEY, GROUP, 60, 512, limited=True)  # 62
    memory.fitted(KEY, GROUP, 62, 512, limited=True)  # 63
    # Converged one below the failure: try the failure itself, and once it fits,
    # the failure is forgotten and the limit doubles.
    assert memory.fitted(KEY, GROUP, 63, 512, limited=True) == 64
    assert memory.fitted(KEY, GROUP, 64, 512, limited=True) == 128


def test_unlimited_success_does_not_count_towards_growth() -> None:
    memory = SizeMemory(grow_after=1)
    memory.failed(KEY, GROUP, 64, 512)
    assert memory.fitted(KEY, GROUP, 10, 512, limited=False) == 32


def test_failure_at_a_size_that_fitted_before_halves_it() -> None:
    memory = SizeMemory()
    memory.failed(KEY, GROUP, 64, 512)
    memory.fitted(KEY, GROUP, 32, 512, limited=True)
    assert memory.failed(KEY, GROUP, 32, 512) == 16


def test_new_shape_starts_in_proportion_to_bytes_per_sample() -> None:
    memory = SizeMemory()
    memory.failed(KEY, GROUP, 64, 512)
    memory.fitted(KEY, GROUP, 32, 512, limited=True)
    longer = ("fn", "cpu", "float32", ((256,),))
    assert memory.start(longer, GROUP, 64, 1024) == 16


def test_new_shape_of_another_group_starts_whole() -> None:
    memory = SizeMemory()
    memory.failed(KEY, GROUP, 64, 512)
    other = ("fn", "cpu", "float16")
    assert memory.start(("fn", "cpu", "float16", ((128,),)), other, 64, 256) == 64


def test_memory_is_bounded_least_recently_used_first() -> None:
    memory = SizeMemory(capacity=2)
    for shape in (1, 2, 3):
        memory.failed(("k", shape), GROUP, 64, 1)
    assert list(memory.learned()) == [("k", 2), ("k", 3)]


def test_lookup_refreshes_recency() -> None:
    memory = SizeMemory(capacity=2)
    memory.failed(("k", 1), GROUP, 64, 1)
    memory.failed(("k", 2), GROUP, 64, 1)
    memory.start(("k", 1), GROUP, 64, 1)
    memory.failed(("k", 3), GROUP, 64, 1)
    assert list(memory.learned()) == [("k", 1), ("k", 3)]


def test_clear_forgets_everything() -> None:
    memory = SizeMemory()
    memory.failed(KEY, GROUP, 64, 512)
    memory.clear()
    assert memory.learned() == {}
    assert memory.start(KEY, GROUP, 64, 512) == 64


def test_concurrent_updates_keep_the_memory_consistent() -> None:
    memory = SizeMemory(grow_after=1_000_000)
    keys = [("k", i) for i in range(8)]

    def work(key: tuple[str, int]) -> None:
        for _ in range(200):
            memory.failed(key, GROUP, 64, 1)
            memory.fitted(key, GROUP, 32, 1, limited=True)

    threads = [threading.Thread(target=work, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert memory.learned() == {key: 32 for key in keys}


def test_group_guess_is_at_least_one_sample() -> None:
    memory = SizeMemory()
    memory.failed(KEY, GROUP, 2, 512)  # fits 1 x 512 bytes
    assert memory.start(("other",), GROUP, 64, 1024) == 1


def test_new_shape_with_no_bytes_per_sample_starts_whole() -> None:
    memory = SizeMemory()
    memory.failed(KEY, GROUP, 64, 512)
    assert memory.start(("fn", "cpu", "float32", ((0,),)), GROUP, 64, 0) == 64


def test_a_new_best_fit_brings_the_wait_back_to_grow_after() -> None:
    memory = SizeMemory(grow_after=1)
    memory.failed(KEY, GROUP, 64, 512)  # limit 32
    memory.fitted(KEY, GROUP, 32, 512, limited=True)  # probe 48
    memory.failed(KEY, GROUP, 48, 512)  # back to 32, wait 2
    memory.fitted(KEY, GROUP, 40, 512, limited=False)  # 40 fits: looser than known
    assert memory.fitted(KEY, GROUP, 32, 512, limited=True) == 40


def test_a_failure_restarts_the_count_towards_growth() -> None:
    memory = SizeMemory(grow_after=2)
    memory.failed(KEY, GROUP, 64, 512)  # limit 32
    memory.fitted(KEY, GROUP, 32, 512, limited=True)  # 1 of 2
    memory.failed(KEY, GROUP, 32, 512)  # tighter: limit 16
    assert memory.fitted(KEY, GROUP, 16, 512, limited=True) == 16


def test_the_smallest_failure_is_remembered() -> None:
    memory = SizeMemory(grow_after=1)
    memory.failed(KEY, GROUP, 48, 512)  # bad 48
    memory.failed(KEY, GROUP, 64, 512)  # a larger failure keeps bad at 48
    assert memory.fitted(KEY, GROUP, 32, 512, limited=True) == 40  # halfway to 48


def test_the_wait_between_probes_is_capped() -> None:
    memory = SizeMemory(grow_after=1)
    memory.failed(KEY, GROUP, 64, 512)
    for _ in range(10):
        while (limit := memory.fitted(KEY, GROUP, 32, 512, limited=True)) == 32:
            pass
        memory.failed(KEY, GROUP, limit, 512)  # every probe fails
    waits = 1
    while memory.fitted(KEY, GROUP, 32, 512, limited=True) == 32:
        waits += 1
    assert waits == 64  # grow_after * 64


def test_a_failure_never_raises_the_group_fit() -> None:
    memory = SizeMemory()
    memory.failed(("a",), GROUP, 8, 512)  # fits 4 x 512 bytes
    memory.failed(("b",), GROUP, 64, 512)  # limit 32, but the group keeps 4
    assert memory.start(("c",), GROUP, 64, 512) == 4


def test_group_memory_is_bounded_least_recently_updated_first() -> None:
    memory = SizeMemory(capacity=2)
    memory.fitted(("a",), "g1", 4, 1, limited=True)
    memory.fitted(("b",), "g2", 4, 1, limited=True)
    memory.fitted(("a",), "g1", 8, 1, limited=True)  # g1 refreshed
    memory.fitted(("c",), "g3", 4, 1, limited=True)  # evicts g2
    assert memory.start(("new1",), "g1", 64, 1) == 8
    assert memory.start(("new2",), "g2", 64, 1) == 64


MIB = 2**20


def read(*rooms: int | None) -> list[object]:
    """A room reader that answers ``rooms`` in turn, recording the devices asked about."""
    asked: list[object] = []
    answers = iter(rooms)

    def room(device: object) -> int | None:
        asked.append(device)
        return next(answers)

    room.asked = asked  # type: ignore[attr-defined]
    return room  # type: ignore[return-value]


def test_a_shape_whose_room_has_not_grown_never_tries_a_larger_chunk() -> None:
    memory = SizeMemory(grow_after=1)
    memory.failed(KEY, GROUP, 64, 512)
    memory.noted_room(KEY, GROUP, "cuda:0", 100 * MIB)
    room = read(*[100 * MIB] * 50)
    limits = {memory.fitted(KEY, GROUP, 32, 512, True, room) for _ in range(50)}  # type: ignore[arg-type]
    assert limits == {32}


def test_room_is_read_on_the_device_that_ran_out() -> None:
    memory = SizeMemory(grow_after=1)
    memory.failed(KEY, GROUP, 64, 512)
    memory.noted_room(KEY, GROUP, "cuda:1", 100 * MIB)
    room = read(100 * MIB)
    memory.fitted(KEY, GROUP, 32, 512, True, room)  # type: ignore[arg-type]
    assert room.asked == ["cuda:1"]  # type: ignore[attr-defined]


def test_a_shape_grows_at_once_in_proportion_to_the_room_freed() -> None:
    memory = SizeMemory(grow_after=1000)
    memory.failed(KEY, GROUP, 64, 512)  # limit 32
    memory.noted_room(KEY, GROUP, "cuda:0", 100 * MIB)
    assert memory.fitted(KEY, GROUP, 32, 512, True, read(250 * MIB)) == 80  # type: ignore[arg-type]


def test_growth_from_freed_room_does_not_compound() -> None:
    memory = SizeMemory(grow_after=1)
    memory.failed(KEY, GROUP, 64, 512)
    memory.noted_room(KEY, GROUP, "cuda:0", 100 * MIB)
    room = read(*[200 * MIB] * 3)
    sizes = [memory.fitted(KEY, GROUP, size, 512, True, room) for size in (32, 64, 64)]  # type: ignore[arg-type]
    assert sizes == [64, 64, 64]


def test_a_little_more_room_is_noise_not_growth() -> None:
    memory = SizeMemory(grow_after=1)
    memory.failed(KEY, GROUP, 64, 512)
    memory.noted_room(KEY, GROUP, "cuda:0", 100 * MIB)
    assert memory.fitted(KEY, GROUP, 32, 512, True, read(106 * MIB)) == 32  # type: ignore[arg-type]


def test_without_a_room_reading_growth_waits_for_grow_after() -> None:
    memory = SizeMemory(grow_after=2)
    memory.failed(KEY, GROUP, 64, 512)
    memory.noted_room(KEY, GROUP, "mps", None)
    room = read(None, None)
    sizes = [memory.fitted(KEY, GROUP, 32, 512, True, room) for _ in range(2)]  # type: ignore[arg-type]
    assert sizes == [32, 48]


def test_a_later_failure_notes_the_room_it_left() -> None:
    memory = SizeMemory(grow_after=1)
    memory.failed(KEY, GROUP, 64, 512)
    memory.noted_room(KEY, GROUP, "cuda:0", 100 * MIB)
    memory.fitted(KEY, GROUP, 32, 512, True, read(200 * MIB))  # type: ignore[arg-type]  # to 64
    memory.failed(KEY, GROUP, 64, 512)  # back to 32
    memory.noted_room(KEY, GROUP, "cuda:0", 200 * MIB)
    assert memory.fitted(KEY, GROUP, 32, 512, True, read(200 * MIB)) == 32  # type: ignore[arg-type]


def test_a_shape_sized_from_its_group_grows_with_the_groups_room() -> None:
    memory = SizeMemory(grow_after=1000)
    memory.failed(KEY, GROUP, 64, 512)
    memory.noted_room(KEY, GROUP, "cuda:0", 100 * MIB)
    other = ("fn", "cpu", "float32", ((256,),))
    assert memory.start(other, GROUP, 64, 1024) == 16  # half the bytes per sample
    assert memory.fitted(other, GROUP, 16, 1024, True, read(100 * MIB)) == 16  # type: ignore[arg-type]
    assert memory.fitted(other, GROUP, 16, 1024, True, read(300 * MIB)) == 48  # type: ignore[arg-type]
