"""The guest's serial console, kept on the host within a fixed size.

QEMU serves the serial port on a unix socket (``server=on,wait=off``: with no
reader it drops the output, and a slow reader only slows the guest's UART, never
QEMU's main loop). The shim reads it and writes ``console.log``; a write that
would take it past ``limit`` bytes first renames it to ``console.log.1``
(replacing the previous one), so the host keeps at most ``2 * limit`` bytes
however much the guest writes. Output nobody reads (the moments before the shim
connects, or between a shim's death and the next shim's adopt) is lost.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import trio

from shimv2.errdefs import InvalidArgument

log = logging.getLogger(__name__)

CONSOLE_LIMIT = 1 << 20  # bytes per file; console.log and console.log.1
CHUNK = 64 * 1024
CONNECT_TIMEOUT = 10.0


class RotatingLog:
    """An append-only file capped at ``limit`` bytes, rotated once to ``<name>.1``.

    Not thread-safe; one writer at a time. Each write re-reads the file's real
    size, so the cap holds even if another process appended to the same file.
    """

    def __init__(self, path: Path, limit: int = CONSOLE_LIMIT) -> None:
        if limit <= 0:
            raise InvalidArgument(f"console limit must be positive, not {limit}")
        self.path = path
        self.rotated = path.with_name(path.name + ".1")
        self.limit = limit
        self._fd = -1

    def open(self) -> None:
        # O_NOFOLLOW: whatever is at the path, never write through a symlink.
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, 0o600)

    def write(self, data: bytes) -> None:
        """Append ``data``, rotating as often as needed; raises OSError (e.g. ENOSPC)."""
        if self._fd < 0:
            self.open()
        view = memoryview(data)
        while view:
            room = self.limit - os.fstat(self._fd).st_size
            if room <= 0:
                self._rotate()
                continue
            view = view[os.write(self._fd, view[:room]) :]

    def _rotate(self) -> None:
        self.close()
        os.replace(self.path, self.rotated)
        self.open()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


async def connect_console(path: Path, *, exited: trio.Event) -> trio.SocketStream | None:
    """Connect to QEMU's console socket, waiting (bounded) for it to listen.

    None when it never did, or QEMU ``exited`` first.
    """
    with trio.move_on_after(CONNECT_TIMEOUT):
        while not exited.is_set():
            try:
                return await trio.open_unix_socket(str(path))
            except OSError as exc:
                # Not there yet, or bound but not yet listening.
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                    raise
            await trio.sleep(0.005)
    return None


class ReadyMarker:
    """Sets ``seen`` once ``text`` went by in the bytes fed to it, even split across chunks."""

    def __init__(self, text: bytes) -> None:
        self.text = text
        self.seen = trio.Event()
        self._tail = b""

    def feed(self, data: bytes) -> None:
        if self.seen.is_set():
            return
        window = self._tail + data
        if self.text in window:
            self.seen.set()
            self._tail = b""
        else:
            self._tail = window[max(0, len(window) - len(self.text) + 1) :]


async def relay_console(
    stream: trio.SocketStream, out: RotatingLog, marker: ReadyMarker | None = None
) -> None:
    """Copy the console into ``out`` until QEMU closes it (or we are cancelled), showing
    it to ``marker`` on the way.

    Reading never stops on a host-side write error (e.g. a full /run): the
    output is dropped instead, so the guest never stalls on our account and
    the error never reaches the shim's nursery.
    """
    failing = False
    try:
        async with stream:
            while data := await stream.receive_some(CHUNK):
                if marker is not None:
                    marker.feed(data)
                try:
                    out.write(data)
                    failing = False
                except OSError as exc:
                    if not failing:
                        log.warning("console %s: dropping output: %s", out.path, exc)
                    failing = True
                    out.close()  # reopened on the next write
    except trio.BrokenResourceError as exc:
        log.debug("console %s: %s", out.path, exc)
    finally:
        out.close()
