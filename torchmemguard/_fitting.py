"""One shape of call as the size memory sees it, what it knows of that shape, and the
three regimes that size the next chunk from it.

A :class:`Learned` record holds the limit in use, what fitted and what ran out,
and the room after the last failure's recovery (:class:`Recovery`). Then one
small object per regime, each owning its own fields:

- :class:`Measured`: a chunk's peak was measured and the room can be read. The
  next chunk is what the room holds at the measured cost (:func:`fit`).
- Room growth: the room can be read, no peak measured. The limit grows in
  proportion to the room freed since the last failure (:func:`grown_with_room`).
- :class:`Patience`: not even the room can be read. After some successes at
  the limit a larger chunk is tried (:func:`grown`), and each failed try
  doubles the wait.

:func:`fit` combines the measured regime's proposal with what fitted and what
failed, as tenacity's ``stop_any`` combines stops. Its bounds are the room at
the measured cost, the hold after a failure, the floor of what just ran, and
the failure above the fit. Everything here is pure or changes only the record
it is given: the size memory reads the devices and holds the lock.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, NamedTuple

# Room that must appear since a failure before its size is tried again: a 16th
# of the room then, and at least this, so that noise in the reading is not taken
# for memory that was freed.
ROOM_NOISE = 2**20
# Sizing from a measured peak: the share of the room a chunk may take (the rest is
# the margin for what the measurement missed), how many times the measured chunk
# the next one may be. A peak below LEAST is too small to tell a chunk's cost
# from the noise of the reading.
MARGIN = 16  # chunks take at most 15/16 of the room
# The margin of a device whose allocator's heaps fragment, or where a chunk sized
# from a measurement ran out: chunks take at most 3/4 of the room.
WIDE_MARGIN = 4
STEP = 4
LEAST = 256 * 2**10


class Group(NamedTuple):
    """The calls of one device and dtype (and instance, for a method guarded on its
    class), which share a first guess for shapes not seen yet."""

    scope: Hashable  # the instance, for a method guarded on its class; else None
    device: Any
    dtype: Any


class ShapeKey(NamedTuple):
    """One shape of call, as :meth:`SizeMemory.learned` names it: its group, and the
    shapes beyond the batch of the tensors it splits."""

    scope: Hashable
    device: Any
    dtype: Any
    shapes: tuple[Any, ...]

    def __str__(self) -> str:
        return f"{self.device} {self.dtype} {list(self.shapes)}"


@dataclass(frozen=True)
class CallShape:
    """One call as the size memory sees it."""

    n: int  # samples in the batch
    key: Hashable  # one shape of call: device, dtype and the non-batch shapes it splits
    group: Hashable  # the keys of one device and dtype, which share a first guess
    bytes_per_sample: int
    dtype: Any = None  # the batch's first tensor's dtype


@dataclass
class Recovery:
    """The room read after recovering from the last failure, and the limit chosen then."""

    room: int
    limit: int


@dataclass
class Measured:
    """The measured regime: the cost per sample at the peak of the largest chunk measured."""

    cost: float  # bytes per sample
    size: int  # the chunk measured
    good_room: int | None = None  # the room read after the latest chunk of ``good`` fitted
    pinned: bool = False  # a chunk sized from the measurement ran out: hold at ``good``

    def take(self, size: int, peak: int, renew: bool) -> None:
        """Take the peak of a chunk of ``size``; ``renew`` for a call's first measurement.

        Within a call, a smaller chunk than the one measured (the remainder of
        the batch, or one cut after a failure) tells less: what a chunk takes
        whatever its size weighs more in it. One of about the same size keeps
        the higher cost of the two, and one twice as large replaces it. A call's
        first measurement replaces those of earlier calls whatever its size: a
        measurement that other work in the process inflated must not size the
        chunks for good, and a smaller chunk only overstates the cost.
        """
        if size < self.size and not renew:
            return
        cost = max(peak, LEAST) / size
        if size < 2 * self.size and not renew:
            cost = max(cost, self.cost)
        self.cost, self.size = cost, size


@dataclass
class Patience:
    """The patience regime: successes at the limit needed before a larger chunk is tried."""

    wait: int
    streak: int = 0  # successes at the limit since the last change

    def succeeded(self) -> bool:
        """Count a success at the limit; whether it is time to try a larger chunk."""
        self.streak += 1
        if self.streak < self.wait:
            return False
        self.streak = 0
        return True

    def tried_and_failed(self, longest: int) -> None:
        """A try above the known fit failed: wait twice as long, at most ``longest``."""
        self.wait = min(self.wait * 2, longest)


@dataclass
class Learned:
    """What one shape of call taught the size memory."""

    limit: int  # the chunk size that calls of this shape use now
    patience: Patience
    device: Any = None  # the device whose room sizes the chunks: the last to run out
    good: int = 0  # largest chunk that fitted since the last surprise
    bad: int | None = None  # smallest chunk that ran out of memory above ``good``
    recovery: Recovery | None = None  # since the failure of ``bad``, where the room was read
    measured: Measured | None = None

    def lift(self) -> None:
        """Forget the failure above the fit, and the hold it put on the shape."""
        self.bad = self.recovery = None
        if self.measured is not None:
            self.measured.pinned = False


def freed(learned: Learned, room: int) -> bool:
    """Whether memory was freed since the failure of ``learned.bad``: the room grew past
    what it was after the recovery by more than the noise."""
    recovery = learned.recovery
    return recovery is not None and room > recovery.room + noise(recovery.room)


def fit(learned: Learned, room: int, margin: int) -> int:
    """The chunk that ``room``, less a ``margin``th, holds at the measured cost; never less
    than what fitted while the room stays, nor as much as what ran out."""
    measured = learned.measured
    assert measured is not None
    found = min(int(usable(room, margin) / measured.cost), STEP * measured.size)
    if measured.pinned and learned.good:
        found = min(found, learned.good)
    found = max(found, floor(learned, measured, room, margin))
    if learned.good < found < learned.good + max(1, learned.good // 8):
        # A step this small saves few calls and risks a failure on a reading's noise;
        # and a chunk of a new size costs some allocators memory of its own (oneDNN
        # keeps buffers for every batch shape it ran).
        found = learned.good
    if learned.bad is not None:
        found = min(found, learned.bad - 1)
    return max(1, found)


def floor(learned: Learned, measured: Measured, room: int, margin: int) -> int:
    """The chunk that the room shows to fit by how it changed since the largest chunk
    that fitted ran: that chunk less a ``margin``th, as for a chunk sized from the
    room, less what the room's fall since holds at the measured cost (memory that
    something else holds now). Since a failure and before a chunk fitted: the
    chunk chosen after the failure, less what the room fell since the recovery.

    What just ran shows that about the memory it took is there, whatever a
    reading says: a reading can miss memory (a block an allocator keeps, a
    device's noisy free count) by about as much each time, so only its fall
    counts.
    """
    if learned.good and measured.good_room is not None:
        size, then = usable(learned.good, margin), measured.good_room
    elif not learned.good and learned.recovery is not None:
        size, then = learned.recovery.limit, learned.recovery.room
    else:
        return 0
    return size - math.ceil(max(0, then - room) / measured.cost)


def grown_with_room(learned: Learned, now: int) -> int | None:
    """Unmeasured: the limit grown in proportion to the room freed since the last failure;
    None when the room has not grown past the noise."""
    recovery = learned.recovery
    assert recovery is not None
    if now <= recovery.room + noise(recovery.room):
        return None
    grown = recovery.limit * now // max(recovery.room, 1)
    return grown if grown > learned.limit else None


def grown(learned: Learned) -> int:
    """Patience's next try: double, or halfway to the smallest known failure; next to
    it, that failure itself, which fits again only if memory was freed."""
    if learned.bad is None:
        return learned.limit * 2
    return max((learned.limit + learned.bad) // 2, learned.limit + 1)


def usable(room: int, margin: int = MARGIN) -> int:
    """The share of ``room`` a chunk sized from a measurement may take: all but a ``margin``th."""
    return room - room // margin


def noise(room: int) -> int:
    """A change of a room reading too small to be memory freed."""
    return max(room // 16, ROOM_NOISE)
