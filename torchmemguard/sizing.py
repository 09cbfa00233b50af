"""Remember the largest chunk that fits, per shape of input."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

RoomReader = Callable[[Any], "int | None"]

# Room that must appear since the last failure before a shape grows: a 16th of
# the room then, and at least this, so that noise in the reading is not taken for
# memory that was freed.
_ROOM_NOISE = 2**20


@dataclass(frozen=True)
class CallShape:
    """One call as the size memory sees it."""

    n: int  # samples in the batch
    key: Hashable  # one shape of call: device, dtype and the non-batch shapes it splits
    group: Hashable  # the keys of one device and dtype, which share a first guess
    bytes_per_sample: int


@dataclass
class _Entry:
    limit: int  # the chunk size that calls of this shape use now
    patience: int  # successes at the limit before a larger chunk is tried
    good: int = 0  # largest chunk that fitted since the last surprise
    bad: int | None = None  # smallest chunk that ran out of memory above ``good``
    streak: int = 0  # successes at the limit since the last change
    # After a failure, where the device's free memory can be read: the device,
    # its room then, and the limit the failure left.
    room: tuple[Any, int, int] | None = None


class SizeMemory:
    """Largest chunk sizes that fit, keyed by call shape, bounded and thread-safe.

    A key names one shape of call (device, dtype and the non-batch shapes of
    the split tensors); a group gathers the keys of one device and dtype, so that
    what was learned for one shape gives a first guess for a shape not yet seen,
    in proportion to its bytes per sample.

    On an out-of-memory error the chunk halves, or falls back to the largest
    size known to fit.

    Where ``room(device)`` reads the device's free memory (its room), a shape
    grows only when the room has grown since its last failure: nothing freed,
    nothing to gain, and no error risked. It then grows at once, to its limit
    scaled by the room now over the room then.

    Elsewhere, after ``grow_after`` consecutive successes at the limit a larger
    chunk is tried: double, or halfway to the smallest known failure (that
    failure itself, once the two are next to each other). Each failed try
    doubles the number of successes needed before the next, so a memory-bound
    shape costs few errors however long the service runs; a try that succeeds
    brings the wait back to ``grow_after``.
    """

    def __init__(
        self, capacity: int = 1024, grow_after: int = 16, room: RoomReader | None = None
    ) -> None:
        self.capacity = capacity
        self.grow_after = grow_after
        self._room = room
        self._max_patience = grow_after * 64
        self._lock = threading.Lock()
        # Read without the lock on the hot path: an empty memory means "call as is".
        self.entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._groups: OrderedDict[Hashable, int] = OrderedDict()
        # The latest room noted for each group (device, room): a shape that only
        # ever used a size transferred from its group grows from it.
        self._rooms: dict[Hashable, tuple[Any, int]] = {}
        # The smallest limit of any shape: a batch no larger runs whole for any shape
        # that has a limit. Also read without the lock.
        self.floor = 0
        # The quick keys (of the caller's choosing: the batch's own shape) of the calls
        # that :meth:`start` let run whole: another call of the same key runs whole
        # without a look at the memory. Read without the lock; emptied whenever a
        # limit falls, so it never holds a decision that would now split.
        self.whole: set[Hashable] = set()

    def start(self, shape: CallShape, quick: Hashable = None) -> int:
        """The chunk size to try first for ``shape``'s batch.

        When it is the whole batch, ``quick`` (unless None) joins :attr:`whole`.
        """
        with self._lock:
            size = self._start(shape)
            if quick is not None and size >= shape.n:
                if len(self.whole) >= self.capacity:
                    self.whole.clear()
                self.whole.add(quick)
            return size

    def _start(self, shape: CallShape) -> int:
        entry = self.entries.get(shape.key)
        if entry is not None:
            self.entries.move_to_end(shape.key)
            return min(shape.n, entry.limit)
        fit = self._groups.get(shape.group)
        if fit is None or shape.bytes_per_sample <= 0:
            return shape.n
        return max(1, min(shape.n, fit // shape.bytes_per_sample))

    def fitted(self, shape: CallShape, size: int, limited: bool) -> int:
        """Record that a chunk of ``size`` fitted; return the limit to use next.

        ``limited`` says the chunk was cut to the limit from a larger batch: only
        such successes count towards trying a larger chunk.
        """
        with self._lock:
            group, nbytes = shape.group, size * shape.bytes_per_sample
            if nbytes > self._groups.get(group, 0):
                self._set_group(group, nbytes)
            entry = self.entries.get(shape.key)
            if entry is None:
                if not limited:
                    return size
                entry = self._add(shape.key, size)
                found = self._rooms.get(group)
                if found is not None:
                    entry.room = (*found, size)
            if size > entry.good:
                # A new best: memory is looser than known, so try for more sooner.
                entry.good = size
                entry.patience = self.grow_after
            if entry.bad is not None and size >= entry.bad:
                entry.bad = None
            if limited and size >= entry.limit:
                now = None if entry.room is None else self._read_room(entry.room[0])
                if now is not None and entry.room is not None:
                    self._grow_with_room(entry, now, *entry.room[1:])
                else:
                    entry.streak += 1
                    if entry.streak >= entry.patience:
                        entry.streak = 0
                        entry.limit = self._grown(entry)
                        self._refloor()
            return entry.limit

    def recovered(self, shape: CallShape, device: Any) -> None:
        """Note the room ``device`` has after recovering from a failure of ``shape``."""
        room = self._read_room(device)
        with self._lock:
            entry = self.entries.get(shape.key)
            if entry is not None:
                entry.room = None if room is None else (device, room, entry.limit)
            if room is None:
                self._rooms.pop(shape.group, None)
            else:
                self._rooms[shape.group] = (device, room)

    def failed(self, shape: CallShape, size: int) -> int:
        """Record that a chunk of ``size`` ran out of memory; return the next size."""
        with self._lock:
            entry = self.entries.get(shape.key) or self._add(shape.key, size)
            entry.streak = 0
            entry.bad = size if entry.bad is None else min(entry.bad, size)
            if 0 < entry.good < size:
                # A try above the known fit failed: go back to what fits, and wait
                # twice as long before the next try.
                entry.patience = min(entry.patience * 2, self._max_patience)
                entry.limit = entry.good
            else:
                # What fitted before does not fit now: memory is tighter than known.
                entry.good = 0
                entry.limit = max(1, size // 2)
            fit = entry.limit * shape.bytes_per_sample
            if fit > 0 and self._groups.get(shape.group, fit + 1) > fit:
                self._set_group(shape.group, fit)
            self._refloor()
            self.whole.clear()
            return entry.limit

    def learned(self) -> dict[Hashable, int]:
        """The chunk size in use for each shape remembered, oldest first."""
        with self._lock:
            return {key: entry.limit for key, entry in self.entries.items()}

    def clear(self) -> None:
        """Forget everything learned."""
        with self._lock:
            self.entries.clear()
            self._groups.clear()
            self._rooms.clear()
            self.whole.clear()
            self.floor = 0

    def _read_room(self, device: Any) -> int | None:
        return None if self._room is None else self._room(device)

    def _add(self, key: Hashable, limit: int) -> _Entry:
        entry = self.entries[key] = _Entry(limit=limit, patience=self.grow_after)
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
            self.whole.clear()  # a forgotten shape starts from its group again
        self._refloor()
        return entry

    def _refloor(self) -> None:
        self.floor = min((entry.limit for entry in self.entries.values()), default=0)

    def _grow_with_room(self, entry: _Entry, now: int, then: int, fit: int) -> None:
        if now <= then + max(then // 16, _ROOM_NOISE):
            return
        grown = fit * now // max(then, 1)
        if grown > entry.limit:
            entry.limit = grown
            if entry.bad is not None and grown >= entry.bad:
                entry.bad = None
            self._refloor()

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
            self._rooms.pop(dropped, None)
