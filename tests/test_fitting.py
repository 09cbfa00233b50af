"""The sizing regimes on their own: each record and rule of ``torchmemguard._fitting``."""

from __future__ import annotations

import copy

from torchmemguard._fitting import (
    Learned,
    Measured,
    Patience,
    Recovery,
    fit,
    freed,
    grown,
    grown_with_room,
)

MIB = 2**20


def learned(**fields: object) -> Learned:
    return Learned(limit=fields.pop("limit", 32), patience=Patience(4), **fields)  # type: ignore[arg-type]


# The measured regime


def test_a_measurement_of_a_smaller_chunk_tells_nothing_within_a_call() -> None:
    measured = Measured(cost=MIB, size=32)
    measured.take(16, 64 * MIB, renew=False)
    assert (measured.cost, measured.size) == (MIB, 32)


def test_a_chunk_of_about_the_same_size_keeps_the_higher_cost() -> None:
    measured = Measured(cost=2 * MIB, size=32)
    measured.take(40, 40 * MIB, renew=False)
    assert (measured.cost, measured.size) == (2 * MIB, 40)


def test_a_chunk_twice_as_large_or_a_call_s_first_replaces_the_cost() -> None:
    measured = Measured(cost=2 * MIB, size=32)
    measured.take(64, 64 * MIB, renew=False)
    assert measured.cost == MIB
    measured.take(8, 16 * MIB, renew=True)
    assert (measured.cost, measured.size) == (2 * MIB, 8)


def test_a_peak_too_small_to_tell_counts_as_a_quarter_mib() -> None:
    measured = Measured(cost=0.0, size=0)
    measured.take(4, 0, renew=False)
    assert measured.cost == MIB / 16


def test_the_fit_is_the_room_less_its_margin_at_the_measured_cost() -> None:
    shape = learned(measured=Measured(cost=MIB, size=32))
    assert fit(shape, 100 * MIB, margin=16) == 93
    assert fit(shape, 100 * MIB, margin=4) == 75


def test_the_fit_is_at_most_four_times_the_chunk_measured_and_below_a_failure() -> None:
    assert fit(learned(measured=Measured(cost=MIB, size=8)), 1000 * MIB, 16) == 32
    assert fit(learned(bad=20, measured=Measured(cost=MIB, size=8)), 1000 * MIB, 16) == 19


def test_a_step_of_less_than_an_eighth_above_what_fitted_is_not_taken() -> None:
    shape = learned(good=16, measured=Measured(cost=MIB, size=16))
    assert fit(shape, 19 * MIB, 16) == 16  # 17 fits the room: a step of one, not taken
    assert fit(shape, 20 * MIB, 16) == 18  # 18 is an eighth more: taken


def test_a_pinned_shape_holds_at_what_fitted() -> None:
    shape = learned(good=30, measured=Measured(cost=MIB, size=30, pinned=True))
    assert fit(shape, 100 * MIB, 16) == 30


def test_what_just_ran_is_a_floor_less_what_the_room_fell_since() -> None:
    shape = learned(good=64, measured=Measured(cost=MIB, size=64, good_room=30 * MIB))
    assert fit(shape, 2 * MIB, 16) == 60 - 28  # 15/16 of 64, less 28 MiB at 1 MiB each
    assert fit(shape, 30 * MIB, 16) == 60  # a reading that misses memory shrinks nothing


def test_since_a_failure_the_floor_is_the_chunk_chosen_then_less_the_room_s_fall() -> None:
    shape = learned(recovery=Recovery(10 * MIB, 20), measured=Measured(cost=MIB, size=40))
    assert fit(shape, 8 * MIB, 16) == 18


def test_the_fit_changes_nothing_it_is_given() -> None:
    shape = learned(bad=50, recovery=Recovery(MIB, 20), measured=Measured(cost=MIB, size=40))
    before = copy.deepcopy(shape)
    fit(shape, 500 * MIB, 16)
    assert shape == before


def test_memory_freed_past_the_noise_since_the_recovery_voids_the_failure() -> None:
    shape = learned(bad=50, recovery=Recovery(100 * MIB, 20), measured=Measured(MIB, 40))
    assert not freed(shape, 106 * MIB)  # within a 16th: noise
    assert freed(shape, 107 * MIB)
    shape.measured.pinned = True  # type: ignore[union-attr]
    shape.lift()
    assert (shape.bad, shape.recovery, shape.measured.pinned) == (None, None, False)  # type: ignore[union-attr]


# Room growth


def test_unmeasured_the_limit_grows_in_proportion_to_the_room_freed() -> None:
    shape = learned(limit=10, recovery=Recovery(100 * MIB, 10))
    assert grown_with_room(shape, 105 * MIB) is None  # noise
    assert grown_with_room(shape, 250 * MIB) == 25


# Patience


def test_patience_tries_a_larger_chunk_after_its_wait() -> None:
    patience = Patience(3)
    assert [patience.succeeded() for _ in range(6)] == [False, False, True] * 2


def test_a_failed_try_doubles_the_wait_up_to_the_longest() -> None:
    patience = Patience(3)
    patience.tried_and_failed(longest=8)
    assert patience.wait == 6
    patience.tried_and_failed(longest=8)
    assert patience.wait == 8


def test_a_try_doubles_or_goes_halfway_to_the_failure_then_to_it() -> None:
    assert grown(learned(limit=16)) == 32
    assert grown(learned(limit=16, bad=32)) == 24
    assert grown(learned(limit=31, bad=32)) == 32
