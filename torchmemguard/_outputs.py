"""What a split call's chunks returned: kept as they come, filled into the whole
batch's output where they can be, and merged once every chunk ran."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from torchmemguard._classify import is_oom
from torchmemguard._merging import FIRST, Merger

Recovering = Callable[[Callable[[], Any]], Any]


class Outputs:
    """The outputs of one call's chunks so far, and where the next chunk starts.

    ``merger`` checks and merges them (None: the user's merge hook, whose outputs
    are kept as they are). The run passes in, at each use, ``recovering(make)``,
    which makes the whole output's memory, once more after a recovery where it
    runs out, and ``noted``, which counts an out-of-memory error that ends filling
    in. They are not kept: a run and its outputs must not refer to each other,
    or the outputs would outlive the call until a garbage collection.
    """

    def __init__(self, n: int, merger: Merger | None) -> None:
        self.n = n
        self.merger = merger
        self.clear()

    def clear(self) -> None:
        """Forget every output: the call starts again from its first row."""
        self.pieces: list[Any] = []
        self.sizes: list[int] = []
        self.whole: Any = None  # the whole batch's output, as the chunks fill it in
        self.first: Any = FIRST  # the first chunk's output, or its rows in ``whole``
        self.offset = 0

    def add(
        self,
        output: Any,
        size: int,
        recovering: Recovering,
        noted: Callable[[BaseException], None],
    ) -> None:
        """Keep the ``output`` of the chunk of ``size`` samples from :attr:`offset`."""
        merger = self.merger
        if (size == self.n and self.offset == 0) or merger is None:
            self.pieces.append(output)
        else:
            # Stop at the first chunk whose output shows that the chunks cannot merge.
            merger.check(output, size, self.first, self.sizes[0] if self.sizes else 0)
            self._keep(merger, output, size, recovering, noted)
        self.sizes.append(size)
        self.offset += size

    def _keep(
        self,
        merger: Merger,
        output: Any,
        size: int,
        recovering: Recovering,
        noted: Callable[[BaseException], None],
    ) -> None:
        """Keep a chunk's output: copied into the whole batch's where it fills in (see
        :meth:`Merger.whole_of`), as it is otherwise."""
        if self.whole is None and not self.pieces:
            try:
                self.whole = recovering(lambda: merger.whole_of(output, size, self.n))
            except Exception as exc:
                if not is_oom(exc):
                    raise
                noted(exc)  # the chunks are kept apart, and merged at the end
        if self.whole is not None:
            if merger.fill(self.whole, output, self.offset, size):
                if self.first is FIRST:
                    self.first = merger.rows(self.whole, 0, size)
                return
            # The chunks so far, as views of their rows, and this one and the next apart.
            starts = itertools.accumulate(self.sizes[:-1], initial=0)
            rows = zip(starts, self.sizes, strict=True)
            self.pieces = [merger.rows(self.whole, start, count) for start, count in rows]
            self.whole = None
        if self.first is FIRST:
            self.first = output
        self.pieces.append(output)

    def merged(self, hook: Callable[[list[Any]], Any] | None, recovering: Recovering) -> Any:
        """The whole batch's output: filled in, or merged now (by ``hook`` where the
        merger is the user's). An out-of-memory error of the merge passes through."""
        if self.whole is not None:
            return self.whole
        merger, pieces = self.merger, self.pieces
        if merger is not None:
            return recovering(lambda: merger.merge(pieces, self.sizes))
        assert hook is not None
        return recovering(lambda: hook(pieces))
