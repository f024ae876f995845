"""The agent's channel to the host: a virtio-serial port or an AF_VSOCK listener.

virtio-serial has no connections, only a port that the host side opens and
closes (QEMU's chardev socket). While no host is connected a read returns 0
bytes (EOF) and poll reports POLLHUP, and whatever the guest writes is lost; so
the guest speaks only after the host does. ``serve_port`` therefore waits until
a read returns data, then serves a fresh ttrpc connection (fresh codec: a new
host process restarts its stream ids at 1) that starts with those bytes, until
the host closes (EOF) or breaks the protocol; then it waits again.

vsock is a plain listener: one ``SocketTransport`` per accepted connection.

Error handling: only opening the port or the listener can fail the channel
(``ChannelError``); everything that goes wrong on one connection resets that
connection and is logged.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from shimv2.aio import TASK_STATUS_IGNORED, TaskStatus, checkpoint, move_on_after, wait_readable
from shimv2.guest_protocol import AGENT_PORT_NAME
from shimv2.ttrpc._codec import HEADER, MessageType
from shimv2.ttrpc._nonblocking import Transport
from shimv2.ttrpc.aio import FdTransport, Server, SocketTransport

log = logging.getLogger(__name__)

VSOCK_PORT = 1024
# How often to look again while the host side is not connected (reads return EOF).
IDLE_POLL = 0.02
# Reads that mean "no host connected": EOF on virtio-serial; EIO on a pty master
# (tests use a pty as a stand-in for the port: its slave side is the "host").
_NO_HOST_ERRNOS = {errno.EIO, errno.ENXIO, errno.EPIPE}
_REQUEST = MessageType.REQUEST


class ChannelError(Exception):
    """The channel itself cannot be opened: the agent cannot do anything useful."""


class HostConnection:
    """The transport of one host connection on the serial port.

    It starts with the bytes already read, and it also finds the start of the
    *next* host when the port never reported EOF in between (the host closed
    its socket and a new one connected before the guest read again): it follows
    the frame boundaries, and a request with stream id 1 after earlier requests
    can only be a new host's first call. It then ends this connection (EOF to
    the codec) and keeps the new host's bytes in ``carry`` for the next one.
    """

    def __init__(self, inner: Transport, first: bytes) -> None:
        self._inner = inner
        self._pending = bytearray(first)  # read, not yet handed to the codec
        self._frame_left = 0  # payload bytes of the current frame not yet scanned
        self._seen_request = False
        self._ended = False
        self.carry = b""

    def _scan(self) -> int:
        """How many pending bytes belong to this connection and are complete enough."""
        pos = 0
        while pos < len(self._pending):
            if self._frame_left:
                step = min(self._frame_left, len(self._pending) - pos)
                pos += step
                self._frame_left -= step
                continue
            if len(self._pending) - pos < HEADER.size:
                break  # hold back a partial header until it is whole
            length, stream_id, mtype, _ = HEADER.unpack_from(self._pending, pos)
            if mtype == _REQUEST:
                if stream_id == 1 and self._seen_request:
                    self.carry = bytes(self._pending[pos:])
                    del self._pending[pos:]
                    self._ended = True
                    log.info("agent channel: a new host started without an EOF; resetting")
                    break
                self._seen_request = True
            pos += HEADER.size
            self._frame_left = length
        return pos

    async def receive_some(self) -> bytes:
        while True:
            ready = self._scan() if not self._ended else len(self._pending)
            if ready:
                data = bytes(self._pending[:ready])
                del self._pending[:ready]
                return data
            if self._ended:
                await checkpoint()
                return b""
            data = await self._inner.receive_some()
            if not data:
                self._ended = True  # EOF: hand over whatever is left, then EOF
                continue
            self._pending += data

    def send_nowait(self, data: bytes) -> None:
        self._inner.send_nowait(data)

    async def drain(self) -> None:
        await self._inner.drain()

    async def aclose(self) -> None:
        await self._inner.aclose()


def find_serial_port(
    name: str = AGENT_PORT_NAME,
    dev: Path = Path("/dev"),
    sys_ports: Path = Path("/sys/class/virtio-ports"),
) -> Path | None:
    """The device of the virtio-serial port called ``name``, or None.

    ``/dev/virtio-ports/<name>`` comes from udev, which the guest lacks; the
    name is also in ``/sys/class/virtio-ports/vportXpY/name``.
    """
    link = dev / "virtio-ports" / name
    if link.exists():
        return link
    try:
        entries = sorted(sys_ports.iterdir())
    except OSError:
        return None
    for entry in entries:
        try:
            if (entry / "name").read_text().strip() == name:
                node = dev / entry.name
                return node if node.exists() else None
        except OSError:
            continue
    return None


def open_port(path: str | os.PathLike[str]) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise ChannelError(f"cannot open agent port {os.fspath(path)}: {exc}") from exc


async def wait_for_host(fd: int, idle_poll: float = IDLE_POLL) -> bytes:
    """Block until the host has sent something; return the first bytes."""
    while True:
        try:
            data = os.read(fd, 64 * 1024)
        except BlockingIOError:
            # Connected, nothing sent yet.
            await wait_readable(fd)
            continue
        except OSError as exc:
            if exc.errno not in _NO_HOST_ERRNOS:
                raise
            data = b""
        if data:
            return data
        # No host: poll would report POLLHUP at once, so sleep instead.
        await asyncio.sleep(idle_poll)


async def serve_port(
    server: Server,
    fd: int,
    *,
    idle_poll: float = IDLE_POLL,
    on_connection: Callable[[int], None] | None = None,
    task_status: TaskStatus = TASK_STATUS_IGNORED,
) -> None:
    """Serve ``server`` on the port ``fd`` (not closed here), one host at a time, forever.

    Each connection gets a dup of the port fd in its own ``FdTransport``, so
    that closing it (and dropping whatever it had queued for a host that left)
    leaves the port open for the next host.
    """
    os.set_blocking(fd, False)
    task_status.started()
    generation = 0
    carry = b""
    while True:
        try:
            first = carry or await wait_for_host(fd, idle_poll)
        except OSError as exc:
            # A port that fails in some other way: log, back off, try again.
            log.warning("agent channel: read failed: %s", exc)
            await asyncio.sleep(1)
            continue
        generation += 1
        log.debug("agent channel: host connected (connection %d)", generation)
        if on_connection is not None:
            on_connection(generation)
        transport = HostConnection(FdTransport(os.dup(fd)), first)
        try:
            await server.serve_transport(transport)
        except Exception:
            log.exception("agent channel: connection %d failed", generation)
        log.debug("agent channel: host gone (connection %d); waiting again", generation)
        carry = transport.carry


def open_vsock_listener(port: int = VSOCK_PORT) -> socket.socket:
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except (AttributeError, OSError) as exc:
        raise ChannelError(f"no AF_VSOCK: {exc}") from exc
    try:
        sock.bind((socket.VMADDR_CID_ANY, port))
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise ChannelError(f"cannot listen on vsock port {port}: {exc}") from exc
    return sock


async def serve_listener(
    server: Server,
    listener: socket.socket,
    *,
    task_status: TaskStatus = TASK_STATUS_IGNORED,
) -> None:
    """Serve the agent's ttrpc on ``listener`` (vsock, or unix in tests); a task a connection."""

    async def serve(conn: socket.socket) -> None:
        await server.serve_transport(SocketTransport(conn))

    await serve_host_connections(listener, serve, "agent channel", task_status=task_status)


