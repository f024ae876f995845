"""The trio side of the byte transports (``_nonblocking`` holds what both loops share).

Through ``trio.SocketStream`` a round trip cost twice as much as on the socket
itself (two scheduler passes per send and per receive), so sockets go through
``SocketTransport``. ``StreamTransport`` wraps any ``trio.abc.Stream`` (memory
streams in tests).
"""

from __future__ import annotations

import socket
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio

from shimv2.ttrpc import _nonblocking
from shimv2.ttrpc._nonblocking import RECEIVE_CHUNK, Handle
from shimv2.ttrpc._nonblocking import Transport as Transport


class TrioWaits:
    broken = trio.BrokenResourceError
    closed = trio.ClosedResourceError

    async def readable(self, handle: Handle) -> None:
        await trio.lowlevel.wait_readable(handle)

    async def writable(self, handle: Handle) -> None:
        await trio.lowlevel.wait_writable(handle)

    async def checkpoint(self) -> None:
        await trio.lowlevel.checkpoint()

    def closing(self, handle: Handle) -> None:
        trio.lowlevel.notify_closing(handle)

    def lock(self) -> AbstractAsyncContextManager[Any]:
        return trio.Lock()


class SocketTransport(_nonblocking.SocketTransport):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, TrioWaits())

    @classmethod
    def from_stream(cls, stream: trio.SocketStream) -> SocketTransport:
        sock = stream.socket
        return cls(socket.socket(sock.family, sock.type, fileno=sock.detach()))


class FdTransport(_nonblocking.FdTransport):
    def __init__(self, fd: int) -> None:
        super().__init__(fd, TrioWaits())


class StreamTransport:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._out: list[bytes] = []
        self._drain_lock = trio.Lock()

    async def receive_some(self) -> bytes:
        return bytes(await self._stream.receive_some(RECEIVE_CHUNK))

    def send_nowait(self, data: bytes) -> None:
        self._out.append(data)

    async def drain(self) -> None:
        async with self._drain_lock:
            while self._out:
                await self._stream.send_all(self._out.pop(0))

    async def aclose(self) -> None:
        await self._stream.aclose()


def transport_for(stream: trio.abc.Stream) -> Transport:
    if isinstance(stream, trio.SocketStream):
        return SocketTransport.from_stream(stream)
    return StreamTransport(stream)
