"""Copying bytes both ways between two trio streams, for port-forward's host end (the
guest's, on asyncio, is ``shimv2.guest.port_forward``), and the bounded line reads that
open such streams.

Half-closes are passed on only to a sink that keeps them (``eof_to_*``: TCP), never over
the vsock leg: vhost-device-vsock turns a host-side ``SHUT_WR`` into the end of the whole
connection, and passes no guest ``SHUT_WR`` on at all. So once one direction has ended,
the other goes on while bytes move and ends after ``linger`` seconds without any, as
containerd's own port-forward copy and socat do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import trio

CHUNK = 65536
LINGER = 1.0
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


async def read_line(stream: trio.abc.Stream, limit: int) -> bytes:
    """Up to and with the first newline, at most ``limit`` bytes, or what came before EOF.

    A byte at a time, so that nothing past the line is consumed: the bytes after it
    belong to whatever the line opens.
    """
    line = b""
    while not line.endswith(b"\n") and len(line) < limit:
        byte = await stream.receive_some(1)
        if not byte:
            break
        line += byte
    return line


Gate = Callable[[], Awaitable[object]]


async def copy(
    source: trio.abc.Stream,
    sink: trio.abc.Stream,
    *,
    eof: bool,
    moved: Callable[[], None],
    wait: Gate | None = None,
) -> None:
    """Bytes from ``source`` to ``sink`` until ``source`` ends; then, with ``eof``, half-close.

    ``wait``, if given, is awaited before each write to ``sink``.
    """
    with contextlib.suppress(*_GONE):
        while data := await source.receive_some(CHUNK):
            if wait is not None:
                await wait()
            await sink.send_all(data)
            moved()
    if eof and isinstance(sink, trio.abc.HalfCloseableStream):
        with contextlib.suppress(*_GONE):
            await sink.send_eof()


async def splice(
    a: trio.abc.Stream,
    b: trio.abc.Stream,
    *,
    eof_to_a: bool,
    eof_to_b: bool,
    linger: float = LINGER,
    wait_b: Gate | None = None,
) -> None:
    """Both directions until both ended, or one ended and the other idled ``linger`` s;
    then both streams are closed. ``wait_b`` is awaited before each write to ``b`` (a
    paused VM's vsock must get no byte)."""
    last = trio.current_time()
    left = 2
    one_ended, both_ended = trio.Event(), trio.Event()

    def moved() -> None:
        nonlocal last
        last = trio.current_time()

    async def direction(
        source: trio.abc.Stream, sink: trio.abc.Stream, eof: bool, wait: Gate | None
    ) -> None:
        nonlocal left
        await copy(source, sink, eof=eof, moved=moved, wait=wait)
        left -= 1
        one_ended.set()
        if not left:
            both_ended.set()

    async with a, b, trio.open_nursery() as nursery:
        nursery.start_soon(direction, a, b, eof_to_b, wait_b)
        nursery.start_soon(direction, b, a, eof_to_a, None)
        await one_ended.wait()
        while not both_ended.is_set() and trio.current_time() < last + linger:
            with trio.move_on_at(last + linger):
                await both_ended.wait()
        nursery.cancel_scope.cancel()
