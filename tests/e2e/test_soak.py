"""A short soak (``tests/e2e/soak.py``; ``bench/soak.py`` runs the long one).

Pods cloned from a template, so that a cycle takes seconds, beside one pod
that lives through every cycle.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import Containerd, assert_nothing_left, shim_sockets
from tests.e2e.soak import Counts, Soak
from tests.e2e.test_factory import templated
from tests.leaks import cgroup_dirs

pytestmark = pytest.mark.vm
__all__ = ["templated"]  # the fixture, used by name

CYCLES = 4
RSS_GROWTH_MIB = 8.0  # allocator noise over a few cycles; a leak per request grows more


def test_pods_come_and_go_and_nothing_accumulates(templated: tuple[Containerd, Path]) -> None:
    cd, _ = templated
    before, cgroups_before = shim_sockets(), cgroup_dirs()
    assert Counts.now(cd).tasks == 0
    soak = Soak(cd, "io.containerd.kata-py.v2", pods=2)
    try:
        baseline = soak.start()
        assert baseline.shims == 1
        assert baseline.tasks == 1
        for n in range(CYCLES):
            sample = soak.cycle(n)
            assert sample.counts == baseline, f"cycle {n}: {sample.counts} != {baseline}"
        first, last = soak.samples[0], soak.samples[-1]
        assert last.fds <= first.fds, [s.fds for s in soak.samples]
        assert last.rss_mib - first.rss_mib < RSS_GROWTH_MIB, [s.rss_mib for s in soak.samples]
    finally:
        soak.stop()
    assert_nothing_left(before, cgroups_before)
