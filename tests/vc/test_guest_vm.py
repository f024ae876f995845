"""The guest for real: QEMU (TCG here) boots our kernel and initramfs, our agent
serves Kata's agent API on virtio-serial, containers run with crun on a busybox
rootfs shared from the host over virtio-fs.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from google.protobuf.empty_pb2 import Empty

from shimv2 import errdefs
from shimv2.pb.kata import agent_pb2, health_pb2, oci_pb2
from shimv2.vc.agent import AgentClient, connect_agent
from shimv2.vc.qemu import Qemu
from shimv2.vc.qemu_config import QemuConfig, default_guest_dir
from shimv2.vc.storage import GUEST_SHARED
from tests.guest.rootfs import build_rootfs, make_process, make_spec
from tests.leaks import vm_processes

pytestmark = pytest.mark.vm

GUEST_KERNEL = (default_guest_dir() / "kver").read_text().strip()


@dataclass
class Guest:
    vm: Qemu
    agent: AgentClient
    shared: Path
    ready_after: float


@pytest.fixture
async def guest(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Guest]:
    vm_id = f"g-{uuid.uuid4().hex[:10]}"
    shared = tmp_path / "shared"
    shared.mkdir()
    vm = Qemu(vm_id, QemuConfig(shared_dir=str(shared)), Path("/run/kata-py/vm") / vm_id)
    start = time.monotonic()
    await vm.start(nursery)
    try:
        async with connect_agent(vm.agent_endpoint(), ready_timeout=90) as agent:
            ready = time.monotonic() - start
            print(f"\nQEMU launch to agent ready: {ready:.2f}s ({vm.accelerator})")
            yield Guest(vm, agent, shared, ready)
    finally:
        await vm.shutdown()
    assert vm_processes(vm_id) == []
    assert not vm.run_dir.exists()


def _rootfs(guest: Guest, cid: str) -> str:
    build_rootfs(guest.shared / cid / "rootfs")
    return f"{GUEST_SHARED}/{cid}/rootfs"


async def _create(guest: Guest, cid: str, args: list[str], *, terminal: bool = False) -> None:
    spec = make_spec(_rootfs(guest, cid), args, terminal=terminal)
    request = agent_pb2.CreateContainerRequest(container_id=cid, exec_id=cid, OCI=spec)
    await guest.agent.call("CreateContainer", request, Empty)


async def _start(guest: Guest, cid: str) -> None:
    await guest.agent.call(
        "StartContainer", agent_pb2.StartContainerRequest(container_id=cid), Empty
    )


async def _read_all(guest: Guest, cid: str, exec_id: str = "", rpc: str = "ReadStdout") -> bytes:
    out = b""
    while True:
        request = agent_pb2.ReadStreamRequest(container_id=cid, exec_id=exec_id, len=65536)
        chunk = await guest.agent.call(rpc, request, agent_pb2.ReadStreamResponse)
        if not chunk.data:
            return out
        out += chunk.data


async def _wait(guest: Guest, cid: str, exec_id: str = "") -> int:
    request = agent_pb2.WaitProcessRequest(container_id=cid, exec_id=exec_id)
    return (await guest.agent.call("WaitProcess", request, agent_pb2.WaitProcessResponse)).status


async def _remove(guest: Guest, cid: str) -> None:
    request = agent_pb2.RemoveContainerRequest(container_id=cid, timeout=10)
    await guest.agent.call("RemoveContainer", request, Empty)


async def test_boot_health_and_guest_kernel(guest: Guest) -> None:
    health = await guest.agent._client.call(
        "grpc.Health", "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    details = await guest.agent.call(
        "GetGuestDetails", agent_pb2.GuestDetailsRequest(), agent_pb2.GuestDetailsResponse
    )
    assert details.agent_details.version
    assert details.agent_details.init_daemon is False  # init is the shell; the agent is its child

    t0 = time.monotonic()
    await _create(guest, "uname", ["uname", "-r"])
    await _start(guest, "uname")
    print(f"container create+start in the guest: {time.monotonic() - t0:.2f}s")
    out = await _read_all(guest, "uname")
    assert await _wait(guest, "uname") == 0
    assert out.decode().strip() == GUEST_KERNEL
    assert out.decode().strip() != os.uname().release
    await _remove(guest, "uname")


async def test_exec_stdin_tty_signals_and_exit_codes(guest: Guest) -> None:
    await _create(guest, "box", ["sleep", "1000"])
    await _start(guest, "box")

    # exec with its own stdio
    exec_req = agent_pb2.ExecProcessRequest(
        container_id="box",
        exec_id="e1",
        process=make_process(["sh", "-c", "echo out; echo err >&2; exit 3"]),
    )
    await guest.agent.call("ExecProcess", exec_req, Empty)
    assert await _read_all(guest, "box", "e1") == b"out\n"
    assert await _read_all(guest, "box", "e1", "ReadStderr") == b"err\n"
    assert await _wait(guest, "box", "e1") == 3

    # stdin -> stdout through cat, closed by CloseStdin
    cat = agent_pb2.ExecProcessRequest(
        container_id="box", exec_id="cat", process=make_process(["cat"])
    )
    await guest.agent.call("ExecProcess", cat, Empty)
    write = agent_pb2.WriteStreamRequest(container_id="box", exec_id="cat", data=b"ping\n")
    assert (await guest.agent.call("WriteStdin", write, agent_pb2.WriteStreamResponse)).len == 5
    await guest.agent.call(
        "CloseStdin", agent_pb2.CloseStdinRequest(container_id="box", exec_id="cat"), Empty
    )
    assert await _read_all(guest, "box", "cat") == b"ping\n"
    assert await _wait(guest, "box", "cat") == 0

    # a terminal with a resize
    tty = agent_pb2.ExecProcessRequest(
        container_id="box",
        exec_id="tty",
        process=make_process(["sh", "-c", "sleep 1; stty size"], terminal=True),
    )
    await guest.agent.call("ExecProcess", tty, Empty)
    resize = agent_pb2.TtyWinResizeRequest(container_id="box", exec_id="tty", row=33, column=101)
    await guest.agent.call("TtyWinResize", resize, Empty)
    assert b"33 101" in await _read_all(guest, "box", "tty")
    assert await _wait(guest, "box", "tty") == 0

    # signals: a trapped SIGTERM exits 143; SIGKILL on the init gives 137
    trap = agent_pb2.ExecProcessRequest(
        container_id="box",
        exec_id="trap",
        process=make_process(["sh", "-c", "trap 'exit 143' TERM; while :; do sleep 0.1; done"]),
    )
    await guest.agent.call("ExecProcess", trap, Empty)
    await trio.sleep(0.5)
    sig = agent_pb2.SignalProcessRequest(container_id="box", exec_id="trap", signal=signal.SIGTERM)
    await guest.agent.call("SignalProcess", sig, Empty)
    assert await _wait(guest, "box", "trap") == 143
    kill = agent_pb2.SignalProcessRequest(container_id="box", exec_id="", signal=signal.SIGKILL)
    await guest.agent.call("SignalProcess", kill, Empty)
    assert await _wait(guest, "box") == 137
    await _remove(guest, "box")


async def test_stats_pause_resume_and_processes(guest: Guest) -> None:
    await _create(guest, "busy", ["sh", "-c", "while :; do :; done"])
    await _start(guest, "busy")
    await trio.sleep(0.5)
    stats = await guest.agent.call(
        "StatsContainer",
        agent_pb2.StatsContainerRequest(container_id="busy"),
        agent_pb2.StatsContainerResponse,
    )
    assert stats.cgroup_stats.cpu_stats.cpu_usage.total_usage > 0
    assert stats.cgroup_stats.memory_stats.usage.usage > 0
    ps = await guest.agent.call(
        "ListProcesses",
        agent_pb2.ListProcessesRequest(container_id="busy", format="json"),
        agent_pb2.ListProcessesResponse,
    )
    assert len(__import__("json").loads(ps.process_list)) >= 1
    await guest.agent.call(
        "PauseContainer", agent_pb2.PauseContainerRequest(container_id="busy"), Empty
    )
    before = (await guest.agent.call(
        "StatsContainer", agent_pb2.StatsContainerRequest(container_id="busy"),
        agent_pb2.StatsContainerResponse,
    )).cgroup_stats.cpu_stats.cpu_usage.total_usage  # fmt: skip
    await trio.sleep(0.5)
    after = (await guest.agent.call(
        "StatsContainer", agent_pb2.StatsContainerRequest(container_id="busy"),
        agent_pb2.StatsContainerResponse,
    )).cgroup_stats.cpu_stats.cpu_usage.total_usage  # fmt: skip
    assert after - before < 50_000_000  # frozen: (almost) no CPU in half a second
    await guest.agent.call(
        "ResumeContainer", agent_pb2.ResumeContainerRequest(container_id="busy"), Empty
    )
    await _remove(guest, "busy")


async def test_bad_requests_are_refused_and_the_agent_keeps_serving(guest: Guest) -> None:
    with pytest.raises(errdefs.InvalidArgument):
        await guest.agent.call(
            "StartContainer", agent_pb2.StartContainerRequest(container_id="../etc"), Empty
        )
    with pytest.raises(errdefs.NotFound):
        await guest.agent.call(
            "StartContainer", agent_pb2.StartContainerRequest(container_id="nope"), Empty
        )
    with pytest.raises(errdefs.Unimplemented):
        await guest.agent.call("SetPolicy", Empty(), Empty)
    with pytest.raises(errdefs.InvalidArgument):
        # a spec without a process
        await guest.agent.call(
            "CreateContainer",
            agent_pb2.CreateContainerRequest(container_id="nospec", exec_id="nospec"),
            Empty,
        )
    assert await guest.agent.check(timeout=5)


async def test_a_new_host_connection_gets_a_fresh_channel(guest: Guest) -> None:
    # The fixture's client holds the channel; a second process would connect
    # after it leaves. Simulate that: a raw garbage frame, then a new client.
    await guest.agent._client.aclose()
    async with connect_agent(guest.vm.agent_endpoint(), ready_timeout=30) as fresh:
        assert await fresh.check(timeout=5)
        details = await fresh.call(
            "GetGuestDetails", agent_pb2.GuestDetailsRequest(), agent_pb2.GuestDetailsResponse
        )
        assert details.agent_details.version


async def test_oom_is_reported(guest: Guest) -> None:
    # Run from a tmpfs: with no swap nothing can be reclaimed, so the limit
    # ends in the OOM killer instead of endless re-reading of busybox from virtio-fs.
    hog = "exec /tmp/busybox head -c 60000000 /dev/zero > /tmp/fill"
    script = f"/bin/busybox cp /bin/busybox /tmp/busybox && exec /tmp/busybox sh -c '{hog}'"
    spec = make_spec(_rootfs(guest, "hog"), ["sh", "-c", script])
    spec.Mounts.append(oci_pb2.Mount(destination="/tmp", type="tmpfs", source="tmpfs"))
    spec.Linux.Resources.Memory.Limit = 16 << 20
    request = agent_pb2.CreateContainerRequest(container_id="hog", exec_id="hog", OCI=spec)
    await guest.agent.call("CreateContainer", request, Empty)
    await _start(guest, "hog")
    with trio.fail_after(60):
        assert await _wait(guest, "hog") == 137
        event = await guest.agent.call(
            "GetOOMEvent", agent_pb2.GetOOMEventRequest(), agent_pb2.OOMEvent
        )
    assert event.container_id == "hog"
    await _remove(guest, "hog")
