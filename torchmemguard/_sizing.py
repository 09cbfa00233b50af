"""Remember the largest chunk that fits, per shape of input."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, NamedTuple

RoomReader = Callable[[Any], "int | None"]
FragmentsReader = Callable[[Any], bool]

# Room that must appear since a failure before its size is tried again: a 16th
# of the room then, and at least this, so that noise in the reading is not taken
# for memory that was freed.
_ROOM_NOISE = 2**20
# Sizing from a measured peak: the share of the room a chunk may take (the rest is
# the margin for what the measurement missed), how many times the measured chunk
# the next one may be, and the share of the room an unseen shape's first chunk
# takes by its group's cost, as a shape's cost per input byte can be many times
# another's (attention grows with the square of the length). A peak below
# _LEAST is too small to tell a chunk's cost from the noise of the reading.
_MARGIN = 16  # chunks take at most 15/16 of the room
# The margin of a device whose allocator's heaps fragment, or where a chunk sized
# from a measurement ran out: chunks take at most 3/4 of the room.
_WIDE_MARGIN = 4
_STEP = 4
_PROBE = 16
_LEAST = 256 * 2**10


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
class _Entry:
    limit: int  # the chunk size that calls of this shape use now
    patience: int  # successes at the limit before a larger chunk is tried
    good: int = 0  # largest chunk that fitted since the last surprise
    bad: int | None = None  # smallest chunk that ran out of memory above ``good``
    streak: int = 0  # successes at the limit since the last change
    device: Any = None  # the device whose room sizes the chunks: the last to run out
    # Its room after recovering from the failure of ``bad``, and the limit then.
    bad_room: int | None = None
    fit_then: int = 0
    # Bytes per sample at the peak of the largest chunk measured, and its size.
    cost: float = 0.0
    measured: int = 0
    pinned: bool = False  # a chunk sized from the measurement ran out: hold at ``good``
    good_room: int | None = None  # the room read after the latest chunk of ``good`` fitted


class SizeMemory:
    """Largest chunk sizes that fit, keyed by call shape, bounded and thread-safe.

    A key names one shape of call (device, dtype and the non-batch shapes of
    the split tensors); a group gathers the keys of one device and dtype, so that
    what was learned for one shape gives a first guess for a shape not yet seen.

    On an out-of-memory error the chunk halves, or falls back to the largest
    size known to fit.

    Where a chunk's peak memory is measured and ``room(device)`` reads what the
    device could still give (CUDA and the CPU), the next chunks are sized from
    them: as many samples as 15/16 of the room holds at the cost per sample of
    the latest call's largest chunks measured (the highest of those within a
    factor of two of the largest), at most four times that chunk, and below a
    size that ran out until the room has grown past what it was then. A
    failure of a chunk sized so holds the shape at the largest size that
    fitted, until then too, and widens its device's margin for every shape
    from then on: 3/4 of the room instead of 15/16. The margin is as wide
    from the start on a device whose allocator serves large blocks from heaps
    that fragment (``fragments(device)``: the CPU, with glibc's defaults). So a
    shape runs whole again as soon as memory is freed, and no sooner. A shape
    not seen yet, of a group with a measured cost, starts with a chunk that a
    16th of the room holds at the group's highest cost per input byte.

    A room reading never overrules what just ran. Below the largest size that
    fitted since the last failure, a shape shrinks only on an out-of-memory
    error, or by what the room fell since that size ran (memory that something
    else holds now): a reading that is low by as much every time is a reading
    that missed memory, not memory gone.

    Unmeasured, a shape grows when the room has grown since its last failure,
    in proportion to it; where not even the room can be read, after
    ``grow_after`` consecutive successes at the limit a larger chunk is tried:
    double, or halfway to the smallest known failure. Each failed try doubles
    the number of successes needed before the next, so a memory-bound shape
    costs few errors however long the service runs.
    """

    def __init__(
        self,
        capacity: int = 1024,
        grow_after: int = 16,
        room: RoomReader | None = None,
        fragments: FragmentsReader | None = None,
    ) -> None:
        self.capacity = capacity
        self.grow_after = grow_after
        self._room = room
        self._fragments = fragments
        self._max_patience = grow_after * 64
        self._lock = threading.Lock()
        # Read without the lock on the hot path: an empty memory means "call as is".
        self.entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        # Per group: the fit in input bytes, the device that last ran out, and the
        # highest peak bytes per input byte measured.
        self._groups: OrderedDict[Hashable, int] = OrderedDict()
        self._devices: dict[Hashable, Any] = {}
        self._ratios: dict[Hashable, float] = {}
        # The devices where a chunk sized from a measurement ran out, which size
        # their chunks with the wider margin from then on.
        self._wide: set[Any] = set()
        # The quick keys (of the caller's choosing: the batch's own shape) of the calls
        # that :meth:`start` let run whole: another call of the same key runs whole
        # without a look at the memory. Read without the lock; emptied whenever a
        # limit falls, so it never holds a decision that would now split.
        self.whole: set[Hashable] = set()

    def start(self, shape: CallShape, quick: Hashable = None) -> int:
        """The chunk size to try first for ``shape``'s batch.

        When it is the whole batch, ``quick`` (unless None) joins :attr:`whole`.
        """
        # The room is read before the lock is taken: it reads the device.
        entry = self.entries.get(shape.key)
        if entry is not None:
            room = self._read_room(entry.device) if entry.cost else None
        else:
            room = self._read_room(self.device(shape)) if shape.group in self._ratios else None
        with self._lock:
            size = self._start(shape, room)
            if quick is not None and size >= shape.n:
                if len(self.whole) >= self.capacity:
                    self.whole.clear()
                self.whole.add(quick)
            return size

    def _start(self, shape: CallShape, room: int | None) -> int:
        entry = self.entries.get(shape.key)
        if entry is not None:
            self.entries.move_to_end(shape.key)
            if entry.cost and room is not None:
                entry.limit = _fit(entry, room, self._margin(entry.device))
            return min(shape.n, entry.limit)
        fit = self._groups.get(shape.group)
        if fit is None or shape.bytes_per_sample <= 0:
            return shape.n
        ratio = self._ratios.get(shape.group)
        if ratio is not None and room is not None:
            return max(1, min(shape.n, _probe(room, ratio, shape.bytes_per_sample)))
        return max(1, min(shape.n, fit // shape.bytes_per_sample))

    def fitted(
        self,
        shape: CallShape,
        size: int,
        limited: bool,
        peak: int | None = None,
        renew: bool = False,
    ) -> int:
        """Record that a chunk of ``size`` fitted; return the limit to use next.

        ``limited`` says the chunk was cut to the limit from a larger batch: only
        such successes count towards trying a larger chunk. ``peak`` is the
        bytes the chunk took at its peak, where it was measured; ``renew`` says
        it is the call's first measurement, which replaces those of earlier calls.
        """
        room = None if peak is None else self._read_room(self.device(shape))
        with self._lock:
            group, nbytes = shape.group, size * shape.bytes_per_sample
            if nbytes > self._groups.get(group, 0):
                self._set_group(group, nbytes)
            entry = self.entries.get(shape.key)
            if entry is None:
                if not limited and room is None:
                    return size
                entry = self._add(shape.key, size)
                entry.device = self._devices.get(group)
            if size > entry.good:
                # A new best: memory is looser than known, so try for more sooner.
                entry.good = size
                entry.patience = self.grow_after
            if entry.bad is not None and size >= entry.bad:
                # What ran out fits now: the failure, and the hold it put on the shape,
                # no longer hold (the hold is lifted nowhere else once its room is gone).
                entry.bad = entry.bad_room = None
                entry.pinned = False
            if peak is not None and room is not None:
                self._measured(shape, entry, size, peak, renew)
                if size >= entry.good:
                    entry.good_room = room
                entry.limit = _fit(entry, room, self._margin(entry.device))
            elif limited and size >= entry.limit:
                now = None if entry.bad_room is None else self._read_room(entry.device)
                if now is not None and entry.bad_room is not None:
                    self._grow_with_room(entry, now, entry.bad_room)
                else:
                    entry.streak += 1
                    if entry.streak >= entry.patience:
                        entry.streak = 0
                        entry.limit = self._grown(entry)
            return entry.limit

    def _measured(self, shape: CallShape, entry: _Entry, size: int, peak: int, renew: bool) -> None:
        # Within a call, a smaller chunk than the one measured (the remainder of
        # the batch, or one cut after a failure) tells less: what a chunk takes
        # whatever its size weighs more in it. One of about the same size keeps
        # the higher cost of the two, and one twice as large replaces it. A
        # call's first measurement replaces those of earlier calls whatever its
        # size: a measurement that other work in the process inflated must not
        # size the chunks for good, and a smaller chunk only overstates the cost.
        if size < entry.measured and not renew:
            return
        cost = max(peak, _LEAST) / size
        if size < 2 * entry.measured and not renew:
            cost = max(cost, entry.cost)
        entry.cost, entry.measured = cost, size
        if shape.bytes_per_sample > 0:
            ratio = entry.cost / shape.bytes_per_sample
            self._ratios[shape.group] = max(ratio, self._ratios.get(shape.group, 0.0))

    def recovered(self, shape: CallShape, device: Any, measurable: bool = False) -> int | None:
        """Note the room ``device`` has after recovering from a failure of ``shape``.

        Where the chunks' peak can be measured on ``device`` and the shape has
        not been measured yet, the next chunk is a probe, returned: a 16th of
        the size that failed, or what a 16th of the room holds at the group's
        cost per input byte, so that what follows is sized from a measurement
        rather than by halving into further errors.
        """
        room = self._read_room(device)
        with self._lock:
            self._devices[shape.group] = device
            entry = self.entries.get(shape.key)
            if entry is None:
                return None
            entry.device, entry.bad_room = device, room
            # A failure after a measurement: the measurement, or the margin, missed
            # part of the cost.
            if entry.cost > 0:
                entry.pinned = True
                self._wide.add(device)
            if measurable and room is not None and not entry.cost and entry.bad:
                probe = entry.bad // _PROBE
                ratio = self._ratios.get(shape.group)
                if ratio is not None and shape.bytes_per_sample > 0:
                    probe = _probe(room, ratio, shape.bytes_per_sample)
                entry.limit = max(1, min(entry.limit, probe))
            entry.fit_then = entry.limit
            return entry.limit if measurable else None

    def failed(self, shape: CallShape, size: int) -> int:
        """Record that a chunk of ``size`` ran out of memory; return the next size."""
        with self._lock:
            entry = self.entries.get(shape.key) or self._add(shape.key, size)
            entry.streak = 0
            entry.bad = size if entry.bad is None else min(entry.bad, size)
            entry.bad_room = None
            if 0 < entry.good < size:
                # A try above the known fit failed: go back to what fits, and wait
                # twice as long before the next try.
                entry.patience = min(entry.patience * 2, self._max_patience)
                entry.limit = entry.good
            else:
                # What fitted before does not fit now: memory is tighter than known.
                entry.good, entry.good_room = 0, None
                entry.limit = max(1, size // 2)
            fit = entry.limit * shape.bytes_per_sample
            if fit > 0 and self._groups.get(shape.group, fit + 1) > fit:
                self._set_group(shape.group, fit)
            self.whole.clear()
            return entry.limit

    def device(self, shape: CallShape) -> Any:
        """The device whose room sizes ``shape``'s chunks: the last to run out; None if unknown."""
        entry = self.entries.get(shape.key)
        if entry is not None and entry.device is not None:
            return entry.device
        return self._devices.get(shape.group)

    def learned(self) -> dict[Hashable, int]:
        """The chunk size in use for each shape remembered, oldest first."""
        with self._lock:
            return {key: entry.limit for key, entry in self.entries.items()}

    def clear(self) -> None:
        """Forget everything learned."""
        with self._lock:
            self.entries.clear()
            self._groups.clear()
            self._devices.clear()
            self._ratios.clear()
            self._wide.clear()
            self.whole.clear()

    def _margin(self, device: Any) -> int:
        wide = device in self._wide or (
            self._fragments is not None and device is not None and self._fragments(device)
        )
        return _WIDE_MARGIN if wide else _MARGIN

    def _read_room(self, device: Any) -> int | None:
        return None if self._room is None or device is None else self._room(device)

    def _add(self, key: Hashable, limit: int) -> _Entry:
        entry = self.entries[key] = _Entry(limit=limit, patience=self.grow_after)
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
            self.whole.clear()  # a forgotten shape starts from its group again
        return entry

    @staticmethod
    def _grow_with_room(entry: _Entry, now: int, then: int) -> None:
        """Unmeasured: grow in proportion to the room freed since the last failure."""
        if now <= then + _noise(then):
            return
        grown = entry.fit_then * now // max(then, 1)
        if grown > entry.limit:
            entry.limit = grown
            if entry.bad is not None and grown >= entry.bad:
                entry.bad = None

    @staticmethod
    def _grown(entry: _Entry) -> int:
        if entry.bad is None:
            return entry.limit * 2
        # Halfway to the smallest known failure; next to it, that failure itself,
        # which fits again only if memory was freed.
        return max((entry.limit + entry.bad) // 2, entry.limit + 1)

    def _set_group(self, group: Hashable, nbytes: int) -> None:
        self._groups[group] = nbytes
        self._groups.move_to_end(group)
        if len(self._groups) > self.capacity:
            dropped, _ = self._groups.popitem(last=False)
            self._devices.pop(dropped, None)
            self._ratios.pop(dropped, None)


def _fit(entry: _Entry, room: int, margin: int) -> int:
    """The chunk that ``room`` holds, less a ``margin``th, at ``entry``'s measured cost,
    and never less than what fitted while the room stays."""
    if entry.bad_room is not None and room > entry.bad_room + _noise(entry.bad_room):
        # Memory was freed since the failure: what it showed no longer holds.
        entry.bad = entry.bad_room = None
        entry.pinned = False
    fit = min(int(_usable(room, margin) / entry.cost), _STEP * entry.measured)
    if entry.pinned and entry.good:
        fit = min(fit, entry.good)
    fit = max(fit, _floor(entry, room, margin))
    if entry.bad is not None:
        fit = min(fit, entry.bad - 1)
    return max(1, fit)


def _floor(entry: _Entry, room: int, margin: int) -> int:
    """The chunk that the room shows to fit by how it changed since the largest chunk
    that fitted ran: that chunk less a ``margin``th, as for a chunk sized from the room,
    less what the room's fall since holds at the measured cost (memory that
    something else holds now). Since a failure and before a chunk fitted: the
    chunk chosen after the failure, less what the room fell since the recovery.

    What just ran shows that about the memory it took is there, whatever a
    reading says: a reading can miss memory (a block an allocator keeps, a
    device's noisy free count) by about as much each time, so only its fall
    counts.
    """
    if entry.good and entry.good_room is not None:
        size, then = _usable(entry.good, margin), entry.good_room
    elif not entry.good and entry.bad_room is not None:
        size, then = entry.fit_then, entry.bad_room
    else:
        return 0
    return size - math.ceil(max(0, then - room) / entry.cost)


def _usable(room: int, margin: int = _MARGIN) -> int:
    """The share of ``room`` a chunk sized from a measurement may take: all but a ``margin``th."""
    return room - room // margin


def _probe(room: int, ratio: float, bytes_per_sample: int) -> int:
    """The samples that a 16th of ``room`` holds at ``ratio`` peak bytes per input byte."""
    return int(_usable(room) / (_PROBE * ratio * bytes_per_sample))


def _noise(room: int) -> int:
    """A change of a room reading too small to be memory freed."""
    return max(room // 16, _ROOM_NOISE)
