"""The agent channel: a pty stands in for the virtio-serial port.

A pty's master behaves like the guest's end of the port: reads fail (EIO)
while no "host" holds the slave open, and the slave can be closed and opened
again, as QEMU's chardev socket is by successive host processes.

The guest's end runs on asyncio in a thread of its own (``asyncio_in_thread``),
the host's ttrpc client on trio in the test, as in a VM and its shim.
"""

from __future__ import annotations

import asyncio
import os
import pty
import socket
import tty
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio
from google.protobuf.wrappers_pb2 import BytesValue

from shimv2.errdefs import Unavailable
from shimv2.guest import channel as ch
from shimv2.ttrpc import Client, FdTransport, open_client
from shimv2.ttrpc._codec import Connection, Role
from shimv2.ttrpc.aio import Server, SocketTransport
from shimv2.ttrpc.testing import INTEROP_SERVICE, InteropHandlers
from tests.aio import asyncio_in_thread, asyncio_test


class PtyPort:
    """The master is the agent's port; ``connect`` opens the slave as a new host."""

    def __init__(self) -> None:
        self.master, slave = pty.openpty()
        self.slave_path = os.ttyname(slave)
        tty.setraw(slave)
        os.close(slave)

    def open_host(self) -> int:
        fd = os.open(self.slave_path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        tty.setraw(fd)
        return fd

    def close(self) -> None:
        os.close(self.master)


def host_client(fd: int) -> AbstractAsyncContextManager[Client]:
    return open_client(FdTransport(fd))


async def echo(client: Client, data: bytes) -> bytes:
    resp = await client.call(INTEROP_SERVICE, "Echo", BytesValue(value=data), BytesValue)
    return resp.value


@pytest.fixture
def port() -> Iterator[PtyPort]:
    p = PtyPort()
    yield p
    p.close()


async def test_serial_port_serves_successive_hosts(port: PtyPort) -> None:
    server = Server([InteropHandlers().service()])
    connections: list[int] = []
    with asyncio_in_thread(
        lambda: ch.serve_port(server, port.master, on_connection=connections.append)
    ):
        await trio.sleep(0.05)  # the agent idles, polling, while no host is there
        for round_ in range(3):
            # Each host is a new process: its client's stream ids start at 1 again.
            async with host_client(port.open_host()) as client:
                with trio.fail_after(5):
                    assert await echo(client, b"hello %d" % round_) == b"hello %d" % round_
                    big = os.urandom(200_000)  # more than a pty buffer: exercises drain
                    assert await echo(client, big) == big
    assert connections == [1, 2, 3]


async def test_a_new_host_is_found_even_without_an_eof(port: PtyPort) -> None:
    # The second host opens the port before the first closes it: the agent never reads an
    # EOF in between (what a fast reconnect to QEMU's chardev socket looks like), and finds
    # the new host by its first request's stream id 1.
    server = Server([InteropHandlers().service()])
    connections: list[int] = []
    with asyncio_in_thread(
        lambda: ch.serve_port(server, port.master, on_connection=connections.append)
    ):
        first = port.open_host()
        async with host_client(os.dup(first)) as client:
            for i in range(3):
                assert await echo(client, b"one %d" % i) == b"one %d" % i
            second = port.open_host()
        os.close(first)
        async with host_client(second) as client:
            with trio.fail_after(5):
                assert await echo(client, b"two") == b"two"
                assert await echo(client, b"two again") == b"two again"
    assert connections == [1, 2]


@asyncio_test
async def test_host_connection_splits_at_a_new_hosts_first_request() -> None:
    codec_a, codec_b = Connection(Role.CLIENT), Connection(Role.CLIENT)
    a1 = codec_a.send_request("s", "m", b"x" * 20)[1]
    a3 = codec_a.send_request("s", "m", b"y")[1]
    b1 = codec_b.send_request("s", "m", b"z")[1]
    wire = a1 + a3 + b1
    ours, theirs = socket.socketpair()
    transport = ch.HostConnection(SocketTransport(ours), wire[:3])
    for i in range(3, len(wire)):  # byte by byte: headers split across reads
        theirs.send(wire[i : i + 1])
    got = b""
    while chunk := await transport.receive_some():
        got += chunk
    assert got == a1 + a3
    assert transport.carry == b1
    await transport.aclose()
    theirs.close()


async def test_serial_port_survives_a_broken_frame(port: PtyPort) -> None:
    server = Server([InteropHandlers().service()])
    with asyncio_in_thread(lambda: ch.serve_port(server, port.master)):
        host = port.open_host()
        # A header announcing 100 bytes, then the host goes away mid-frame.
        os.write(host, b"\x00\x00\x00\x64\x00\x00\x00\x01\x01\x00partial")
        await trio.sleep(0.1)
        os.close(host)
        await trio.sleep(0.1)
        async with host_client(port.open_host()) as client:
            with trio.fail_after(5):
                assert await echo(client, b"after") == b"after"


async def test_host_leaving_fails_its_calls_cleanly(port: PtyPort) -> None:
    handlers = InteropHandlers()
    server = Server([handlers.service()])
    with asyncio_in_thread(lambda: ch.serve_port(server, port.master)):
        host = port.open_host()
        client = Client(FdTransport(host))
        async with trio.open_nursery() as inner:
            inner.start_soon(client.receive_loop)
            assert await echo(client, b"x") == b"x"
            await client.aclose()  # the host goes away
        with pytest.raises(Unavailable):
            await echo(client, b"y")
        async with host_client(port.open_host()) as again:
            with trio.fail_after(5):
                assert await echo(again, b"z") == b"z"


async def test_listener_serves_concurrent_connections(tmp_path: Path) -> None:
    # The vsock path with a unix socket in place of AF_VSOCK.
    server = Server([InteropHandlers().service()])
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "agent.sock"))
    listener.listen()
    with asyncio_in_thread(lambda: ch.serve_listener(server, listener)):
        clients = []
        for _ in range(2):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(tmp_path / "agent.sock"))
            clients.append(sock)
        async with (
            host_client(os.dup(clients[0].fileno())) as a,
            host_client(os.dup(clients[1].fileno())) as b,
        ):
            assert await echo(a, b"a") == b"a"
            assert await echo(b, b"b") == b"b"
        for sock in clients:
            sock.close()
    listener.close()  # once the guest no longer waits on it


