"""The host readers: cgroup limits, capacity and process memory from made-up trees.

Every reader takes a ``root``, so the cgroup and ``/proc`` files below are
written under ``tmp_path``. Nothing here lowers a limit of the pytest process.
The cgroup limits are read through :func:`host.capacity`, with a machine of
more RAM than any limit here, so that a limit is the capacity.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from torchmemguard._device import host

GIB = 2**30
V1_NO_LIMIT = "9223372036854771712"  # what cgroup v1 writes when there is no limit

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_AS (Linux)"
)
RAM = 2**50  # the made-up machine's, larger than every limit below


@pytest.fixture
def large_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "physical_memory", lambda: RAM)


def cgroup_limit(root: Path) -> int | None:
    """The tightest cgroup limit under ``root``, as capacity reads it; ``None`` for none."""
    capacity = host.capacity(str(root))
    return None if capacity == RAM else capacity


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def membership(root: Path, *lines: str) -> None:
    """Write ``proc/self/cgroup`` with one line per hierarchy."""
    write(root, "proc/self/cgroup", "".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------
# cgroup v2


@pytest.mark.usefixtures("large_machine")
def test_v2_limit_of_the_own_group_is_read(tmp_path: Path) -> None:
    membership(tmp_path, "0::/app/worker")
    write(tmp_path, "sys/fs/cgroup/app/worker/memory.max", f"{3 * GIB}\n")
    assert cgroup_limit(tmp_path) == 3 * GIB


@pytest.mark.usefixtures("large_machine")
def test_v2_max_in_every_group_means_no_limit(tmp_path: Path) -> None:
    membership(tmp_path, "0::/app/worker")
    write(tmp_path, "sys/fs/cgroup/app/worker/memory.max", "max\n")
    write(tmp_path, "sys/fs/cgroup/app/memory.max", "max\n")
    write(tmp_path, "sys/fs/cgroup/memory.max", "max\n")
    assert cgroup_limit(tmp_path) is None


@pytest.mark.usefixtures("large_machine")
def test_v2_parent_limit_tighter_than_the_child_wins(tmp_path: Path) -> None:
    membership(tmp_path, "0::/app/worker")
    write(tmp_path, "sys/fs/cgroup/app/worker/memory.max", f"{8 * GIB}\n")
    write(tmp_path, "sys/fs/cgroup/app/memory.max", f"{2 * GIB}\n")
    assert cgroup_limit(tmp_path) == 2 * GIB


@pytest.mark.usefixtures("large_machine")
def test_v2_child_limit_tighter_than_the_parent_wins(tmp_path: Path) -> None:
    membership(tmp_path, "0::/app/worker")
    write(tmp_path, "sys/fs/cgroup/app/worker/memory.max", f"{GIB}\n")
    write(tmp_path, "sys/fs/cgroup/app/memory.max", f"{2 * GIB}\n")
    assert cgroup_limit(tmp_path) == GIB


# ---------------------------------------------------------------------------
# cgroup v1


@pytest.mark.usefixtures("large_machine")
def test_v1_memory_controller_limit_is_read(tmp_path: Path) -> None:
    membership(tmp_path, "4:memory:/a/b")
    write(tmp_path, "sys/fs/cgroup/memory/a/b/memory.limit_in_bytes", f"{5 * GIB}\n")
    assert cgroup_limit(tmp_path) == 5 * GIB


@pytest.mark.usefixtures("large_machine")
def test_v1_memory_controller_shared_with_another_is_read(tmp_path: Path) -> None:
    membership(tmp_path, "4:cpuacct,memory:/a")
    write(tmp_path, "sys/fs/cgroup/memory/a/memory.limit_in_bytes", f"{5 * GIB}\n")
    assert cgroup_limit(tmp_path) == 5 * GIB


@pytest.mark.usefixtures("large_machine")
def test_v1_no_limit_value_means_no_limit(tmp_path: Path) -> None:
    membership(tmp_path, "4:memory:/a/b")
    write(tmp_path, "sys/fs/cgroup/memory/a/b/memory.limit_in_bytes", V1_NO_LIMIT + "\n")
    write(tmp_path, "sys/fs/cgroup/memory/a/memory.limit_in_bytes", V1_NO_LIMIT + "\n")
    write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", V1_NO_LIMIT + "\n")
    assert cgroup_limit(tmp_path) is None


@pytest.mark.usefixtures("large_machine")
def test_v1_no_limit_on_a_kernel_with_64_kib_pages_means_no_limit(tmp_path: Path) -> None:
    membership(tmp_path, "4:memory:/")
    write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", f"{2**63 - 2**16}\n")
    assert cgroup_limit(tmp_path) is None


@pytest.mark.usefixtures("large_machine")
def test_v1_parent_limit_tighter_than_the_child_wins(tmp_path: Path) -> None:
    membership(tmp_path, "4:memory:/a/b")
    write(tmp_path, "sys/fs/cgroup/memory/a/b/memory.limit_in_bytes", V1_NO_LIMIT + "\n")
    write(tmp_path, "sys/fs/cgroup/memory/a/memory.limit_in_bytes", f"{GIB}\n")
    assert cgroup_limit(tmp_path) == GIB


# ---------------------------------------------------------------------------
# Where the files are, or are not


@pytest.mark.usefixtures("large_machine")
def test_group_missing_under_the_mount_falls_back_to_the_mount_root(tmp_path: Path) -> None:
    # A container without a cgroup namespace: /proc names the host's path to the
    # group, while the mount shows the container's own group at its root.
    membership(tmp_path, "0::/system.slice/docker-0123abcd.scope")
    write(tmp_path, "sys/fs/cgroup/memory.max", f"{6 * GIB}\n")
    assert cgroup_limit(tmp_path) == 6 * GIB


@pytest.mark.usefixtures("large_machine")
def test_v1_group_missing_under_the_mount_falls_back_to_the_mount_root(tmp_path: Path) -> None:
    membership(tmp_path, "4:memory:/docker/0123abcd")
    write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", f"{6 * GIB}\n")
    assert cgroup_limit(tmp_path) == 6 * GIB


@pytest.mark.usefixtures("large_machine")
def test_no_cgroup_file_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_limit(tmp_path) is None


@pytest.mark.usefixtures("large_machine")
def test_group_without_limit_files_means_no_limit(tmp_path: Path) -> None:
    membership(tmp_path, "0::/app")
    (tmp_path / "sys/fs/cgroup/app").mkdir(parents=True)
    assert cgroup_limit(tmp_path) is None


@pytest.mark.usefixtures("large_machine")
def test_lines_of_other_controllers_are_ignored(tmp_path: Path) -> None:
    membership(tmp_path, "9:pids:/a", "3:cpuset:/a", "2:cpu,cpuacct:/a")
    # Limit-like files in other controllers' trees must not be read as memory limits.
    for controller in ("pids", "cpuset", "cpu,cpuacct"):
        write(tmp_path, f"sys/fs/cgroup/{controller}/a/memory.limit_in_bytes", f"{GIB}\n")
    write(tmp_path, "sys/fs/cgroup/a/memory.max", f"{GIB}\n")
    assert cgroup_limit(tmp_path) is None


@pytest.mark.usefixtures("large_machine")
def test_memory_line_is_found_among_other_controllers(tmp_path: Path) -> None:
    membership(tmp_path, "9:pids:/a", "4:memory:/a", "2:cpu,cpuacct:/a", "0::/")
    write(tmp_path, "sys/fs/cgroup/memory/a/memory.limit_in_bytes", f"{7 * GIB}\n")
    assert cgroup_limit(tmp_path) == 7 * GIB


@pytest.mark.usefixtures("large_machine")
def test_tightest_of_v1_and_v2_limits_wins(tmp_path: Path) -> None:
    membership(tmp_path, "4:memory:/a", "0::/b")
    write(tmp_path, "sys/fs/cgroup/memory/a/memory.limit_in_bytes", f"{4 * GIB}\n")
    write(tmp_path, "sys/fs/cgroup/b/memory.max", f"{3 * GIB}\n")
    assert cgroup_limit(tmp_path) == 3 * GIB


# ---------------------------------------------------------------------------
# Capacity: physical RAM or the cgroup limit, the smaller


def physical() -> int:
    ram = host.physical_memory()
    if ram is None:
        pytest.skip("physical memory cannot be read on this system")
    return ram


def test_capacity_is_a_cgroup_limit_smaller_than_physical_memory(tmp_path: Path) -> None:
    limit = physical() // 4
    membership(tmp_path, "0::/app")
    write(tmp_path, "sys/fs/cgroup/app/memory.max", f"{limit}\n")
    assert host.capacity(str(tmp_path)) == limit


def test_capacity_is_physical_memory_below_a_larger_cgroup_limit(tmp_path: Path) -> None:
    ram = physical()
    membership(tmp_path, "0::/app")
    write(tmp_path, "sys/fs/cgroup/app/memory.max", f"{ram * 4}\n")
    assert host.capacity(str(tmp_path)) == ram


def test_capacity_without_cgroup_limit_is_physical_memory(tmp_path: Path) -> None:
    assert host.capacity(str(tmp_path)) == physical()


def test_headroom_is_what_the_tightest_cgroup_leaves(tmp_path: Path) -> None:
    membership(tmp_path, "0::/app")
    write(tmp_path, "sys/fs/cgroup/app/memory.max", f"{4 * GIB}\n")
    write(tmp_path, "sys/fs/cgroup/app/memory.current", f"{3 * GIB}\n")
    write(tmp_path, "proc/meminfo", f"MemAvailable:    {8 * GIB // 1024} kB\n")
    assert host.capacity_and_headroom(str(tmp_path))[1] == GIB


def test_headroom_without_cgroup_limit_is_mem_available(tmp_path: Path) -> None:
    write(tmp_path, "proc/meminfo", f"MemAvailable:    {8 * GIB // 1024} kB\n")
    assert host.capacity_and_headroom(str(tmp_path))[1] == 8 * GIB


def test_headroom_is_unknown_without_meminfo_or_cgroup_usage(tmp_path: Path) -> None:
    assert host.capacity_and_headroom(str(tmp_path))[1] is None


# ---------------------------------------------------------------------------
# /proc/self/status

_STATUS = """\
Name:\tpython
State:\tR (running)
VmPeak:\t 9000000 kB
VmSize:\t 8388608 kB
VmLck:\t       0 kB
VmHWM:\t  600000 kB
VmRSS:\t  524288 kB
Threads:\t4
"""


def test_address_space_reads_vm_size_in_bytes(tmp_path: Path) -> None:
    write(tmp_path, "proc/self/status", _STATUS)
    assert host.address_space(str(tmp_path)) == 8 * GIB


def test_status_reads_the_memory_fields_in_bytes(tmp_path: Path) -> None:
    write(tmp_path, "proc/self/status", _STATUS)
    assert host.status(str(tmp_path)) == {
        "VmPeak": 9000000 * 1024,
        "VmSize": 8 * GIB,
        "VmLck": 0,
        "VmHWM": 600000 * 1024,
        "VmRSS": GIB // 2,
    }


def test_process_memory_reads_the_three_fields_a_scrape_needs(tmp_path: Path) -> None:
    write(tmp_path, "proc/self/status", _STATUS)
    assert host.process_memory(str(tmp_path)) == (8 * GIB, GIB // 2, 600000 * 1024)


def test_process_memory_is_unknown_without_status_file_or_fields(tmp_path: Path) -> None:
    assert host.process_memory(str(tmp_path)) == (None, None, None)
    write(tmp_path, "proc/self/status", "Name:\tkthreadd\nState:\tS (sleeping)\n")
    assert host.process_memory(str(tmp_path)) == (None, None, None)


def test_address_space_and_status_are_empty_without_status_file(tmp_path: Path) -> None:
    assert host.address_space(str(tmp_path)) is None
    assert host.status(str(tmp_path)) == {}


def test_address_space_is_none_without_its_field(tmp_path: Path) -> None:
    # A kernel thread's status has no Vm* lines.
    write(tmp_path, "proc/self/status", "Name:\tkthreadd\nState:\tS (sleeping)\n")
    assert host.address_space(str(tmp_path)) is None
    assert host.status(str(tmp_path)) == {}


def test_available_reads_mem_available_in_bytes(tmp_path: Path) -> None:
    write(
        tmp_path,
        "proc/meminfo",
        "MemTotal:       16777216 kB\nMemFree:         1048576 kB\nMemAvailable:    4194304 kB\n",
    )
    assert host.available(str(tmp_path)) == 4 * GIB


@linux_only
def test_real_process_address_space_exceeds_resident_size() -> None:
    space, rss = host.address_space(), host.status().get("VmRSS")
    assert space is not None
    assert rss is not None
    assert space > rss > 0


# ---------------------------------------------------------------------------
# RLIMIT_AS of the pytest process: read only


@linux_only
def test_address_space_limit_reads_the_soft_limit() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    expected = math.inf if soft == resource.RLIM_INFINITY else soft
    assert host.address_space_limit() == expected
