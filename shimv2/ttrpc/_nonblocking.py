"""Byte transports on a nonblocking socket or fd, for either event loop.

The host's shell runs on trio, the guest agent's on asyncio; both move bytes
the same way and differ only in how they wait. ``Waits`` is that difference:
each shell passes its own (``_transport.TrioWaits``, ``aio.AsyncioWaits``).

A send that the kernel takes at once costs no trip through the scheduler, and a
receive waits only when nothing is there. Sends are synchronous and ordered:
``send_nowait`` queues a frame whole, so frames of concurrent callers never
interleave; ``drain`` waits for room.
"""

from __future__ import annotations

import os
import socket
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

RECEIVE_CHUNK = 256 * 1024
# Yield to other tasks after this many receives that found data waiting.
_FAIRNESS = 16

Handle = int | socket.socket


class Transport(Protocol):
    async def receive_some(self) -> bytes:
        """The next bytes, or b"" at EOF. The loop's "broken" error if the peer reset."""
        ...

    def send_nowait(self, data: bytes) -> None:
        """Queue ``data``; as much as the kernel takes goes out at once."""
        ...

    async def drain(self) -> None:
        """Wait until everything queued is written."""
        ...

    async def aclose(self) -> None: ...


class Waits(Protocol):
    """One event loop's way to wait on a handle, and its errors."""

    @property
    def broken(self) -> type[Exception]: ...

    @property
    def closed(self) -> type[Exception]: ...

    async def readable(self, handle: Handle) -> None: ...

    async def writable(self, handle: Handle) -> None: ...

    async def checkpoint(self) -> None: ...

    def closing(self, handle: Handle) -> None:
        """Wake whoever waits on ``handle``: it is about to be closed."""
        ...

    def lock(self) -> AbstractAsyncContextManager[Any]: ...


class NonblockingTransport:
    """What socket and fd transports share; subclasses say how to read and write."""

    def __init__(self, handle: Handle, waits: Waits) -> None:
        self._handle = handle  # what the loop waits on
        self._waits = waits
        self._out = bytearray()
        self._drain_lock = waits.lock()
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
                raise self._waits.closed("transport closed")
            try:
                data = self._read(RECEIVE_CHUNK)
            except BlockingIOError:
                self._ready_streak = 0
                await self._waits.readable(self._handle)
                continue
            except OSError as exc:
                raise self._waits.broken(str(exc)) from exc
            self._ready_streak += 1
            if self._ready_streak >= _FAIRNESS:
                self._ready_streak = 0
                await self._waits.checkpoint()
            return data

    def send_nowait(self, data: bytes) -> None:
        if self._closed:
            raise self._waits.closed("transport closed")
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
            raise self._waits.broken(str(exc)) from exc

    async def drain(self) -> None:
        if not self._out:
            return
        async with self._drain_lock:
            while self._out:
                await self._waits.writable(self._handle)
                del self._out[: self._try_write(self._out)]

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._waits.closing(self._handle)
            self._close()
        await self._waits.checkpoint()


class SocketTransport(NonblockingTransport):
    def __init__(self, sock: socket.socket, waits: Waits) -> None:
        sock.setblocking(False)
        super().__init__(sock, waits)
        self._sock = sock

    @property
    def socket(self) -> socket.socket:
        return self._sock

    def _read(self, max_bytes: int) -> bytes:
        return self._sock.recv(max_bytes)

    def _write(self, data: bytes | bytearray) -> int:
        return self._sock.send(data)

    def _close(self) -> None:
        self._sock.close()


class FdTransport(NonblockingTransport):
    """A character device such as a virtio-serial port (``/dev/vport0p1``).

    The fd is set nonblocking and owned: ``aclose`` closes it. A read of 0
    bytes is EOF (virtio-serial: the host side closed its socket).
    """

    def __init__(self, fd: int, waits: Waits) -> None:
        os.set_blocking(fd, False)
        super().__init__(fd, waits)
        self._fd = fd

    def _read(self, max_bytes: int) -> bytes:
        return os.read(self._fd, max_bytes)

    def _write(self, data: bytes | bytearray) -> int:
        return os.write(self._fd, data)

    def _close(self) -> None:
        os.close(self._fd)
