"""Port-forward's guest end: a vsock listener that dials the pod's own loopback.

The host's relay (``shimv2.vc.port_forward``) connects to FORWARD_VSOCK_PORT
and names a port (``shimv2.guest_protocol``); this dials 127.0.0.1 (then ::1)
at that port, inside the VM, where the containers' loopback is, and copies
bytes both ways until both sides are done. Only the host may connect (CID 2),
as on the agent's own port. A bad request or a refused dial is answered with
``ERR`` and the connection closed; nothing here can fail the agent.
"""

from __future__ import annotations

import contextlib
import logging
import socket

import trio

from shimv2.guest.channel import serve_host_connections
from shimv2.guest_protocol import (
    FORWARD_OK,
    FORWARD_REQUEST_MAX,
    parse_forward_port,
)
from shimv2.relay import read_line, splice

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 64


async def read_request(stream: trio.abc.Stream) -> bytes | None:
    """The request line without its newline; None if the host sent more or stopped short."""
    with trio.move_on_after(REQUEST_TIMEOUT):
        line = await read_line(stream, FORWARD_REQUEST_MAX)
        return line[:-1] if line.endswith(b"\n") else None
    return None


async def dial_loopback(port: int) -> trio.SocketStream:
    """127.0.0.1, then ::1; the IPv4 error if both fail (what a user would look at)."""
    errors: list[OSError] = []
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            await sock.connect((address, port))
        except OSError as exc:
            sock.close()
            errors.append(exc)
            continue
        return trio.SocketStream(sock)
    raise errors[0]


async def handle(host: trio.abc.Stream) -> None:
    """One forward: the request, the dial in the VM, the answer, then the bytes."""
    async with host:
        line = await read_request(host)
        port = parse_forward_port(line) if line is not None else None
        if port is None:
            await _refuse(host, f"bad request {line!r}")
            return
        try:
            target = await dial_loopback(port)
        except OSError as exc:
            await _refuse(host, f"port {port}: {exc.strerror or exc}")
            return
        try:
            await host.send_all(FORWARD_OK)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await target.aclose()
            return
        await splice(host, target, eof_to_a=False, eof_to_b=True)  # a is vsock


async def _refuse(host: trio.abc.Stream, reason: str) -> None:
    log.info("port-forward: %s", reason)
    reply = f"ERR {reason}"[:100].encode(errors="replace").replace(b"\n", b" ") + b"\n"
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await host.send_all(reply)


async def serve_port_forward(
    listener: socket.socket,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept the host's forwards on ``listener`` (vsock; unix in tests), a few at once."""
    limit = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def one(conn: socket.socket) -> None:
        if limit.available_tokens == 0:
            log.warning("port-forward: more than %d at once, refused one", MAX_CONNECTIONS)
            conn.close()
            return
        async with limit:
            await handle(trio.SocketStream(trio.socket.from_stdlib_socket(conn)))

    await serve_host_connections(listener, one, "port-forward", task_status=task_status)
