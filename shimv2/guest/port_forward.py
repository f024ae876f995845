"""Port-forward's guest end: a vsock listener that dials the pod's own loopback.

The host's relay (``shimv2.vc.port_forward``) connects to FORWARD_VSOCK_PORT
and names a port (``shimv2.guest_protocol``); this dials 127.0.0.1 (then ::1)
at that port, inside the VM, where the containers' loopback is, and copies
bytes both ways until both sides are done. Only the host may connect (CID 2),
as on the agent's own port. A bad request or a refused dial is answered with
``ERR`` and the connection closed; nothing here can fail the agent.

The copy is ``shimv2.relay``'s (the host's, on trio) on asyncio sockets: the
same half-close rules and the same linger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable

from shimv2.aio import TASK_STATUS_IGNORED, TaskStatus, move_on_after
from shimv2.guest.channel import serve_host_connections
from shimv2.guest_protocol import (
    FORWARD_OK,
    FORWARD_REQUEST_MAX,
    parse_forward_port,
)

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
CHUNK = 65536  # as shimv2.relay's
LINGER = 1.0  # as shimv2.relay's


async def read_line(sock: socket.socket, limit: int) -> bytes:
    """Up to and with the first newline, at most ``limit`` bytes, or what came before EOF.

    A byte at a time, so that nothing past the line is consumed: the bytes after it
    belong to the stream the line opens.
    """
    loop = asyncio.get_running_loop()
    line = b""
    while not line.endswith(b"\n") and len(line) < limit:
        byte = await loop.sock_recv(sock, 1)
        if not byte:
            break
        line += byte
    return line


async def read_request(host: socket.socket) -> bytes | None:
    """The request line without its newline; None if the host sent more or stopped short."""
    async with move_on_after(REQUEST_TIMEOUT):
        try:
            line = await read_line(host, FORWARD_REQUEST_MAX)
        except OSError:
            return None  # reset: a host that went away sent no request
        return line[:-1] if line.endswith(b"\n") else None
    return None


def _stream_options(sock: socket.socket) -> None:
    """What trio's SocketStream set on a TCP stream: small writes go out at once."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 2**14)


async def dial_loopback(port: int) -> socket.socket:
    """127.0.0.1, then ::1; the IPv4 error if both fail (what a user would look at)."""
    loop = asyncio.get_running_loop()
    errors: list[OSError] = []
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, (address, port))
        except BaseException as exc:
            sock.close()
            if not isinstance(exc, OSError):
                raise
            errors.append(exc)
            continue
        _stream_options(sock)
        return sock
    raise errors[0]


def _reason(exc: OSError) -> str:
    # By errno: asyncio's error for a connect that failed later says only "Connect call
    # failed", without why.
    return os.strerror(exc.errno) if exc.errno else str(exc)


async def handle(host: socket.socket) -> None:
    """One forward: the request, the dial in the VM, the answer, then the bytes."""
    host.setblocking(False)
    with host:
        line = await read_request(host)
        port = parse_forward_port(line) if line is not None else None
        if port is None:
            await _refuse(host, f"bad request {line!r}")
            return
        try:
            target = await dial_loopback(port)
        except OSError as exc:
            await _refuse(host, f"port {port}: {_reason(exc)}")
            return
        try:
            await asyncio.get_running_loop().sock_sendall(host, FORWARD_OK)
        except OSError:
            target.close()
            return
        await splice(host, target, eof_to_a=False, eof_to_b=True)  # a is vsock


async def _refuse(host: socket.socket, reason: str) -> None:
    log.info("port-forward: %s", reason)
    reply = f"ERR {reason}"[:100].encode(errors="replace").replace(b"\n", b" ") + b"\n"
    with contextlib.suppress(OSError):
        await asyncio.get_running_loop().sock_sendall(host, reply)


async def copy(
    source: socket.socket, sink: socket.socket, *, eof: bool, moved: Callable[[], None]
) -> None:
    """Bytes from ``source`` to ``sink`` until ``source`` ends; then, with ``eof``, half-close."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):  # reset, or gone
        while data := await loop.sock_recv(source, CHUNK):
            await loop.sock_sendall(sink, data)
            moved()
    if eof:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


async def splice(
    a: socket.socket,
    b: socket.socket,
    *,
    eof_to_a: bool,
    eof_to_b: bool,
    linger: float = LINGER,
) -> None:
    """Both directions until both ended, or one ended and the other idled ``linger`` s;
    then both sockets are closed. Half-closes as in ``shimv2.relay``: only where asked."""
    loop = asyncio.get_running_loop()
    last = loop.time()
    left = 2
    one_ended, both_ended = asyncio.Event(), asyncio.Event()

    def moved() -> None:
        nonlocal last
        last = loop.time()

    async def direction(source: socket.socket, sink: socket.socket, eof: bool) -> None:
        nonlocal left
        await copy(source, sink, eof=eof, moved=moved)
        left -= 1
        one_ended.set()
        if not left:
            both_ended.set()

    # Sockets closed only once both directions are done: closing one under a pending
    # sock_recv would leave its reader on a stale fd.
    with a, b:
        async with asyncio.TaskGroup() as group:
            directions = (
                group.create_task(direction(a, b, eof_to_b)),
                group.create_task(direction(b, a, eof_to_a)),
            )
            await one_ended.wait()
            while not both_ended.is_set() and loop.time() < last + linger:
                with contextlib.suppress(TimeoutError):  # idle until then: look again
                    async with asyncio.timeout_at(last + linger):
                        await both_ended.wait()
            for task in directions:
                task.cancel()


async def serve_port_forward(
    listener: socket.socket,
    *,
    task_status: TaskStatus = TASK_STATUS_IGNORED,
) -> None:
    """Accept the host's forwards on ``listener`` (vsock; unix in tests), a few at once."""
    limit = asyncio.Semaphore(MAX_CONNECTIONS)

    async def one(conn: socket.socket) -> None:
        if limit.locked():  # no waiter ever: locked() means all taken
            log.warning("port-forward: more than %d at once, refused one", MAX_CONNECTIONS)
            conn.close()
            return
        async with limit:
            await handle(conn)

    await serve_host_connections(listener, one, "port-forward", task_status=task_status)
