"""Processes of the guest: the child reaper, command spawning, and container processes.

The agent is a child subreaper (``set_child_subreaper``), so a container's
process is reparented to it once the OCI runtime exits, and one ``Reaper``
collects every child with ``waitpid(-1)``. Because that also collects the
children the agent spawns itself, every subprocess of the agent must be
started through ``Reaper.spawn``/``Reaper.run_command`` (never
``asyncio.create_subprocess_*`` or ``subprocess``, whose wait would find the
child already reaped).

Exit statuses are kept by pid until claimed: a pid registered with ``watch``
gets its status when reaped; an unclaimed status (a container process that
exited before its pid file was read) is kept, boundedly, for a later ``watch``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import struct
import termios
from collections import OrderedDict
from collections.abc import Sequence

from shimv2.aio import TASK_STATUS_IGNORED, TaskStatus, move_on_after, wait_readable
from shimv2.errdefs import DeadlineExceeded, FailedPrecondition, Unavailable
from shimv2.guest.stdio import OutputBuffer, StdinWriter

PR_SET_CHILD_SUBREAPER = 36
UNCLAIMED_LIMIT = 4096
COMMAND_OUTPUT_LIMIT = 16 << 20


def set_child_subreaper() -> None:
    """Make orphaned descendants our children (``prctl(PR_SET_CHILD_SUBREAPER, 1)``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def exit_code(wait_status: int) -> int:
    """A shell-style exit code: the code, or 128 + the signal that killed it."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


class Exit:
    """The exit of one pid: ``status`` is set, then ``event``."""

    __slots__ = ("event", "pid", "status")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.status: int | None = None
        self.event = asyncio.Event()

    def set(self, status: int) -> None:
        self.status = status
        self.event.set()

    async def wait(self) -> int:
        await self.event.wait()
        assert self.status is not None
        return self.status


class Reaper:
    def __init__(self, unclaimed_limit: int = UNCLAIMED_LIMIT) -> None:
        self._watched: dict[int, Exit] = {}
        self._unclaimed: OrderedDict[int, int] = OrderedDict()
        self._limit = unclaimed_limit
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    async def run(self, *, task_status: TaskStatus = TASK_STATUS_IGNORED) -> None:
        """Reap children on every SIGCHLD until cancelled. Must run in the main thread."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self._running = True
        try:
            self.reap()  # whatever exited before the handler was there
            task_status.started()
            await loop.create_future()  # forever: the handler does the work
        finally:
            self._running = False
            loop.remove_signal_handler(signal.SIGCHLD)

    def reap(self) -> None:
        """Collect every exited child now."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = exit_code(status)
            watched = self._watched.pop(pid, None)
            if watched is not None:
                watched.set(code)
                continue
            self._unclaimed[pid] = code
            while len(self._unclaimed) > self._limit:
                self._unclaimed.popitem(last=False)

    def watch(self, pid: int) -> Exit:
        """The ``Exit`` of ``pid``, already set if it was reaped unclaimed."""
        existing = self._watched.get(pid)
        if existing is not None:
            return existing
        exit_ = Exit(pid)
        code = self._unclaimed.pop(pid, None)
        if code is not None:
            exit_.set(code)
        else:
            self._watched[pid] = exit_
        return exit_

    def spawn(self, argv: Sequence[str], stdin: int, stdout: int, stderr: int) -> Exit:
        """Start ``argv`` with these fds as 0, 1, 2 (others are close-on-exec)."""
        if not self._running:
            raise Unavailable("the child reaper is not running")
        actions = [
            (os.POSIX_SPAWN_DUP2, stdin, 0),
            (os.POSIX_SPAWN_DUP2, stdout, 1),
            (os.POSIX_SPAWN_DUP2, stderr, 2),
        ]
        pid = os.posix_spawnp(argv[0], list(argv), dict(os.environ), file_actions=actions)
        # No await since the spawn: the SIGCHLD handler (a loop callback) cannot have
        # reaped it yet.
        return self.watch(pid)

    async def run_command(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 60.0,
    ) -> tuple[int, bytes, bytes]:
        """Run ``argv`` to completion: (exit code, stdout, stderr), output bounded.

        Errors: ``DeadlineExceeded`` (after killing it) when it outlives ``timeout``.
        """
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            try:
                exit_ = self.spawn(argv, null, out_w, err_w)
            finally:
                for fd in (null, out_w, err_w):
                    os.close(fd)
            out = bytearray()
            err = bytearray()
            async with move_on_after(timeout) as scope, asyncio.TaskGroup() as group:
                group.create_task(_read_all(out_r, out))
                group.create_task(_read_all(err_r, err))
                await exit_.wait()
        finally:
            # Here, not in the readers: a task cancelled before it first ran would
            # not run a ``finally`` of its own. Their waits ended with them.
            for fd in (out_r, err_r):
                os.close(fd)
        if scope.expired():
            _kill(exit_.pid)
            await exit_.wait()  # no longer cancelled: the deadline was ours
            raise DeadlineExceeded(f"{argv[0]} did not finish within {timeout}s")
        assert exit_.status is not None
        return exit_.status, bytes(out), bytes(err)


async def _read_all(fd: int, into: bytearray) -> None:
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            await wait_readable(fd)
            continue
        if not chunk:
            return
        if len(into) < COMMAND_OUTPUT_LIMIT:
            into += chunk[: COMMAND_OUTPUT_LIMIT - len(into)]


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


class Process:
    """One process of a container (its init, or an exec) and its stdio."""

    def __init__(
        self,
        exec_id: str,
        exit_: Exit,
        *,
        stdin: StdinWriter | None,
        stdout: OutputBuffer,
        stderr: OutputBuffer,
        tty_fd: int | None = None,
    ) -> None:
        self.exec_id = exec_id
        self.exit = exit_
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        # Our own dup of the pty master, for window resizes.
        self._tty_fd = tty_fd
        # Set once a WaitProcess returned its status.
        self.waited = False

    def start_pumps(self, group: asyncio.TaskGroup, stdout_fd: int, stderr_fd: int | None) -> None:
        """Fill the output buffers from these fds (owned) in tasks of ``group``, until ``close``."""
        group.create_task(self.stdout.pump(stdout_fd))
        if stderr_fd is not None:
            group.create_task(self.stderr.pump(stderr_fd))

    @property
    def pid(self) -> int:
        return self.exit.pid

    @property
    def init(self) -> bool:
        return self.exec_id == ""

    @property
    def exited(self) -> bool:
        return self.exit.status is not None

    @property
    def terminal(self) -> bool:
        return self._tty_fd is not None

    async def wait(self) -> int:
        """The exit code, once the process exited and its output is all buffered."""
        status = await self.exit.wait()
        await self.stdout.eof_seen.wait()
        await self.stderr.eof_seen.wait()
        return status

    def signal(self, sig: int) -> None:
        """Send ``sig``; a process that already exited is left alone (not an error)."""
        if self.exited:
            return  # reaped: the pid may belong to someone else now
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def handles_signal(self, sig: int) -> bool:
        """Whether the process catches ``sig`` (``SigCgt`` in /proc/<pid>/status)."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("SigCgt:"):
                        return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
        except (OSError, ValueError, IndexError):
            pass
        return False

    def resize(self, rows: int, columns: int) -> None:
        if self._tty_fd is None:
            raise FailedPrecondition(f"process {self.exec_id or 'init'} has no terminal")
        try:
            fcntl.ioctl(self._tty_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.ENOTTY, errno.EBADF):
                raise FailedPrecondition(f"terminal is gone: {exc}") from exc
            raise

    def close(self) -> None:
        """Drop every fd we hold for this process; readers see EOF.

        The pumps' fds are closed as the pumps end, once they run next.
        """
        if self.stdin is not None:
            self.stdin.close_now()
        self.stdout.close()  # ends its pump
        self.stderr.close()
        if self._tty_fd is not None:
            os.close(self._tty_fd)
            self._tty_fd = None
