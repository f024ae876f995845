"""The agent's cgroup stats as containerd's cgroups Metrics (v1 or v2).

Which one follows the host's cgroup mode, as Kata's ``metrics.go`` does: CRI
decodes the ``Any`` by its exact type URL, so it must be
``io.containerd.cgroups.v1.Metrics`` or ``io.containerd.cgroups.v2.Metrics``,
with no ``type.googleapis.com/`` prefix.

The stats are the guest's word and go to containerd as they are converted,
so ``check_stats`` refuses what no real guest has: more CPUs, interfaces,
block I/O entries or huge page sizes than a VM of ours can have, and names
longer than any the kernel makes. Numbers need no check: every counter is a
uint64 on both sides.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from google.protobuf.any_pb2 import Any

from shimv2.errdefs import Internal
from shimv2.pb.cgroups.v1 import metrics_pb2 as v1
from shimv2.pb.cgroups.v2 import metrics_pb2 as v2
from shimv2.pb.kata import agent_pb2

V1_TYPE_URL = "io.containerd.cgroups.v1.Metrics"
V2_TYPE_URL = "io.containerd.cgroups.v2.Metrics"
UNIFIED_MARKER = "/sys/fs/cgroup/cgroup.controllers"
MAX_CPUS = 1024
MAX_INTERFACES = 256
MAX_BLKIO_ENTRIES = 4096  # in each of the blkio lists
MAX_HUGEPAGE_SIZES = 16
MAX_NAME = 64  # interface names, blkio operations, huge page sizes


def host_is_cgroup_v2(marker: str = UNIFIED_MARKER) -> bool:
    """A unified (v2) hierarchy has ``cgroup.controllers`` at its root."""
    return os.path.exists(marker)


def check_stats(stats: agent_pb2.StatsContainerResponse) -> None:
    """Errors: ``Internal`` when the guest's stats hold more than a real guest's."""

    def refuse(what: str) -> Internal:
        return Internal(f"stats from the guest refused: {what}")

    if len(stats.network_stats) > MAX_INTERFACES:
        raise refuse(f"{len(stats.network_stats)} interfaces (at most {MAX_INTERFACES})")
    if any(len(n.name) > MAX_NAME for n in stats.network_stats):
        raise refuse(f"an interface name longer than {MAX_NAME}")
    cg = stats.cgroup_stats
    if len(cg.cpu_stats.cpu_usage.percpu_usage) > MAX_CPUS:
        raise refuse(f"{len(cg.cpu_stats.cpu_usage.percpu_usage)} CPUs (at most {MAX_CPUS})")
    if len(cg.hugetlb_stats) > MAX_HUGEPAGE_SIZES:
        raise refuse(f"{len(cg.hugetlb_stats)} huge page sizes (at most {MAX_HUGEPAGE_SIZES})")
    if any(len(size) > MAX_NAME for size in cg.hugetlb_stats):
        raise refuse(f"a huge page size longer than {MAX_NAME}")
    blk = cg.blkio_stats
    for field in blk.DESCRIPTOR.fields:
        entries = getattr(blk, field.name)
        if len(entries) > MAX_BLKIO_ENTRIES:
            raise refuse(f"{len(entries)} {field.name} (at most {MAX_BLKIO_ENTRIES})")
        if any(len(e.op) > MAX_NAME for e in entries):
            raise refuse(f"a {field.name} operation longer than {MAX_NAME}")


def metrics_any(stats: agent_pb2.StatsContainerResponse, *, cgroup_v2: bool) -> Any:
    """The guest's stats as containerd's Metrics. Errors: ``Internal`` (``check_stats``)."""
    check_stats(stats)
    metrics: v1.Metrics | v2.Metrics
    if cgroup_v2:
        metrics, url = metrics_v2(stats), V2_TYPE_URL
    else:
        metrics, url = metrics_v1(stats), V1_TYPE_URL
    return Any(type_url=url, value=metrics.SerializeToString())


def _memory_entry(data: agent_pb2.MemoryData) -> v1.MemoryEntry:
    return v1.MemoryEntry(
        limit=data.limit, usage=data.usage, max=data.max_usage, failcnt=data.failcnt
    )


def _network_v1(stats: Iterable[agent_pb2.NetworkStats]) -> list[v1.NetworkStat]:
    return [
        v1.NetworkStat(
            name=n.name,
            rx_bytes=n.rx_bytes,
            rx_packets=n.rx_packets,
            rx_errors=n.rx_errors,
            rx_dropped=n.rx_dropped,
            tx_bytes=n.tx_bytes,
            tx_packets=n.tx_packets,
            tx_errors=n.tx_errors,
            tx_dropped=n.tx_dropped,
        )
        for n in stats
    ]


def _network_v2(stats: Iterable[agent_pb2.NetworkStats]) -> list[v2.NetworkStat]:
    return [v2.NetworkStat.FromString(n.SerializeToString()) for n in _network_v1(stats)]


def _blkio_v1(entries: Iterable[agent_pb2.BlkioStatsEntry]) -> list[v1.BlkIOEntry]:
    return [v1.BlkIOEntry(op=e.op, major=e.major, minor=e.minor, value=e.value) for e in entries]


def metrics_v1(stats: agent_pb2.StatsContainerResponse) -> v1.Metrics:
    m = v1.Metrics(network=_network_v1(stats.network_stats))
    if not stats.HasField("cgroup_stats"):
        return m
    cg = stats.cgroup_stats
    cpu, mem, blk = cg.cpu_stats, cg.memory_stats, cg.blkio_stats
    for pagesize, h in sorted(cg.hugetlb_stats.items()):
        m.hugetlb.append(
            v1.HugetlbStat(usage=h.usage, max=h.max_usage, failcnt=h.failcnt, pagesize=pagesize)
        )
    m.pids.CopyFrom(v1.PidsStat(current=cg.pids_stats.current, limit=cg.pids_stats.limit))
    m.cpu.CopyFrom(
        v1.CPUStat(
            usage=v1.CPUUsage(
                total=cpu.cpu_usage.total_usage,
                kernel=cpu.cpu_usage.usage_in_kernelmode,
                user=cpu.cpu_usage.usage_in_usermode,
                per_cpu=list(cpu.cpu_usage.percpu_usage),
            ),
            throttling=v1.Throttle(
                periods=cpu.throttling_data.periods,
                throttled_periods=cpu.throttling_data.throttled_periods,
                throttled_time=cpu.throttling_data.throttled_time,
            ),
        )
    )
    prefix = "total_" if mem.use_hierarchy else ""
    m.memory.CopyFrom(
        v1.MemoryStat(
            cache=mem.stats.get(prefix + "cache", mem.cache),
            rss=mem.stats.get(prefix + "rss", 0),
            mapped_file=mem.stats.get(prefix + "mapped_file", 0),
            pg_fault=mem.stats.get("pgfault", 0),
            pg_maj_fault=mem.stats.get("pgmajfault", 0),
            total_inactive_file=mem.stats.get("total_inactive_file", 0),
            usage=_memory_entry(mem.usage),
            swap=_memory_entry(mem.swap_usage),
            kernel=_memory_entry(mem.kernel_usage),
        )
    )
    m.memory_oom_control.CopyFrom(v1.MemoryOomControl(oom_kill=mem.stats.get("oom_kill", 0)))
    m.blkio.CopyFrom(
        v1.BlkIOStat(
            io_service_bytes_recursive=_blkio_v1(blk.io_service_bytes_recursive),
            io_serviced_recursive=_blkio_v1(blk.io_serviced_recursive),
            io_queued_recursive=_blkio_v1(blk.io_queued_recursive),
            io_service_time_recursive=_blkio_v1(blk.io_service_time_recursive),
            io_wait_time_recursive=_blkio_v1(blk.io_wait_time_recursive),
            io_merged_recursive=_blkio_v1(blk.io_merged_recursive),
            io_time_recursive=_blkio_v1(blk.io_time_recursive),
            sectors_recursive=_blkio_v1(blk.sectors_recursive),
        )
    )
    return m


def _io_v2(blk: agent_pb2.BlkioStats) -> list[v2.IOEntry]:
    """Per device: bytes from io_service_bytes, operations from io_serviced."""
    devices: dict[tuple[int, int], v2.IOEntry] = {}

    def entry(e: agent_pb2.BlkioStatsEntry) -> v2.IOEntry:
        return devices.setdefault((e.major, e.minor), v2.IOEntry(major=e.major, minor=e.minor))

    for e in blk.io_service_bytes_recursive:
        op = e.op.lower()
        if op == "read":
            entry(e).rbytes = e.value
        elif op == "write":
            entry(e).wbytes = e.value
    for e in blk.io_serviced_recursive:
        op = e.op.lower()
        if op == "read":
            entry(e).rios = e.value
        elif op == "write":
            entry(e).wios = e.value
    return [devices[k] for k in sorted(devices)]


def metrics_v2(stats: agent_pb2.StatsContainerResponse) -> v2.Metrics:
    m = v2.Metrics(network=_network_v2(stats.network_stats))
    if not stats.HasField("cgroup_stats"):
        return m
    cg = stats.cgroup_stats
    cpu, mem = cg.cpu_stats, cg.memory_stats
    for pagesize, h in sorted(cg.hugetlb_stats.items()):
        m.hugetlb.append(
            v2.HugeTlbStat(current=h.usage, max=h.max_usage, failcnt=h.failcnt, pagesize=pagesize)
        )
    m.pids.CopyFrom(v2.PidsStat(current=cg.pids_stats.current, limit=cg.pids_stats.limit))
    m.cpu.CopyFrom(
        v2.CPUStat(
            usage_usec=cpu.cpu_usage.total_usage // 1000,
            user_usec=cpu.cpu_usage.usage_in_usermode // 1000,
            system_usec=cpu.cpu_usage.usage_in_kernelmode // 1000,
            nr_periods=cpu.throttling_data.periods,
            nr_throttled=cpu.throttling_data.throttled_periods,
            throttled_usec=cpu.throttling_data.throttled_time // 1000,
        )
    )
    m.memory.CopyFrom(
        v2.MemoryStat(
            anon=mem.stats.get("anon", mem.stats.get("rss", 0)),
            file=mem.stats.get("file", mem.stats.get("cache", mem.cache)),
            usage=mem.usage.usage,
            usage_limit=mem.usage.limit,
            max_usage=mem.usage.max_usage,
            swap_usage=mem.swap_usage.usage,
            swap_limit=mem.swap_usage.limit,
            swap_max_usage=mem.swap_usage.max_usage,
            pgfault=mem.stats.get("pgfault", 0),
            pgmajfault=mem.stats.get("pgmajfault", 0),
            inactive_file=mem.stats.get("inactive_file", mem.stats.get("total_inactive_file", 0)),
        )
    )
    m.memory_events.CopyFrom(
        v2.MemoryEvents(
            max=mem.usage.failcnt,
            oom=mem.stats.get("oom", 0),
            oom_kill=mem.stats.get("oom_kill", 0),
        )
    )
    m.io.CopyFrom(v2.IOStat(usage=_io_v2(cg.blkio_stats)))
    return m
