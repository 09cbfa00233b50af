"""Allocator snapshots of unrecovered out-of-memory errors, opt in, in a bounded directory.

:func:`record_oom_snapshots` starts the recording of the CUDA allocator's
history; each time a guarded call then gives up with
:class:`~torchmemguard.OutOfMemoryError` on such a device, the post-mortem
(:mod:`torchmemguard._observability.postmortem`) writes a snapshot of the allocator to one
file of the directory, and only the newest ``keep`` snapshots stay there. A
snapshot that cannot be written is a warning in the log, never an error that
would hide the one being reported.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import os
import re
import threading
from pathlib import Path
from types import TracebackType

import torch

from torchmemguard import _device as devices
from torchmemguard._errors import check_int, raise_bad_arguments

logger = logging.getLogger("torchmemguard")

# torchmemguard-oom-20250301T101502.123456Z-pid4242-forward-0.pickle: a UTC time that
# sorts as text, the process, the function (letters, digits, "_" and "."), a counter.
_NAME = re.compile(r"torchmemguard-oom-(\d{8}T\d{6}\.\d{6}Z)-pid(\d+)-([\w.]+)-(\d+)\.pickle")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.]+")

_lock = threading.Lock()  # one recording at a time; snapshots written one at a time
_active: SnapshotRecorder | None = None
_counter = itertools.count()  # tells apart the snapshots of one microsecond


class SnapshotRecorder:
    """The recording started by :func:`record_oom_snapshots`: stop it with :meth:`stop`,
    or use it as a context manager."""

    def __init__(self, directory: Path, keep: int, max_entries: int, kind: str) -> None:
        self.directory = directory
        self.keep = keep
        self.max_entries = max_entries
        self.kind = kind  # the kind of device whose allocator is recorded

    @property
    def recording(self) -> bool:
        """Whether this recording is still under way."""
        return _active is self

    def stop(self) -> None:
        """Stop recording: torch's history recording is turned off and no more
        snapshots are written. The files stay. Stopping twice does nothing."""
        global _active
        with _lock:
            if _active is not self:
                return
            _active = None
            devices.record_history(self.kind, None)

    def snapshots(self) -> list[Path]:
        """The snapshot files in the directory, oldest first (those of other
        processes that write to the same directory included)."""
        return [self.directory / name for _, name in _snapshots(self.directory)]

    def __enter__(self) -> SnapshotRecorder:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "recording" if self.recording else "stopped"
        return (
            f"<SnapshotRecorder {state} {self.kind} into {str(self.directory)!r}, "
            f"keep={self.keep}, max_entries={self.max_entries}>"
        )

    def _take(self, function: str) -> str | None:
        """Write one snapshot for ``function``, then drop the oldest beyond ``keep``;
        its path, or ``None`` (and a warning) where it could not be written."""
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        safe = _UNSAFE.sub("_", function)[:80] or "call"
        name = f"torchmemguard-oom-{stamp}-pid{os.getpid()}-{safe}-{next(_counter)}.pickle"
        path = self.directory / name
        # Written under another name first: a file that matches the pattern is whole.
        partial = self.directory / f".{name}.partial"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            devices.dump_snapshot(self.kind, str(partial))
            os.replace(partial, path)
        except Exception as exc:  # the OOM being reported matters more than its snapshot
            with contextlib.suppress(OSError):
                partial.unlink()
            logger.warning(
                "torchmemguard: could not write the allocator snapshot of %s to %s: %r",
                function,
                path,
                exc,
            )
            return None
        try:
            found = _snapshots(self.directory)
            for _, old in found[: max(0, len(found) - self.keep)]:
                with contextlib.suppress(FileNotFoundError):  # another process pruned it
                    (self.directory / old).unlink()
        except Exception as exc:
            logger.warning(
                "torchmemguard: could not remove old allocator snapshots from %s: %r",
                self.directory,
                exc,
            )
        return str(path)


def record_oom_snapshots(
    directory: str | os.PathLike[str],
    *,
    keep: int = 5,
    max_entries: int = 100_000,
    device: str | torch.device | int | None = None,
) -> SnapshotRecorder:
    """Record the allocator's history; write a snapshot of it on each unrecovered OOM.

    From now on, each time a guarded call gives up with
    :class:`~torchmemguard.OutOfMemoryError` on a device of this kind, a
    snapshot (``torch.cuda.memory._dump_snapshot``: every segment and block,
    the last ``max_entries`` allocations and frees, with their Python stacks)
    is written to ``directory``, named
    ``torchmemguard-oom-<UTC time>-pid<pid>-<function>-<n>.pickle``, and its path
    goes into the post-mortem record (``"snapshot"``). Open it at
    https://pytorch.org/memory_viz.

    ``keep`` bounds the snapshot files in ``directory`` (those of other
    processes included; no other file is touched): the oldest go first.
    ``max_entries`` bounds the history, and so each file (several KB per entry).
    ``device`` is the kind of device recorded: ``"cuda"``, which ``None`` means
    where CUDA is available. Without CUDA, a ValueError says so: there is no
    history to record. The history covers every device of the kind.

    Returns a :class:`SnapshotRecorder`; its :meth:`~SnapshotRecorder.stop`, or
    the end of a ``with`` block on it, turns torch's recording off again. One
    recording at a time: a second raises RuntimeError until the first stops.
    Bad arguments raise TypeError or ValueError naming each of them.
    """
    global _active
    where = _checked(directory, keep, max_entries, device)
    with _lock:
        if _active is not None:
            raise RuntimeError(
                f"allocator snapshots are already recorded into {str(_active.directory)!r}: "
                "stop that recording first (its .stop())"
            )
        path, kind = where
        recorder = SnapshotRecorder(path, keep, max_entries, kind)
        devices.record_history(kind, max_entries)
        _active = recorder
    return recorder


def take(function: str, device: torch.device | None) -> str | None:
    """Write a snapshot of the unrecovered OOM of ``function`` on ``device`` where a
    recording of its kind is under way; the file's path, else ``None``."""
    with _lock:
        recorder = _active
        if recorder is None or device is None or device.type != recorder.kind:
            return None
        return recorder._take(function)


