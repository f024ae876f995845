"""The debug console: a root shell in the guest, on its own virtio-serial port.

Only when the host asks for it (``[agent.kata] debug_console_enabled``, which
puts ``kata_py.debug_console=1`` on the kernel command line and the
``debug.console.0`` port on the VM). ``kata-py exec <pod>`` connects to the
port's socket on the host, like ``kata-runtime exec``.

A session starts when the host first sends something: the agent then starts
``sh -i`` on a new pty (its controlling terminal, so ^C and job control work)
and copies bytes both ways. virtio-serial cannot close the host's end, so when
the shell exits the agent writes ``SHELL_EXITED`` (an OSC sequence a terminal
ignores) with the status, for ``kata-py exec`` to end on. A host that leaves
(EOF on the port) ends the session: the shell's session gets SIGHUP, then
SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
from collections.abc import Coroutine, Sequence
from typing import Any

from shimv2.aio import TASK_STATUS_IGNORED, TaskStatus, move_on_after, wait_readable
from shimv2.guest import channel as ch
from shimv2.guest.stdio import write_all
from shimv2.guest_protocol import shell_exited

log = logging.getLogger(__name__)

SHELL = ("/bin/busybox", "setsid", "-c", "/bin/sh", "-i")
HANGUP_GRACE = 1.0
CHUNK = 64 * 1024


async def _copy(src: int, dst: int) -> None:
    """Until ``src`` ends: EOF, or EIO (a pty master whose shell has gone; a port with no host)."""
    while True:
        try:
            data = os.read(src, CHUNK)
        except BlockingIOError:
            await wait_readable(src)
            continue
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.ENXIO, errno.EPIPE):
                return
            raise
        if not data:
            return
        await write_all(dst, data)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # the shell leads its own session (setsid), so its group too


async def run_session(reaper: Any, port: int, first: bytes, argv: Sequence[str] = SHELL) -> None:
    """One shell for the host that sent ``first``; returns when the shell or the host ends."""
    master, slave = os.openpty()
    try:
        os.set_blocking(master, False)
        exit_ = reaper.spawn(list(argv), slave, slave, slave)
    finally:
        os.close(slave)
    pid = exit_.pid
    log.info("debug console: shell %d started", pid)
    host_left = False
    try:
        await write_all(master, first)

        async def from_host() -> None:
            nonlocal host_left
            await _copy(port, master)
            host_left = True

        # Until the host leaves, or the shell and everything on its pty are gone.
        await _first_to_end(from_host(), _copy(master, port))
        if host_left:
            _signal_group(pid, signal.SIGHUP)
            async with move_on_after(HANGUP_GRACE):
                await exit_.wait()
            _signal_group(pid, signal.SIGKILL)
        status = await exit_.wait()
    finally:
        os.close(master)
    log.info("debug console: shell %d exited with %d (host left: %s)", pid, status, host_left)
    if not host_left:
        with contextlib.suppress(OSError):
            await write_all(port, shell_exited(status))


async def _first_to_end(*coros: Coroutine[Any, Any, None]) -> None:
    """Run ``coros`` until one ends, then cancel the others. An error is raised as is, not
    in a group: ``serve_debug_console`` tells a failed session by its OSError."""
    tasks = [asyncio.create_task(coro) for coro in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled():
            task.result()  # its error, if it failed


async def serve_debug_console(
    reaper: Any,
    port_path: str,
    *,
    argv: Sequence[str] = SHELL,
    task_status: TaskStatus = TASK_STATUS_IGNORED,
) -> None:
    """Give each host that connects to the port a shell, one at a time, forever."""
    port = ch.open_port(port_path)
    try:
        task_status.started()
        while True:
            first = await ch.wait_for_host(port)
            try:
                await run_session(reaper, port, first, argv)
            except OSError as exc:
                log.warning("debug console: session failed: %s", exc)
                await asyncio.sleep(1)
    finally:
        os.close(port)
