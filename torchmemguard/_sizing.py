"""Remember the largest chunk that fits, per shape of input."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from torchmemguard._fitting import (
    MARGIN,
    WIDE_MARGIN,
    CallShape,
    Learned,
    Measured,
    Patience,
    Recovery,
    fit,
    freed,
    grown,
    grown_with_room,
    usable,
)

RoomReader = Callable[[Any], "int | None"]
FragmentsReader = Callable[[Any], bool]

# The share of the room an unseen shape's first chunk takes by its group's cost, as
# a shape's cost per input byte can be many times another's (attention grows with
# the square of the length).
_PROBE = 16


@dataclass
class _Group:
    """What the shapes of one group share: the fit in input bytes, the device that last
    ran out, and the highest peak bytes per input byte measured."""

    fit: int | None = None
    device: Any = None
    ratio: float | None = None


class SizeMemory:
    """Largest chunk sizes that fit, keyed by call shape, bounded and thread-safe.

    A key names one shape of call (device, dtype and the non-batch shapes of
    the split tensors); a group gathers the keys of one device and dtype, so that
    what was learned for one shape gives a first guess for a shape not yet seen:
    a chunk that a 16th of the room holds at the group's highest measured cost
    per input byte, or else the group's fit in input bytes.

    On an out-of-memory error the chunk halves, or falls back to the largest
    size known to fit. What follows depends on what can be read (see
    :mod:`torchmemguard._fitting`): where a chunk's peak is measured and
    ``room(device)`` reads what the device could still give (CUDA and the CPU),
    the chunks are sized from them, with a margin that is wide on a device whose
    allocator's heaps fragment (``fragments(device)``) or where a sized chunk
    ran out; unmeasured, a shape grows with the room freed since its last
    failure; where not even the room can be read, after ``grow_after``
    successes at the limit. A room reading never overrules what just ran.
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
        self._longest_wait = grow_after * 64
        self._lock = threading.Lock()
        # Read without the lock on the hot path: an empty memory means "call as is".
        self.entries: OrderedDict[Hashable, Learned] = OrderedDict()
        self._groups: OrderedDict[Hashable, _Group] = OrderedDict()
        # The devices where a chunk sized from a measurement ran out, which size
        # their chunks with the wider margin from then on.
        self._wide: set[Any] = set()
        # The quick keys (of the caller's choosing: the batch's own shape) of the calls
        # that :meth:`start` let run whole: another call of the same key runs whole
        # without a look at the memory (:meth:`runs_whole`). Emptied whenever a limit
        # falls, so it never holds a decision that would now split.
        self.whole: set[Hashable] = set()

    def runs_whole(self, quick: Hashable) -> bool:
        """Whether a call of the quick key ``quick`` runs whole, as one did since the last
        failure; read without the lock."""
        return quick in self.whole

    def start(self, shape: CallShape, quick: Hashable = None) -> int:
        """The chunk size to try first for ``shape``'s batch.

        When it is the whole batch, ``quick`` (unless None) runs whole from now on
        (:meth:`runs_whole`), until a limit falls.
        """
        # The room and the heaps are read before the lock is taken: they read the device.
        entry = self.entries.get(shape.key)
        heaps = False
        if entry is not None:
            room = self._read_room(entry.device) if entry.measured else None
            heaps = room is not None and self._heaps(entry.device)
        else:
            group = self._groups.get(shape.group)
            measured = group is not None and group.ratio is not None
            room = self._read_room(self.device(shape)) if measured else None
        with self._lock:
            size = self._start(shape, room, heaps)
            if quick is not None and size >= shape.n:
                if len(self.whole) >= self.capacity:
                    self.whole.clear()
                self.whole.add(quick)
            return size

    def _start(self, shape: CallShape, room: int | None, heaps: bool) -> int:
        entry = self.entries.get(shape.key)
        if entry is not None:
            self.entries.move_to_end(shape.key)
            if entry.measured and room is not None:
                entry.limit = self._fit(entry, room, heaps)
            return min(shape.n, entry.limit)
        group = self._groups.get(shape.group)
        if group is None or group.fit is None or shape.bytes_per_sample <= 0:
            return shape.n
        if group.ratio is not None and room is not None:
            return max(1, min(shape.n, _probe(room, group.ratio, shape.bytes_per_sample)))
        return max(1, min(shape.n, group.fit // shape.bytes_per_sample))

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
        device = self.device(shape)
        room = None if peak is None else self._read_room(device)
        heaps = room is not None and self._heaps(device)
        with self._lock:
            nbytes = size * shape.bytes_per_sample
            group = self._groups.get(shape.group)
            if nbytes > (0 if group is None or group.fit is None else group.fit):
                self._set_fit(shape.group, nbytes)
            entry = self.entries.get(shape.key)
            if entry is None:
                if not limited and room is None:
                    return size
                entry = self._add(shape.key, size)
                entry.device = None if group is None else group.device
            if size > entry.good:
                # A new best: memory is looser than known, so try for more sooner.
                entry.good = size
                entry.patience.wait = self.grow_after
            if entry.bad is not None and size >= entry.bad:
                # What ran out fits now: the failure, and the hold it put on the shape,
                # no longer hold (the hold is lifted nowhere else once its room is gone).
                entry.lift()
            if peak is not None and room is not None:
                measured = self._measured(shape, entry, size, peak, renew)
                if size >= entry.good:
                    measured.good_room = room
                entry.limit = self._fit(entry, room, heaps)
            elif limited and size >= entry.limit:
                recovery = entry.recovery
                now = None if recovery is None else self._read_room(entry.device)
                if now is not None:
                    grown_to = grown_with_room(entry, now)
                    if grown_to is not None:
                        entry.limit = grown_to
                        if entry.bad is not None and grown_to >= entry.bad:
                            entry.bad = None
                elif entry.patience.succeeded():
                    entry.limit = grown(entry)
            return entry.limit

    def _measured(
        self, shape: CallShape, entry: Learned, size: int, peak: int, renew: bool
    ) -> Measured:
        measured = entry.measured
        if measured is None:
            measured = entry.measured = Measured(cost=0.0, size=0)
        measured.take(size, peak, renew)
        if shape.bytes_per_sample > 0:
            ratio = measured.cost / shape.bytes_per_sample
            group = self._group(shape.group)
            group.ratio = max(ratio, group.ratio or 0.0)
        return measured

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
            group = self._group(shape.group)
            group.device = device
            entry = self.entries.get(shape.key)
            if entry is None:
                return None
            entry.device = device
            # A failure after a measurement: the measurement, or the margin, missed
            # part of the cost.
            if entry.measured is not None:
                entry.measured.pinned = True
                self._wide.add(device)
            elif measurable and room is not None and entry.bad:
                probe = entry.bad // _PROBE
                if group.ratio is not None and shape.bytes_per_sample > 0:
                    probe = _probe(room, group.ratio, shape.bytes_per_sample)
                entry.limit = max(1, min(entry.limit, probe))
            entry.recovery = None if room is None else Recovery(room, entry.limit)
            return entry.limit if measurable else None

    def failed(self, shape: CallShape, size: int) -> int:
        """Record that a chunk of ``size`` ran out of memory; return the next size."""
        with self._lock:
            entry = self.entries.get(shape.key) or self._add(shape.key, size)
            entry.patience.streak = 0
            entry.bad = size if entry.bad is None else min(entry.bad, size)
            entry.recovery = None
            if 0 < entry.good < size:
                # A try above the known fit failed: go back to what fits, and wait
                # twice as long before the next try.
                entry.patience.tried_and_failed(self._longest_wait)
                entry.limit = entry.good
            else:
                # What fitted before does not fit now: memory is tighter than known.
                entry.good = 0
                if entry.measured is not None:
                    entry.measured.good_room = None
                entry.limit = max(1, size // 2)
            fit = entry.limit * shape.bytes_per_sample
            group = self._groups.get(shape.group)
            if fit > 0 and (group is None or group.fit is None or group.fit > fit):
                self._set_fit(shape.group, fit)
            self.whole.clear()
            return entry.limit

    def device(self, shape: CallShape) -> Any:
        """The device whose room sizes ``shape``'s chunks: the last to run out; None if unknown."""
        entry = self.entries.get(shape.key)
        if entry is not None and entry.device is not None:
            return entry.device
        group = self._groups.get(shape.group)
        return None if group is None else group.device

    def learned(self) -> dict[Hashable, int]:
        """The chunk size in use for each shape remembered, oldest first."""
        with self._lock:
            return {key: entry.limit for key, entry in self.entries.items()}

    def clear(self) -> None:
        """Forget everything learned."""
        with self._lock:
            # New containers, not emptied ones: a reader without the lock sees either.
            self.entries = OrderedDict()
            self._groups = OrderedDict()
            self._wide = set()
            self.whole = set()

    def _fit(self, entry: Learned, room: int, heaps: bool) -> int:
        """The measured regime's limit for ``room``, after lifting a failure that memory
        freed since has made void; ``heaps`` says the device's heaps fragment."""
        if freed(entry, room):
            entry.lift()
        wide = heaps or entry.device in self._wide
        return fit(entry, room, WIDE_MARGIN if wide else MARGIN)

    def _heaps(self, device: Any) -> bool:
        """Whether ``device``'s allocator serves large blocks from heaps that fragment.
        Read outside the lock: on the CPU it allocates and frees a block."""
        return self._fragments is not None and device is not None and self._fragments(device)

    def _read_room(self, device: Any) -> int | None:
        return None if self._room is None or device is None else self._room(device)

    def _add(self, key: Hashable, limit: int) -> Learned:
        entry = self.entries[key] = Learned(limit=limit, patience=Patience(self.grow_after))
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
            self.whole.clear()  # a forgotten shape starts from its group again
        return entry

    def _group(self, key: Hashable) -> _Group:
        """The record of group ``key``, made if new; the least recently made or fitted
        group is forgotten past the capacity."""
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group()
            if len(self._groups) > self.capacity:
                self._groups.popitem(last=False)
        return group

    def _set_fit(self, key: Hashable, nbytes: int) -> None:
        self._group(key).fit = nbytes
        self._groups.move_to_end(key)


def _probe(room: int, ratio: float, bytes_per_sample: int) -> int:
    """The samples that a 16th of ``room`` holds at ``ratio`` peak bytes per input byte."""
    return int(usable(room) / (_PROBE * ratio * bytes_per_sample))
