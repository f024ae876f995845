"""The shim's metrics endpoint: exposition checked by prometheus_client's parser, real /proc."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from shimv2.shim.bootstrap import monitor_socket
from shimv2.shim.metrics import (
    BUCKETS_MS,
    RpcHistogram,
    ShimMetrics,
    fetch_metrics,
    listen_monitor,
    sample_process,
    serve_metrics,
)

RPC = "kata_shim_rpc_durations_histogram_milliseconds"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, through the reference parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_histogram_buckets_are_cumulative() -> None:
    hist = RpcHistogram()
    for ms in (0.5, 3.0, 3.0, 99999.0):
        hist.observe("Create", ms)
    hist.observe("State", 1.0)
    got = samples("\n".join(hist.lines(RPC)) + "\n")
    assert got[(f"{RPC}_bucket", (("action", "Create"), ("le", "1.0")))] == 1
    assert got[(f"{RPC}_bucket", (("action", "Create"), ("le", "5.0")))] == 3
    assert got[(f"{RPC}_bucket", (("action", "Create"), ("le", str(BUCKETS_MS[-1]))))] == 3
    assert got[(f"{RPC}_bucket", (("action", "Create"), ("le", "+Inf")))] == 4
    assert got[(f"{RPC}_count", (("action", "Create"),))] == 4
    assert got[(f"{RPC}_sum", (("action", "Create"),))] == pytest.approx(100005.5)
    assert got[(f"{RPC}_bucket", (("action", "State"), ("le", "1.0")))] == 1


def test_sample_process_reads_proc() -> None:
    own = sample_process(os.getpid())
    assert own is not None
    assert own.status["VmRSS"] > 1 << 20
    assert own.fds > 2
    assert own.threads >= 1
    child = subprocess.Popen(["true"])
    child.wait()
    assert sample_process(child.pid) is None  # gone


@pytest.fixture
def vm() -> Iterable[subprocess.Popen[bytes]]:
    """A real process standing in for a pod's QEMU."""
    proc = subprocess.Popen(["sleep", "100"])
    while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "sleep":
        time.sleep(0.01)  # until the exec is done and the memory is sleep's
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
async def monitor(
    tmp_path: Path, nursery: trio.Nursery, vm: subprocess.Popen[bytes]
) -> tuple[str, ShimMetrics]:
    metrics = ShimMetrics(
        lambda: [("pod1", "hypervisor", vm.pid), ("pod1", "virtiofsd", 999999999)]
    )
    path = monitor_socket(str(tmp_path), "pod1")
    await nursery.start(serve_metrics, listen_monitor(path), metrics)
    return path, metrics


async def http(path: str, request: bytes) -> tuple[int, dict[str, str], str]:
    stream = await trio.open_unix_socket(path)
    async with stream:
        await stream.send_all(request)
        raw = b""
        while chunk := await stream.receive_some(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), headers, body.decode()


async def test_get_metrics(monitor: tuple[str, ShimMetrics], vm: subprocess.Popen[bytes]) -> None:
    path, metrics = monitor
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    metrics.observe_call("containerd.task.v2.Task", "Create", 0.2, 0)
    status, headers, body = await http(path, b"GET /metrics HTTP/1.1\r\nHost: shim\r\n\r\n")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    got = samples(body)
    assert got[(f"{RPC}_count", (("action", "Create"),))] == 1
    assert got[("kata_shim_proc_status", (("item", "vmrss"),))] > 1 << 20
    assert got[("kata_shim_threads", ())] >= 1
    vm_rss = got[("kata_hypervisor_proc_status", (("item", "vmrss"), ("sandbox_id", "pod1")))]
    assert vm_rss > 256 << 10  # bytes: sleep's RSS is a few hundred kB or more
    assert got[("kata_hypervisor_fds", (("sandbox_id", "pod1"),))] >= 3
    # a process that is gone is left out, not reported as zero
    assert not any(name.startswith("kata_virtiofsd") for name, _ in got)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /other HTTP/1.1\r\nHost: shim\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\nHost: shim\r\nContent-Length: 0\r\n\r\n", 405),
        (b"NONSENSE\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: shim\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
    ],
)
async def test_bad_requests_get_an_error_and_the_next_one_is_served(
    monitor: tuple[str, ShimMetrics], request_bytes: bytes, status: int
) -> None:
    path, _ = monitor
    assert (await http(path, request_bytes))[0] == status
    assert (await http(path, b"GET /metrics HTTP/1.1\r\nHost: shim\r\n\r\n"))[0] == 200


async def test_a_client_that_says_nothing_costs_nothing(monitor: tuple[str, ShimMetrics]) -> None:
    path, _ = monitor
    silent = await trio.open_unix_socket(path)
    async with silent:
        assert (await http(path, b"GET /metrics HTTP/1.0\r\n\r\n"))[0] == 200


async def test_fetch_metrics_as_the_cli_does(monitor: tuple[str, ShimMetrics]) -> None:
    path, _ = monitor
    text = await trio.to_thread.run_sync(fetch_metrics, path)
    assert ("kata_shim_threads", ()) in samples(text)


async def test_a_live_monitor_socket_is_never_taken_over(
    monitor: tuple[str, ShimMetrics], tmp_path: Path
) -> None:
    path, _ = monitor
    with pytest.raises(FileExistsError, match="another shim"):
        listen_monitor(path)
    assert (await http(path, b"GET /metrics HTTP/1.0\r\n\r\n"))[0] == 200
    stale = str(tmp_path / "stale.sock")
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(stale)  # bound, never listening: what a killed shim leaves
    listen_monitor(stale).close()
