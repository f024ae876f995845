"""Copying bytes both ways between two trio streams, for port-forward's host and guest ends."""

from __future__ import annotations

import contextlib

import trio

CHUNK = 65536
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


async def copy(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
    """Bytes from ``source`` to ``sink``; then pass the end on (half-close where possible)."""
    with contextlib.suppress(*_GONE):
        while data := await source.receive_some(CHUNK):
            await sink.send_all(data)
    if isinstance(sink, trio.abc.HalfCloseableStream):
        with contextlib.suppress(*_GONE):
            await sink.send_eof()


async def splice(a: trio.abc.Stream, b: trio.abc.Stream) -> None:
    """Both directions until both ended; then both streams are closed."""
    async with a, b, trio.open_nursery() as nursery:
        nursery.start_soon(copy, a, b)
        nursery.start_soon(copy, b, a)