async def serve_host_connections(
    listener: socket.socket,
    handle: Callable[[socket.socket], Coroutine[Any, Any, None]],
    what: str,
    *,
    task_status: TaskStatus = TASK_STATUS_IGNORED,
) -> None:
    """Accept the host's connections on ``listener``; ``handle`` each on a task of its own."""
    listener.setblocking(False)
    # The number, not the socket: once the socket is closed its fileno() is -1, and the
    # reader could no longer be removed by it.
    fd = listener.fileno()
    async with asyncio.TaskGroup() as group:
        task_status.started()
        while True:
            try:
                conn, peer = listener.accept()
            except BlockingIOError:
                await wait_readable(fd)
                continue
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.EINVAL):
                    return  # closed under us
                log.warning("%s: accept failed: %s", what, exc)
                await asyncio.sleep(0.1)
                continue
            if not host_peer(listener.family, peer):
                # vsock loopback lets processes in this VM (a container) dial
                # us too: only the host may drive the agent.
                log.warning("%s: refused a connection from %s", what, peer)
                conn.close()
                continue
            group.create_task(handle(conn))


def host_peer(family: int, peer: object) -> bool:
    """A vsock peer must be the host (CID 2); other families are the tests' unix sockets."""
    if family != getattr(socket, "AF_VSOCK", -1):
        return True
    return isinstance(peer, tuple) and len(peer) == 2 and peer[0] == socket.VMADDR_CID_HOST


async def wait_for_serial_port(
    timeout: float,
    name: str = AGENT_PORT_NAME,
    dev: Path = Path("/dev"),
    sys_ports: Path = Path("/sys/class/virtio-ports"),
) -> Path | None:
    """Wait up to ``timeout`` seconds for the port's device node to appear."""
    async with move_on_after(timeout):
        while True:
            path = find_serial_port(name, dev, sys_ports)
            if path is not None:
                return path
            await asyncio.sleep(0.05)
    return None