def _snapshots(directory: Path) -> list[tuple[tuple[str, int, int], str]]:
    """(order, name) of the snapshot files in ``directory``, oldest first."""
    found = []
    for entry in os.scandir(directory):
        match = _NAME.fullmatch(entry.name)
        if match is not None and entry.is_file(follow_symlinks=False):
            stamp, pid, _, n = match.groups()
            found.append(((stamp, int(pid), int(n)), entry.name))
    return sorted(found)


def _checked(
    directory: object, keep: object, max_entries: object, device: object
) -> tuple[Path, str]:
    """The directory and the kind of device, or one error that names every bad argument:
    TypeError for a wrong type, else ValueError."""
    wrong_type: list[str] = []
    wrong_value: list[str] = []
    path: Path | None = None
    if isinstance(directory, (str, os.PathLike)) and str(directory):
        path = Path(directory).absolute()  # a later chdir moves nothing
        if path.exists() and not path.is_dir():
            wrong_value.append(f"directory={str(directory)!r} exists and is not a directory")
        elif path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
            wrong_value.append(f"directory={str(directory)!r} is not writable")
    elif isinstance(directory, str):
        wrong_value.append("directory='' names no directory")
    else:
        wrong_type.append(f"directory must be a path, got {directory!r}")
    for name, value in (("keep", keep), ("max_entries", max_entries)):
        check_int(name, value, 1, wrong_type, wrong_value)
    kind = ""
    if isinstance(device, (str, torch.device, int, type(None))) and not isinstance(device, bool):
        try:
            kind = devices.history_kind(device)
        except ValueError as exc:
            wrong_value.append(str(exc))
    else:
        wrong_type.append(f"device must be a device, its name or None, got {device!r}")
    raise_bad_arguments(wrong_type, wrong_value)
    assert path is not None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"directory={str(directory)!r} cannot be created: {exc}") from None
    return path, kind
