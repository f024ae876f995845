"""The agent channels: choosing one, hybrid vsock's handshake, and VMs on each."""

from __future__ import annotations

import os
import signal
import socket
import uuid
from pathlib import Path

import pytest
import trio

from shimv2.errdefs import Unavailable
from shimv2.vc import agent as agent_module
from shimv2.vc.agent import connect_agent, hybrid_handshake
from shimv2.vc.hypervisor import AgentEndpoint
from shimv2.vc.qemu import Qemu
from shimv2.vc.qemu_config import QemuConfig, default_backend, resolve_channel
from shimv2.vc.testing import FakeHybridBackend
from shimv2.vc.vsock import listening, vsock_start_grace
from tests.leaks import vm_processes


def _qemu(tmp_path: Path, **overrides: object) -> Qemu:
    share = tmp_path / "shared"
    share.mkdir(exist_ok=True)
    config = QemuConfig(shared_dir=str(share), **overrides)  # type: ignore[arg-type]
    vm_id = f"v-{uuid.uuid4().hex[:12]}"
    return Qemu(vm_id, config, Path("/run/kata-py/vm") / vm_id)


def test_auto_takes_the_first_channel_this_host_supports(tmp_path: Path) -> None:
    backend = tmp_path / "vhost-device-vsock"
    backend.write_text("#!/bin/sh\n")
    backend.chmod(0o755)
    vhost = tmp_path / "vhost-vsock"
    assert resolve_channel("auto", str(backend), str(vhost)) == "hybrid-vsock"
    vhost.touch()
    assert resolve_channel("auto", str(backend), str(vhost)) == "vsock"
    assert resolve_channel("auto", "", str(tmp_path / "none")) == "serial"
    assert resolve_channel("auto", str(tmp_path / "missing"), str(tmp_path / "none")) == "serial"
    for explicit in ("serial", "vsock", "hybrid-vsock"):
        assert resolve_channel(explicit, "", str(vhost)) == explicit


def test_each_channel_on_the_command_line(tmp_path: Path) -> None:
    # On mmio on a microvm, even one with a PCIe bus (the root image's), unlike its
    # serial ports (qemu.py says why).
    cases = (
        ("microvm", None, "device"),
        ("microvm", "", "device"),
        ("q35", None, "pci"),
    )
    for machine, image, suffix in cases:
        more = {} if image is None else {"image": image}
        kernel = _qemu(tmp_path, machine=machine, agent_channel="vsock", **more)
        argv = kernel.argv()
        # The kernel's vhost-vsock, exactly as a host with /dev/vhost-vsock runs it.
        assert f"vhost-vsock-{suffix},guest-cid=3" in argv
        assert "kata_py.channel=vsock" in " ".join(argv)
        assert not any("agent.channel.0" in a for a in argv)
        hybrid = _qemu(tmp_path, machine=machine, agent_channel="hybrid-vsock", **more)
        argv = hybrid.argv()
        assert f"socket,id=vsock,path={hybrid.vhost_vsock_path}" in argv
        assert f"vhost-user-vsock-{suffix},chardev=vsock" in argv
        assert "kata_py.channel=vsock" in " ".join(argv)
        serial = _qemu(tmp_path, machine=machine, agent_channel="serial", **more)
        argv = serial.argv()
        assert "kata_py.channel=serial" in " ".join(argv)
        assert any("name=agent.channel.0" in a for a in argv)
        assert not any("vsock" in a for a in argv)
    # vhost-user needs guest RAM the backend can map, even without virtio-fs.
    bare = Qemu("v-bare", QemuConfig(agent_channel="hybrid-vsock", image=""), tmp_path / "b")
    assert any(a.startswith("memory-backend-memfd,id=mem,") for a in bare.argv())


async def test_the_hybrid_handshake(tmp_path: Path, nursery: trio.Nursery) -> None:
    async def dial(reply: bytes | None) -> trio.SocketStream:
        backend = FakeHybridBackend(tmp_path / f"h{uuid.uuid4().hex[:6]}.sock", reply)
        await nursery.start(backend.serve)
        stream = await trio.open_unix_socket(str(backend.path))
        try:
            await hybrid_handshake(stream, 1024)
        except BaseException:
            await stream.aclose()
            raise
        assert backend.requests == [b"CONNECT 1024\n"]
        return stream

    # Whatever number follows OK (the guest port here, a host port for Firecracker).
    for reply in (b"OK 1024\n", b"OK 52731\n"):
        stream = await dial(reply)
        await stream.send_all(b"ttrpc")  # nothing of the stream was read with the reply
        assert await stream.receive_some(5) == b"ttrpc"
        await stream.aclose()
    for bad in (b"ERR no listener\n", b"OK\n", b"OK 12 34\n", b"x" * 40):
        with pytest.raises(Unavailable, match="hybrid vsock"):
            await dial(bad)
    with pytest.raises(ConnectionResetError):  # not listening yet: the caller retries
        await dial(None)


