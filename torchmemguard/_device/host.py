"""The operating system's view of this process's memory (Linux).

The only module that reads ``/proc`` and cgroup files or calls :mod:`resource`;
the CPU backend reads the process through it. ``root`` arguments let tests
point the readers at a made-up file tree.
"""

from __future__ import annotations

import functools
import math
import os
import threading

try:
    import resource
except ImportError:  # Windows has no resource limits
    resource = None  # type: ignore[assignment]

# cgroup v1 writes "no limit" as the largest 63-bit count aligned to its page
# size, which varies; any limit past an exbibyte means none.
_NO_LIMIT = 2**60


# One buffer, taken at import, for the small files read here: a reading taken
# when an out-of-memory error is reported must not need memory itself.
_buffer = bytearray(1 << 14)
_buffer_lock = threading.Lock()


def _read(path: str) -> bytes | None:
    """The bytes of a small /proc or cgroup file; ``None`` where it cannot be read.

    One read into the module's buffer, without Python's file objects: a scrape
    reads several, and only the bytes read are copied out.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        with _buffer_lock:
            size = os.readv(fd, [_buffer])
            return bytes(memoryview(_buffer)[:size])
    except OSError:
        return None
    finally:
        os.close(fd)


def _kib_fields(path: str) -> dict[str, int]:
    """The ``Name:  123 kB`` lines of a /proc file, in bytes."""
    data = _read(path)
    found: dict[str, int] = {}
    if data is None:
        return found
    for line in data.split(b"\n"):
        if line.endswith(b" kB"):
            name, _, rest = line.partition(b":")
            found[name.decode()] = int(rest[:-3]) * 1024
    return found


def process_memory(root: str = "/") -> tuple[int | None, int | None, int | None]:
    """The process's address space, resident set and its peak (``VmSize``, ``VmRSS``,
    ``VmHWM``), in bytes: three fields of ``/proc/self/status``, found without
    parsing the rest of it (a scrape reads them)."""
    data = _read(os.path.join(root, "proc/self/status"))
    if data is None:
        return None, None, None
    return _kib(data, b"\nVmSize:"), _kib(data, b"\nVmRSS:"), _kib(data, b"\nVmHWM:")


def _kib(data: bytes, key: bytes) -> int | None:
    """The ``123 kB`` value after ``key`` (a line's start) in ``data``, in bytes."""
    at = data.find(key)
    if at < 0:
        return None
    end = data.find(b"\n", at + 1)
    parts = data[at + len(key) : end if end >= 0 else None].split()
    return int(parts[0]) * 1024 if len(parts) == 2 and parts[1] == b"kB" else None


def reset_peak_resident(root: str = "/") -> bool:
    """Reset the process's peak resident set (``VmHWM``) to its resident set now.

    False where the kernel does not allow it (``/proc/self/clear_refs`` takes
    ``5`` from Linux 4.0 on).
    """
    try:
        fd = os.open(os.path.join(root, "proc/self/clear_refs"), os.O_WRONLY)
    except OSError:
        return False
    try:
        return os.write(fd, b"5") == 1
    except OSError:
        return False
    finally:
        os.close(fd)


def status(root: str = "/") -> dict[str, int]:
    """The process's memory fields of ``/proc/self/status`` (``VmSize``, ``VmRSS``, ...)."""
    return _kib_fields(os.path.join(root, "proc/self/status"))


def address_space(root: str = "/") -> int | None:
    """The process's virtual address space (``VmSize``): what ``RLIMIT_AS`` caps."""
    return process_memory(root)[0]


def available(root: str = "/") -> int | None:
    """Memory the kernel could still give to processes (``MemAvailable``)."""
    data = _read(os.path.join(root, "proc/meminfo"))
    return None if data is None else _kib(b"\n" + data, b"\nMemAvailable:")


def physical_memory() -> int | None:
    """Physical RAM of the machine."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


@functools.cache
def _cgroup_files(root: str) -> tuple[tuple[str, str], ...]:
    """The (limit, usage) files of every memory cgroup that holds this process.

    cgroup v2 (``memory.max``, ``memory.current``) and v1
    (``memory.limit_in_bytes``, ``memory.usage_in_bytes``), for the process's
    own group and every group above it, because a parent's limit binds its
    children too. Worked out once: a process stays in its groups.
    """
    data = _read(os.path.join(root, "proc/self/cgroup"))
    if data is None:
        return ()
    found = []
    for line in data.decode().splitlines():
        hierarchy, controllers, group = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            base, names = os.path.join(root, "sys/fs/cgroup"), ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            base = os.path.join(root, "sys/fs/cgroup/memory")
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        parts = [p for p in group.split("/") if p]
        for depth in range(len(parts), -1, -1):
            directory = os.path.join(base, *parts[:depth])
            # A group has its limit file for as long as it exists (the root group has none).
            if os.path.exists(os.path.join(directory, names[0])):
                found.append((os.path.join(directory, names[0]), os.path.join(directory, names[1])))
    return tuple(found)


def _cgroup_limits(root: str) -> list[tuple[int, int | None]]:
    """(limit, usage) of every limited memory cgroup that holds this process."""
    found = []
    for limit_file, usage_file in _cgroup_files(root):
        limit = _read_count(limit_file)
        if limit is not None:
            found.append((limit, _read_count(usage_file)))
    return found


def _read_count(path: str) -> int | None:
    data = _read(path)
    text = b"" if data is None else data.strip()
    if not text.isdigit() or int(text) >= _NO_LIMIT:
        return None  # missing, "max", or v1's "no limit"
    return int(text)


def capacity_and_headroom(root: str = "/") -> tuple[int, int | None]:
    """:func:`capacity` and the memory the process could still take, from one cgroup reading.

    What it could still take is ``MemAvailable``, or less under a cgroup limit;
    ``None`` where neither can be read.
    """
    limits = _cgroup_limits(root)
    known = [n for n in (physical_memory(), min((n for n, _ in limits), default=None)) if n]
    if not known:
        raise OSError("the memory available to this process cannot be read on this system")
    spare = [limit - usage for limit, usage in limits if usage is not None]
    free = available(root)
    if free is not None:
        spare.append(free)
    return min(known), (max(0, min(spare)) if spare else None)


def capacity(root: str = "/") -> int:
    """Memory available to the process: physical RAM or its cgroup limit, the smaller."""
    return capacity_and_headroom(root)[0]


@functools.cache
def can_cap_address_space() -> bool:
    """Whether this system enforces ``RLIMIT_AS`` (Linux) and it can be read."""
    return resource is not None and os.path.exists("/proc/self/status")


def address_space_capped() -> bool:
    """Whether an address-space cap (``RLIMIT_AS``) is in force on this process."""
    return can_cap_address_space() and address_space_limit() != math.inf


def address_space_limit() -> float:
    """The soft ``RLIMIT_AS`` in bytes; ``math.inf`` when there is none."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return math.inf if soft == resource.RLIM_INFINITY else soft


def set_address_space_limit(limit: float) -> None:
    """Set the soft ``RLIMIT_AS`` (``math.inf``: none); the hard limit is kept."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = resource.RLIM_INFINITY if limit == math.inf else int(limit)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