def test_find_serial_port(tmp_path: Path) -> None:
    dev, sys_ports = tmp_path / "dev", tmp_path / "sys"
    dev.mkdir()
    (sys_ports / "vport0p0").mkdir(parents=True)
    (sys_ports / "vport0p0" / "name").write_text("other\n")
    assert ch.find_serial_port(dev=dev, sys_ports=sys_ports) is None
    (sys_ports / "vport0p1").mkdir()
    (sys_ports / "vport0p1" / "name").write_text("agent.channel.0\n")
    assert ch.find_serial_port(dev=dev, sys_ports=sys_ports) is None  # no node yet
    (dev / "vport0p1").touch()
    assert ch.find_serial_port(dev=dev, sys_ports=sys_ports) == dev / "vport0p1"
    (dev / "virtio-ports").mkdir()
    (dev / "virtio-ports" / "agent.channel.0").symlink_to("../vport0p1")
    assert ch.find_serial_port(dev=dev, sys_ports=sys_ports) == dev / "virtio-ports/agent.channel.0"


@asyncio_test
async def test_wait_for_serial_port_is_bounded(tmp_path: Path) -> None:
    async with asyncio.timeout(2):
        assert await ch.wait_for_serial_port(0.1, dev=tmp_path, sys_ports=tmp_path) is None


def test_open_port_failure_is_a_channel_error(tmp_path: Path) -> None:
    with pytest.raises(ch.ChannelError):
        ch.open_port(tmp_path / "missing")


def test_only_the_host_may_dial_the_agent_over_vsock() -> None:
    vsock = socket.AF_VSOCK
    assert ch.host_peer(vsock, (socket.VMADDR_CID_HOST, 1234))
    for peer in ((1, 1234), (3, 1234), (socket.VMADDR_CID_ANY, 1), "", None):
        assert not ch.host_peer(vsock, peer)  # loopback, another VM, garbage
    assert ch.host_peer(socket.AF_UNIX, "")  # the tests' unix listeners
