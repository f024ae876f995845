"""Cgroup v2 statistics in the shape of the agent's ``CgroupStats`` message.

Files that a controller does not provide (a controller not enabled, an older
kernel) read as absent, so the matching fields stay zero: stats never fail
because one controller is missing.
"""

from __future__ import annotations

import os
import re

from shimv2.errdefs import InvalidArgument
from shimv2.pb.kata import agent_pb2

UNLIMITED = (1 << 64) - 1
_MAX_FILE = 1 << 20
_SYSTEMD_PATH = re.compile(r"^[^/:]*:[^/:]*:[^/:]*$")


def cgroup_dir(root: str, cgroups_path: str) -> str:
    """The directory of ``cgroups_path`` (cgroupfs style) under ``root``.

    Errors: ``InvalidArgument`` for a path that leaves ``root`` or holds a NUL byte.
    """
    rel = os.path.normpath("/" + cgroups_path).lstrip("/")
    # A NUL byte: no file call takes the path (ValueError, not OSError, at each later use).
    if not rel or rel == "." or rel.startswith("..") or "\0" in rel:
        raise InvalidArgument(f"bad cgroups path {cgroups_path!r}")
    return os.path.join(root, rel)


def is_systemd_path(cgroups_path: str) -> bool:
    """``slice:prefix:name``, which only a systemd cgroup manager understands."""
    return bool(_SYSTEMD_PATH.match(cgroups_path))


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(_MAX_FILE).decode(errors="replace")
    except OSError:
        return None


def _flat_keyed(text: str | None) -> dict[str, int]:
    """``key value`` lines (cpu.stat, memory.stat, memory.events)."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def _single(text: str | None, *, max_value: int = 0) -> int:
    """A one-number file; ``max`` is ``max_value``; absent or garbled is 0."""
    if text is None:
        return 0
    value = text.strip()
    if value == "max":
        return max_value
    try:
        return int(value)
    except ValueError:
        return 0


def read_procs(directory: str) -> list[int]:
    text = _read(os.path.join(directory, "cgroup.procs"))
    return [int(p) for p in (text or "").split() if p.isdigit()]


def is_frozen(directory: str) -> bool:
    return _single(_read(os.path.join(directory, "cgroup.freeze"))) == 1


def oom_kills(directory: str) -> int:
    return _flat_keyed(_read(os.path.join(directory, "memory.events"))).get("oom_kill", 0)


OOM_EVENT_KEYS = ("oom", "oom_kill")


def read_stats(directory: str) -> agent_pb2.CgroupStats:
    """The cgroup's cpu, memory, pids, io and hugetlb statistics."""
    stats = agent_pb2.CgroupStats()

    def path(name: str) -> str:
        return os.path.join(directory, name)

    cpu = _flat_keyed(_read(path("cpu.stat")))
    usage = stats.cpu_stats.cpu_usage
    usage.total_usage = cpu.get("usage_usec", 0) * 1000
    usage.usage_in_usermode = cpu.get("user_usec", 0) * 1000
    usage.usage_in_kernelmode = cpu.get("system_usec", 0) * 1000
    throttling = stats.cpu_stats.throttling_data
    throttling.periods = cpu.get("nr_periods", 0)
    throttling.throttled_periods = cpu.get("nr_throttled", 0)
    throttling.throttled_time = cpu.get("throttled_usec", 0) * 1000

    memory = stats.memory_stats
    memory_stat = _flat_keyed(_read(path("memory.stat")))
    memory.stats.update(memory_stat)
    memory.cache = memory_stat.get("file", 0)
    memory.use_hierarchy = True
    memory.usage.usage = _single(_read(path("memory.current")))
    memory.usage.max_usage = _single(_read(path("memory.peak")))
    memory.usage.limit = _single(_read(path("memory.max")), max_value=UNLIMITED)
    events = _flat_keyed(_read(path("memory.events")))
    memory.usage.failcnt = events.get("max", 0)
    # memory.stat has no such keys; the host reports them as OOM counts (CRI's
    # container_oom_events_total comes from them).
    for key in OOM_EVENT_KEYS if events else ():
        memory.stats[key] = events.get(key, 0)
    memory.swap_usage.usage = _single(_read(path("memory.swap.current")))
    memory.swap_usage.limit = _single(_read(path("memory.swap.max")), max_value=UNLIMITED)
    memory.kernel_usage.usage = memory_stat.get("kernel", 0)

    stats.pids_stats.current = _single(_read(path("pids.current")))
    stats.pids_stats.limit = _single(_read(path("pids.max")))

    _read_io(_read(path("io.stat")), stats.blkio_stats)
    _read_hugetlb(directory, stats)
    return stats


def _read_io(text: str | None, blkio: agent_pb2.BlkioStats) -> None:
    ops = {"rbytes": ("Read", True), "wbytes": ("Write", True),
           "rios": ("Read", False), "wios": ("Write", False)}  # fmt: skip
    for line in (text or "").splitlines():
        device, *fields = line.split()
        major, _, minor = device.partition(":")
        if not (major.isdigit() and minor.isdigit()):
            continue
        for item in fields:
            key, _, value = item.partition("=")
            if key not in ops or not value.isdigit():
                continue
            op, is_bytes = ops[key]
            target = blkio.io_service_bytes_recursive if is_bytes else blkio.io_serviced_recursive
            target.add(major=int(major), minor=int(minor), op=op, value=int(value))


def _read_hugetlb(directory: str, stats: agent_pb2.CgroupStats) -> None:
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "hugetlb" and parts[2] == "current":
            size = parts[1]
            entry = stats.hugetlb_stats[size]
            entry.usage = _single(_read(os.path.join(directory, name)))
            events = _flat_keyed(_read(os.path.join(directory, f"hugetlb.{size}.events")))
            entry.failcnt = events.get("max", 0)