async def test_a_silent_hybrid_backend_is_retried_until_the_deadline(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest too busy to answer CONNECT in time (seen with pods starting at once
    under TCG) is asked again, not given up on at the first try."""
    monkeypatch.setattr(agent_module, "HANDSHAKE_TIMEOUT", 0.2)
    backend = FakeHybridBackend(tmp_path / "silent.sock", reply=b"")
    await nursery.start(backend.serve)
    endpoint = AgentEndpoint(hybrid_path=str(backend.path))
    with pytest.raises(Unavailable, match=r"agent not reachable.*no reply to CONNECT"):
        async with connect_agent(endpoint, ready_timeout=0.7):
            pass
    assert len(backend.requests) >= 2  # it kept asking


async def test_connect_agent_retries_until_the_guest_listens(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    backend = FakeHybridBackend(tmp_path / "late.sock", reply=None)
    await nursery.start(backend.serve)
    endpoint = AgentEndpoint(hybrid_path=str(backend.path))
    with pytest.raises(Unavailable, match="agent not reachable"):
        async with connect_agent(endpoint, ready_timeout=0.5):
            pass
    assert len(backend.requests) >= 2  # it kept asking


async def test_no_dial_before_the_channel_is_ready(tmp_path: Path, nursery: trio.Nursery) -> None:
    """The endpoint's ``ready`` gates the first dial (a vsock backend must not be
    dialled while the guest starts its device), within the same deadline."""
    backend = FakeHybridBackend(tmp_path / "gated.sock", reply=None)
    await nursery.start(backend.serve)
    opened = trio.Event()
    seen_before: list[int] = []

    async def ready() -> None:
        await opened.wait()
        seen_before.append(len(backend.requests))

    endpoint = AgentEndpoint(hybrid_path=str(backend.path), ready=ready)
    with pytest.raises(Unavailable, match=r"channel was not ready within 0\.3s"):
        async with connect_agent(endpoint, ready_timeout=0.3):
            pass
    assert backend.requests == []  # never dialled while not ready

    async def open_soon() -> None:
        await trio.sleep(0.2)
        opened.set()

    nursery.start_soon(open_soon)
    with pytest.raises(Unavailable, match="agent not reachable"):
        async with connect_agent(endpoint, ready_timeout=0.8):
            pass
    assert seen_before == [0]
    assert len(backend.requests) >= 1  # dialled once ready


@pytest.mark.vm
@pytest.mark.parametrize("channel", ["hybrid-vsock", "serial"])
async def test_a_vm_on_each_channel_answers_and_leaves_nothing(
    tmp_path: Path, nursery: trio.Nursery, channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert default_backend(), "vhost-device-vsock is missing: run scripts/setup"
    vm = _qemu(tmp_path, agent_channel=channel)
    await vm.start(nursery)
    try:
        assert vm.channel == channel
        first = vm.agent_endpoint()
        async with connect_agent(first, ready_timeout=90) as agent:
            assert await agent.check(timeout=10)
        if channel == "hybrid-vsock":
            assert vm.vsock_backend_pid is not None
            assert first.hybrid_path == str(vm.hybrid_vsock_path)
            # The first dial waited for QEMU to say the device is started, found by
            # QMP (not the fallback for a QEMU that cannot tell); later dials need not.
            assert first.ready is not None
            assert "cannot tell when vsock is started" not in caplog.text
            assert vm.agent_endpoint().ready is None
        else:
            assert vm.vsock_backend_pid is None
            assert vm.agent_endpoint().ready is None
    finally:
        await vm.shutdown()
    assert vm_processes(vm.vm_id) == []
    assert not vm.run_dir.exists()


@pytest.mark.vm
async def test_a_killed_vsock_backend_ends_the_vm(tmp_path: Path, nursery: trio.Nursery) -> None:
    vm = _qemu(tmp_path, agent_channel="hybrid-vsock")
    await vm.start(nursery)
    try:
        assert vm.vsock_backend_pid is not None
        os.kill(vm.vsock_backend_pid, signal.SIGKILL)  # like a dead virtiofsd
        with trio.fail_after(10):
            await vm.wait_exited()
    finally:
        await vm.shutdown()
    assert vm_processes(vm.vm_id) == []


def test_check_reports_the_channel(tmp_path: Path) -> None:
    from shimv2 import cli

    config = tmp_path / "configuration.toml"
    config.write_text('[hypervisor.qemu]\nagent_channel = "serial"\n')
    checks = {name: (ok, detail) for name, ok, detail in cli._checks(str(config))}
    assert checks["agent channel"] == (True, "serial (virtio-serial); agent_channel = serial")
    config.write_text(
        '[hypervisor.qemu]\nagent_channel = "hybrid-vsock"\nvsock_backend = "/nonexistent"\n'
    )
    ok, detail = {n: (o, d) for n, o, d in cli._checks(str(config))}["agent channel"]
    assert not ok
    assert detail.startswith("hybrid-vsock (/nonexistent)")


def test_a_socket_bound_but_not_yet_listening_is_not_listening(tmp_path: Path) -> None:
    # QEMU and the vsock backend bind, then listen: a connect in between is refused,
    # so the shim waits for the listen (the QMP socket's race, seen once under load).
    path = tmp_path / "qmp.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        assert path.exists()
        assert not listening(path)
        server.listen(1)
        assert listening(path)


def test_the_start_grace_grows_with_a_busy_host_within_bounds() -> None:
    assert vsock_start_grace(0.001) == 0.1  # an idle host: the floor
    assert vsock_start_grace(0.05) == pytest.approx(0.5)  # QEMU slow to answer: longer
    assert vsock_start_grace(5.0) == 2.0  # never unbounded
