"""The operating system's view of this process's memory (Linux).

The only module that reads ``/proc`` and cgroup files or calls :mod:`resource`;
the CPU backend reads the process through it. ``root`` arguments let tests
point the readers at a made-up file tree.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

try:
    import resource
except ImportError:  # Windows has no resource limits
    resource = None  # type: ignore[assignment]

# cgroup v1 writes "no limit" as the largest 63-bit count aligned to its page
# size, which varies; any limit past an exbibyte means none.
_NO_LIMIT = 2**60


def _kib_fields(path: Path) -> dict[str, int]:
    """The ``Name:  123 kB`` lines of a /proc file, in bytes."""
    found = {}
    try:
        with path.open() as lines:
            for line in lines:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    found[name] = int(parts[0]) * 1024
    except OSError:
        pass
    return found


def status(root: str = "/") -> dict[str, int]:
    """The process's memory fields of ``/proc/self/status`` (``VmSize``, ``VmRSS``, ...)."""
    return _kib_fields(Path(root, "proc/self/status"))


def address_space(root: str = "/") -> int | None:
    """The process's virtual address space (``VmSize``): what ``RLIMIT_AS`` caps."""
    return status(root).get("VmSize")


def available(root: str = "/") -> int | None:
    """Memory the kernel could still give to processes (``MemAvailable``)."""
    return _kib_fields(Path(root, "proc/meminfo")).get("MemAvailable")


def physical_memory() -> int | None:
    """Physical RAM of the machine."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _cgroup_limits(root: str) -> list[tuple[int, int | None]]:
    """(limit, usage) of every limited memory cgroup that holds this process.

    cgroup v2 (``memory.max``, ``memory.current``) and v1
    (``memory.limit_in_bytes``, ``memory.usage_in_bytes``) are both read, for
    the process's own group and every group above it, because a parent's
    limit binds its children too.
    """
    try:
        membership = Path(root, "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in membership:
        hierarchy, controllers, group = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            base, names = Path(root, "sys/fs/cgroup"), ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            base = Path(root, "sys/fs/cgroup/memory")
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        parts = [p for p in group.split("/") if p]
        for depth in range(len(parts), -1, -1):
            directory = base.joinpath(*parts[:depth])
            limit = _read_count(directory / names[0])
            if limit is not None:
                found.append((limit, _read_count(directory / names[1])))
    return found


def _read_count(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit() or int(text) >= _NO_LIMIT:
        return None  # "max", or v1's "no limit"
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
