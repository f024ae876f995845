"""Byte transports under the ttrpc shell.

``SocketTransport`` talks to a nonblocking socket directly: a send that the
kernel takes at once costs no trip through trio's scheduler, and a receive
waits only when nothing is there. Through ``trio.SocketStream`` the same round
trip cost twice as much (two scheduler passes per send and per receive).
``StreamTransport`` wraps any ``trio.abc.Stream`` (memory streams in tests).

Sends are synchronous and ordered: ``send_nowait`` queues a frame whole, so
frames of concurrent callers never interleave; ``drain`` waits for room.
"""

from __future__ import annotations

import os
import socket
from typing import Protocol

import trio

RECEIVE_CHUNK = 256 * 1024
# Yield to other tasks after this many receives that found data waiting.
_FAIRNESS = 16


class Transport(Protocol):
    async def receive_some(self) -> bytes:
        """The next bytes, or b"" at EOF. BrokenResourceError if the peer reset."""
        ...

    def send_nowait(self, data: bytes) -> None:
        """Queue ``data``; as much as the kernel takes goes out at once."""
        ...

    async def drain(self) -> None:
        """Wait until everything queued is written."""
        ...

    async def aclose(self) -> None: ...


class _NonblockingTransport:
    """What socket and fd transports share; subclasses say how to read and write."""

    def __init__(self, handle: int | socket.socket) -> None:
        self._handle = handle  # what trio waits on
        self._out = bytearray()
        self._drain_lock = trio.Lock()
        self._ready_streak = 0
        self._closed = False

    def _read(self, max_bytes: int) -> bytes:
        raise NotImplementedError

    def _write(self, data: bytes | bytearray) -> int:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    async def receive_some(self) -> bytes:
        while True:
            if self._closed:
                raise trio.ClosedResourceError("transport closed")
            try:
                data = self._read(RECEIVE_CHUNK)
            except BlockingIOError:
                self._ready_streak = 0
                await trio.lowlevel.wait_readable(self._handle)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            self._ready_streak += 1
            if self._ready_streak >= _FAIRNESS:
                self._ready_streak = 0
                await trio.lowlevel.checkpoint()
            return data

    def send_nowait(self, data: bytes) -> None:
        if self._closed:
            raise trio.ClosedResourceError("transport closed")
        if not self._out:
            sent = self._try_write(data)
            if sent == len(data):
                return
            data = data[sent:]
        self._out += data

    def _try_write(self, data: bytes | bytearray) -> int:
        try:
            return self._write(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def drain(self) -> None:
        if not self._out:
            return
        async with self._drain_lock:
            while self._out:
                await trio.lowlevel.wait_writable(self._handle)
                del self._out[: self._try_write(self._out)]

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._handle)
            self._close()
        await trio.lowlevel.checkpoint()


class SocketTransport(_NonblockingTransport):
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        super().__init__(sock)
        self._sock = sock

    @classmethod
    def from_stream(cls, stream: trio.SocketStream) -> SocketTransport:
        sock = stream.socket
        return cls(socket.socket(sock.family, sock.type, fileno=sock.detach()))

    @property
    def socket(self) -> socket.socket:
        return self._sock

    def _read(self, max_bytes: int) -> bytes:
        return self._sock.recv(max_bytes)

    def _write(self, data: bytes | bytearray) -> int:
        return self._sock.send(data)

    def _close(self) -> None:
        self._sock.close()


class FdTransport(_NonblockingTransport):
    """A character device such as a virtio-serial port (``/dev/vport0p1``).

    The fd is set nonblocking and owned: ``aclose`` closes it. A read of 0
    bytes is EOF (virtio-serial: the host side closed its socket).
    """

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        super().__init__(fd)
        self._fd = fd

    def _read(self, max_bytes: int) -> bytes:
        return os.read(self._fd, max_bytes)

    def _write(self, data: bytes | bytearray) -> int:
        return os.write(self._fd, data)

    def _close(self) -> None:
        os.close(self._fd)


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
