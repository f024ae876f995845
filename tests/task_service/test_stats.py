"""Agent stats → cgroups Metrics, v1 and v2, with the exact type URLs CRI compares."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from shimv2.errdefs import Internal
from shimv2.pb.cgroups.v1 import metrics_pb2 as v1
from shimv2.pb.cgroups.v2 import metrics_pb2 as v2
from shimv2.pb.kata import agent_pb2
from shimv2.task_service.stats import (
    MAX_BLKIO_ENTRIES,
    MAX_CPUS,
    MAX_HUGEPAGE_SIZES,
    MAX_INTERFACES,
    MAX_NAME,
    V1_TYPE_URL,
    V2_TYPE_URL,
    check_stats,
    host_is_cgroup_v2,
    metrics_any,
    metrics_v1,
    metrics_v2,
)
from tests.strategies import messages


def sample() -> agent_pb2.StatsContainerResponse:
    cg = agent_pb2.CgroupStats(
        cpu_stats=agent_pb2.CpuStats(
            cpu_usage=agent_pb2.CpuUsage(
                total_usage=5_000_000,
                usage_in_kernelmode=2_000_000,
                usage_in_usermode=3_000_000,
                percpu_usage=[4_000_000, 1_000_000],
            ),
            throttling_data=agent_pb2.ThrottlingData(
                periods=10, throttled_periods=2, throttled_time=7000
            ),
        ),
        memory_stats=agent_pb2.MemoryStats(
            cache=11,
            usage=agent_pb2.MemoryData(usage=1000, max_usage=1500, failcnt=1, limit=4096),
            swap_usage=agent_pb2.MemoryData(usage=5, limit=50),
            use_hierarchy=True,
            stats={
                "total_cache": 12,
                "total_rss": 34,
                "pgfault": 9,
                "total_inactive_file": 8,
                "oom": 3,
                "oom_kill": 2,
            },
        ),
        pids_stats=agent_pb2.PidsStats(current=3, limit=100),
        blkio_stats=agent_pb2.BlkioStats(
            io_service_bytes_recursive=[
                agent_pb2.BlkioStatsEntry(major=8, minor=0, op="Read", value=100),
                agent_pb2.BlkioStatsEntry(major=8, minor=0, op="Write", value=200),
                agent_pb2.BlkioStatsEntry(major=8, minor=16, op="Read", value=7),
            ],
            io_serviced_recursive=[
                agent_pb2.BlkioStatsEntry(major=8, minor=0, op="Read", value=4),
            ],
        ),
        hugetlb_stats={"2MB": agent_pb2.HugetlbStats(usage=1, max_usage=2, failcnt=0)},
    )
    net = agent_pb2.NetworkStats(name="eth0", rx_bytes=10, tx_bytes=20)
    return agent_pb2.StatsContainerResponse(cgroup_stats=cg, network_stats=[net])


def test_v1_type_url_exact_and_value_parses() -> None:
    any_ = metrics_any(sample(), cgroup_v2=False)
    assert any_.type_url == "io.containerd.cgroups.v1.Metrics" == V1_TYPE_URL
    m = v1.Metrics.FromString(any_.value)
    assert (m.cpu.usage.total, m.cpu.usage.kernel, m.cpu.usage.user) == (
        5_000_000,
        2_000_000,
        3_000_000,
    )
    assert list(m.cpu.usage.per_cpu) == [4_000_000, 1_000_000]
    assert m.cpu.throttling.throttled_periods == 2
    assert (m.memory.usage.usage, m.memory.usage.limit, m.memory.usage.max) == (1000, 4096, 1500)
    assert (m.memory.cache, m.memory.rss, m.memory.pg_fault) == (12, 34, 9)
    assert m.memory.swap.limit == 50
    assert m.HasField("memory_oom_control")  # CRI's container_oom_events_total needs it
    assert m.memory_oom_control.oom_kill == 2
    assert (m.pids.current, m.pids.limit) == (3, 100)
    assert m.blkio.io_service_bytes_recursive[1].value == 200
    assert m.hugetlb[0].pagesize == "2MB"
    assert m.hugetlb[0].max == 2
    assert m.network[0].name == "eth0"
    assert m.network[0].tx_bytes == 20


def test_v2_type_url_exact_and_value_parses() -> None:
    any_ = metrics_any(sample(), cgroup_v2=True)
    assert any_.type_url == "io.containerd.cgroups.v2.Metrics" == V2_TYPE_URL
    m = v2.Metrics.FromString(any_.value)
    assert (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec) == (5000, 3000, 2000)
    assert (m.cpu.nr_periods, m.cpu.nr_throttled, m.cpu.throttled_usec) == (10, 2, 7)
    assert (m.memory.usage, m.memory.usage_limit, m.memory.max_usage) == (1000, 4096, 1500)
    assert (m.memory.swap_usage, m.memory.swap_limit) == (5, 50)
    assert (m.memory_events.max, m.memory_events.oom, m.memory_events.oom_kill) == (1, 3, 2)
    assert (m.pids.current, m.pids.limit) == (3, 100)
    io = {(e.major, e.minor): e for e in m.io.usage}
    assert (io[8, 0].rbytes, io[8, 0].wbytes, io[8, 0].rios) == (100, 200, 4)
    assert io[8, 16].rbytes == 7
    assert m.network[0].rx_bytes == 10


def test_no_cgroup_stats_still_gives_network() -> None:
    resp = agent_pb2.StatsContainerResponse(network_stats=[agent_pb2.NetworkStats(name="lo")])
    assert not metrics_v1(resp).HasField("cpu")
    assert metrics_v1(resp).network[0].name == "lo"
    assert metrics_v2(resp).network[0].name == "lo"


def test_host_cgroup_mode_from_the_unified_marker(tmp_path: Path) -> None:
    marker = tmp_path / "cgroup.controllers"
    assert not host_is_cgroup_v2(str(marker))
    marker.write_text("cpu memory\n")
    assert host_is_cgroup_v2(str(marker))
    assert host_is_cgroup_v2() == Path("/sys/fs/cgroup/cgroup.controllers").exists()


def _absurd(case: str) -> agent_pb2.StatsContainerResponse:
    stats = sample()
    cg = stats.cgroup_stats
    if case == "interfaces":
        stats.network_stats.extend(agent_pb2.NetworkStats(name=f"e{i}") for i in range(10_000))
    elif case == "long-name":
        stats.network_stats.add(name="x" * 1_000_000)
    elif case == "cpus":
        cg.cpu_stats.cpu_usage.percpu_usage.extend(range(100_000))
    elif case == "hugetlb":
        for i in range(100):
            cg.hugetlb_stats[f"{i}kB"].usage = 1
    elif case == "hugetlb-name":
        cg.hugetlb_stats["k" * 100_000].usage = 1
    elif case == "blkio":
        cg.blkio_stats.io_serviced_recursive.extend(
            agent_pb2.BlkioStatsEntry(op="Read", major=8, minor=i) for i in range(50_000)
        )
    else:
        cg.blkio_stats.io_service_bytes_recursive.add(op="R" * 100_000)
    return stats


@pytest.mark.parametrize(
    "case", ["interfaces", "long-name", "cpus", "hugetlb", "hugetlb-name", "blkio", "blkio-op"]
)
@pytest.mark.parametrize("cgroup_v2", [False, True])
def test_absurd_stats_from_the_guest_are_refused(case: str, cgroup_v2: bool) -> None:
    # They go to containerd as they are: nothing a real guest has, nothing unbounded.
    with pytest.raises(Internal, match="stats"):
        metrics_any(_absurd(case), cgroup_v2=cgroup_v2)


def test_stats_of_a_big_but_real_guest_pass() -> None:
    stats = sample()
    stats.cgroup_stats.cpu_stats.cpu_usage.percpu_usage.extend(range(64))
    stats.network_stats.extend(agent_pb2.NetworkStats(name=f"eth{i}") for i in range(16))
    assert metrics_any(stats, cgroup_v2=True).value


# -- fuzzing: whatever stats a guest sends --------------------------------------------------


def _decodable_stats(raw: bytes) -> agent_pb2.StatsContainerResponse:
    """``raw`` as the agent client decodes it: what does not decode is an empty reply here
    (the client refuses it before the stats code sees it)."""
    try:
        return agent_pb2.StatsContainerResponse.FromString(raw)
    except DecodeError:
        return agent_pb2.StatsContainerResponse()


class Inflated(NamedTuple):
    """One list of the stats made as long as its bound (give or take one)."""

    where: str
    length: int
    over: bool


BOUNDED = {
    "network_stats": MAX_INTERFACES,
    "percpu_usage": MAX_CPUS,
    "hugetlb_stats": MAX_HUGEPAGE_SIZES,
    "io_service_bytes_recursive": MAX_BLKIO_ENTRIES,
    "io_time_recursive": MAX_BLKIO_ENTRIES,
    "interface name": MAX_NAME,
    "huge page size": MAX_NAME,
    "blkio op": MAX_NAME,
}


def inflate(stats: agent_pb2.StatsContainerResponse, where: str, n: int) -> None:
    cg = stats.cgroup_stats
    if where == "network_stats":
        del stats.network_stats[:]
        stats.network_stats.extend(agent_pb2.NetworkStats(name=f"eth{i}") for i in range(n))
    elif where == "percpu_usage":
        cg.cpu_stats.cpu_usage.percpu_usage[:] = range(n)
    elif where == "hugetlb_stats":
        cg.hugetlb_stats.clear()
        for i in range(n):
            cg.hugetlb_stats[f"{i}kB"].usage = i
    elif where in ("io_service_bytes_recursive", "io_time_recursive"):
        entries = getattr(cg.blkio_stats, where)
        del entries[:]
        entries.extend(agent_pb2.BlkioStatsEntry(op="Read", major=i) for i in range(n))
    elif where == "interface name":
        stats.network_stats.add(name="e" * n)
    elif where == "huge page size":
        cg.hugetlb_stats["2" * n].usage = 1
    else:
        cg.blkio_stats.io_serviced_recursive.add(op="W" * n)


def within_bounds(stats: agent_pb2.StatsContainerResponse) -> bool:
    try:
        check_stats(stats)
    except Internal:
        return False
    return True


@pytest.mark.fuzz
@given(
    st.one_of(
        messages(agent_pb2.StatsContainerResponse),
        st.binary(max_size=300).map(_decodable_stats),
    ),
    st.none()
    | st.sampled_from(sorted(BOUNDED)).flatmap(
        lambda where: st.integers(-1, 1).map(lambda d: Inflated(where, BOUNDED[where] + d, d > 0))
    ),
    st.booleans(),
)
def test_fuzz_stats_become_metrics_within_the_bounds_or_internal(
    stats: agent_pb2.StatsContainerResponse, inflated: Inflated | None, cgroup_v2: bool
) -> None:
    if inflated is not None:
        inflate(stats, inflated.where, inflated.length)
    fits = within_bounds(stats)
    if inflated is not None and inflated.over:
        assert not fits, inflated
    if not fits:
        with pytest.raises(Internal, match="stats from the guest refused"):
            metrics_any(stats, cgroup_v2=cgroup_v2)
        return
    metrics = metrics_any(stats, cgroup_v2=cgroup_v2)
    if cgroup_v2:
        assert metrics.type_url == V2_TYPE_URL
        m2 = v2.Metrics.FromString(metrics.value)
        assert len(m2.network) <= MAX_INTERFACES
        assert len(m2.hugetlb) <= MAX_HUGEPAGE_SIZES
    else:
        assert metrics.type_url == V1_TYPE_URL
        m1 = v1.Metrics.FromString(metrics.value)
        assert len(m1.network) <= MAX_INTERFACES
        assert len(m1.cpu.usage.per_cpu) <= MAX_CPUS
        assert len(m1.blkio.io_service_bytes_recursive) <= MAX_BLKIO_ENTRIES
