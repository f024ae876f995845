"""Bounded stdio buffers between a container process and the host's Read/Write rpcs.

``OutputBuffer`` pumps one nonblocking fd (a pipe's read end, or a pty master)
into at most ``limit`` bytes; when full it stops reading, so the process blocks
on its own write (back-pressure) until the host reads. ``read`` blocks until
there is data or EOF. ``StdinWriter`` writes whole requests in order and
closes only after every queued write went out.

Error handling: a read error other than EAGAIN ends the stream (EIO is how a
pty master reports that the last slave closed); ``StdinWriter.write`` raises
``FailedPrecondition`` once stdin is closed or the reader went away (EPIPE), and
``ClosedResourceError`` when ``close_now`` drops stdin under a blocked write.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Awaitable, Callable

from shimv2.aio import (
    Broadcast,
    ClosedResourceError,
    FdWait,
    move_on_after,
    wait_readable,
    wait_writable,
)
from shimv2.errdefs import DeadlineExceeded, FailedPrecondition

BUFFER_LIMIT = 1 << 20
READ_CHUNK = 64 * 1024


class OutputBuffer:
    def __init__(self, limit: int = BUFFER_LIMIT) -> None:
        self._limit = limit
        self._data = bytearray()
        self._eof = False
        self._changed = Broadcast()
        self._pump_wait = FdWait()  # ``close`` ends the pump's wait for its fd
        # Set once the fd reached EOF (or the buffer was closed): all output is buffered.
        self.eof_seen = asyncio.Event()

    @classmethod
    def closed(cls) -> OutputBuffer:
        """A stream with nothing in it (stderr of a terminal process)."""
        buf = cls(0)
        buf.close()
        return buf

    def __len__(self) -> int:
        return len(self._data)

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._data

    def close(self) -> None:
        """End the stream now (removal): pending and later reads see EOF.

        The pump, wherever it waits, wakes and ends, closing its fd: it never
        depends on the pump's task being cancelled (an asyncio task cancelled
        before it first ran would not run its ``finally``).
        """
        self._eof = True
        self._data.clear()
        self.eof_seen.set()
        self._changed.notify_all()
        self._pump_wait.closing()

    async def pump(self, fd: int) -> None:
        """Read ``fd`` (owned: closed at the end) until EOF or ``close``, respecting the limit."""
        try:
            os.set_blocking(fd, False)
            while not self._eof:
                room = self._limit - len(self._data)
                if room <= 0:
                    await self._changed.wait()
                    continue
                try:
                    chunk = os.read(fd, min(room, READ_CHUNK))
                except BlockingIOError:
                    with contextlib.suppress(ClosedResourceError):  # close(): _eof is set
                        await self._pump_wait.readable(fd)
                    continue
                except OSError:  # EIO: pty slave closed; anything else ends it too
                    chunk = b""
                if not chunk:
                    break
                self._data += chunk
                self._changed.notify_all()
        finally:
            self._eof = True
            self.eof_seen.set()
            self._changed.notify_all()
            os.close(fd)  # no wait on it is left: ours ended in its own ``finally``

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; blocks until some are there. b"" means EOF."""
        while not self._data and not self._eof:
            await self._changed.wait()
        out = bytes(self._data[:n])
        del self._data[:n]
        self._changed.notify_all()  # room for the pump
        return out


async def write_all(
    fd: int, data: bytes, *, writable: Callable[[int], Awaitable[None]] = wait_writable
) -> None:
    """All of ``data`` to the nonblocking ``fd``, waiting while it is full (with ``writable``)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await writable(fd)


class StdinWriter:
    def __init__(self, fd: int, *, eof_on_close: bytes = b"") -> None:
        """Own ``fd``; ``eof_on_close`` is sent before closing (^D for a terminal)."""
        os.set_blocking(fd, False)
        self._fd: int | None = fd
        self._eof_on_close = eof_on_close
        self._lock = asyncio.Lock()  # fair: writes go out in arrival order
        self._wait = FdWait()  # ``close_now`` ends a blocked write's wait

    @property
    def closed(self) -> bool:
        return self._fd is None

    async def write(self, data: bytes) -> int:
        async with self._lock:
            if self._fd is None:
                raise FailedPrecondition("stdin is closed")
            await self._write_all(self._fd, data)
        return len(data)

    async def _write_all(self, fd: int, data: bytes) -> None:
        try:
            await write_all(fd, data, writable=self._wait.writable)
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.EIO):
                raise FailedPrecondition("the process closed its stdin") from exc
            raise

    async def aclose(self) -> None:
        """Close after the writes already queued; idempotent."""
        async with self._lock:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            try:
                if self._eof_on_close:
                    with contextlib.suppress(FailedPrecondition):
                        await self._write_all(fd, self._eof_on_close)
            finally:
                # Ours alone (a terminal's is a dup of the master, which stdout reads).
                os.close(fd)

    def close_now(self) -> None:
        """Drop stdin without waiting for queued writes (removal).

        A write blocked on the fd wakes with ``ClosedResourceError``.
        """
        fd, self._fd = self._fd, None
        if fd is not None:
            self._wait.closing()
            os.close(fd)


async def receive_fd(listener: socket.socket, timeout: float = 10.0) -> int:
    """The one fd the runtime sends over its console socket (SCM_RIGHTS).

    ``listener`` is a listening, nonblocking unix socket.
    """
    async with move_on_after(timeout):
        conn, _ = await asyncio.get_running_loop().sock_accept(listener)  # conn: nonblocking
        with conn:
            while True:
                try:
                    _, ancdata, _, _ = conn.recvmsg(
                        4096,
                        socket.CMSG_SPACE(4 * array.array("i").itemsize),
                        socket.MSG_CMSG_CLOEXEC,
                    )
                    break
                except BlockingIOError:
                    await wait_readable(conn)
        return _first_fd(ancdata)
    raise DeadlineExceeded(f"no terminal fd from the runtime within {timeout}s")


def _first_fd(ancdata: list[tuple[int, int, bytes]]) -> int:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds_arr = array.array("i")
            fds_arr.frombytes(data[: len(data) - len(data) % fds_arr.itemsize])
            fds.extend(fds_arr)
    if not fds:
        raise FailedPrecondition("the runtime sent no terminal fd")
    for extra in fds[1:]:
        os.close(extra)
    return fds[0]
