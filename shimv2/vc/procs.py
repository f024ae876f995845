"""Child processes with bounded shutdown: helper daemons (QEMU, virtiofsd).

Pids get reused, so a recorded pid alone never names a process: before a
process we did not start ourselves is signalled or adopted, its start time
(recorded when we spawned it) and/or an exact argument must match, and the
pidfd the signal goes through is opened between two such checks.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)

# sh -c SCRIPT $0 PROCS_FILE... -- ARGV...: echo is a builtin, so the shell
# itself moves into each cgroup, then becomes ARGV.
ENTER_CGROUP = (
    "/bin/sh", "-c",
    'while [ "$1" != -- ]; do echo 0 > "$1" || exit 125; shift; done; shift; exec "$@"',
    "kata-py-enter-cgroup",
)  # fmt: skip


class Child:
    """A started process whose exit is noticed by whoever awaits ``wait``."""

    def __init__(self, name: str, proc: trio.Process, start_time: int = 0) -> None:
        self.name = name
        self._proc = proc
        self.start_time = start_time  # see ``process_start_time``; 0: unknown

    @classmethod
    async def spawn(
        cls,
        name: str,
        argv: Sequence[str],
        *,
        stdout: int | None = subprocess.DEVNULL,
        stderr: int | None = subprocess.DEVNULL,
        pass_fds: Sequence[int] = (),
        cgroup: Sequence[str] = (),
    ) -> Child:
        """Start ``argv``; inside ``cgroup`` (``cgroup.procs`` files) before it execs.

        A shell joins each cgroup, then execs ``argv``: the process is charged
        to the cgroup from its first page (Python has no CLONE_INTO_CGROUP), and
        keeps its pid, fds and, after the exec, exactly ``argv`` as its command line.
        """
        full = [*ENTER_CGROUP, *cgroup, "--", *argv] if cgroup else list(argv)
        proc = await trio.lowlevel.open_process(
            full,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
        )
        where = f" in {', '.join(cgroup)}" if cgroup else ""
        log.debug("%s started, pid %d%s: %s", name, proc.pid, where, " ".join(argv))
        # Not reaped until we wait for it: the pid is surely still this process.
        return cls(name, proc, process_start_time(proc.pid))

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        return await self._proc.wait()

    async def stop(self, grace: float = 3.0) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps."""
        if self._proc.returncode is None:
            self._signal(signal.SIGTERM)
            with trio.move_on_after(grace):
                return await self._proc.wait()
            log.warning("%s (pid %d) ignored SIGTERM; killing", self.name, self.pid)
            self._signal(signal.SIGKILL)
        with trio.CancelScope(shield=True):
            status: int = await self._proc.wait()
        return status

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._proc.pid, sig)


def _read_stat(pid: int) -> tuple[bytes, int] | None:
    """(state, start time) of ``pid`` from /proc/PID/stat; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # After the last ")": the command name may hold spaces and parentheses.
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    except (OSError, IndexError, ValueError):
        return None


def process_start_time(pid: int) -> int:
    """When ``pid`` started, in clock ticks after boot (field 22 of /proc/PID/stat); 0 if gone.

    With the pid it names one process for as long as the machine runs.
    """
    stat = _read_stat(pid)
    return stat[1] if stat is not None else 0


def _argv(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="surrogateescape") for a in raw.split(b"\0")[:-1]]


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    """A process we started, as recorded: its pid and what tells it from a reuse of the pid.

    ``start_time`` (``process_start_time`` at spawn; 0 = not recorded) must be
    equal, and ``option`` (an option and its value, e.g. ``("-name",
    "kata-py-<id>")``) must be in the argv as two whole arguments or as one
    ``option=value``. With neither, nothing matches: a bare pid is no identity.
    """

    pid: int
    start_time: int = 0
    option: tuple[str, str] | None = None

    def matches(self) -> bool:
        """Whether the pid is (still) this process, running and not a zombie."""
        if self.pid <= 0 or (not self.start_time and self.option is None):
            return False
        stat = _read_stat(self.pid)
        if stat is None or stat[0] == b"Z":
            return False
        if self.start_time and stat[1] != self.start_time:
            return False
        return self.option is None or _has_option(_argv(self.pid), *self.option)

    def open_pidfd(self) -> int | None:
        """A pidfd of this very process, or None if the pid is gone or another process."""
        return self._open_checked(lambda: os.pidfd_open(self.pid), ProcessLookupError)

    def open_mount_namespace(self) -> int | None:
        """An fd of this very process's mount namespace, or None (as ``open_pidfd``)."""
        return self._open_checked(
            lambda: os.open(f"/proc/{self.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC),
            FileNotFoundError,
        )

    def _open_checked(self, open_fd: Callable[[], int], gone: type[OSError]) -> int | None:
        """``open_fd()``, checked before and after: if both checks pass, the pid was
        this process all along, so the fd (which names whatever held the pid when it
        was opened) is this process's, and signals sent through it can reach no other."""
        if not self.matches():
            return None
        try:
            fd = open_fd()
        except gone:
            return None
        if self.matches():
            return fd
        os.close(fd)
        return None


def _has_option(argv: list[str], option: str, value: str) -> bool:
    joined = f"{option}={value}"
    return any(
        arg == joined or (arg == option and argv[i + 1 : i + 2] == [value])
        for i, arg in enumerate(argv)
    )


class Adopted:
    """A process we did not start (found from persisted state), watched by pidfd.

    Errors: ``ProcessLookupError`` when the recorded pid is gone or is another
    process now (``ProcessIdentity``).
    """

    def __init__(self, name: str, identity: ProcessIdentity) -> None:
        fd = identity.open_pidfd()
        if fd is None:
            raise ProcessLookupError(
                errno.ESRCH, f"{name}: pid {identity.pid} is gone or another process"
            )
        self.name = name
        self.pid = identity.pid
        self.start_time = identity.start_time or process_start_time(identity.pid)
        self._fd = fd
        self.returncode: int | None = None
        self._watching = False
        self._exited = trio.Event()

    async def wait(self) -> int:
        # One task polls the pidfd (trio allows one waiter per fd); others wait on it.
        if not self._watching:
            self._watching = True
            try:
                await trio.lowlevel.wait_readable(self._fd)
            except BaseException:
                self._watching = False  # cancelled: let the next waiter poll
                raise
            # Not our child: its status is not ours to read.
            self.returncode = -1
            os.close(self._fd)
            self._exited.set()
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def close(self) -> None:
        """Let go of a process never waited for (an adoption that failed half way)."""
        if not self._watching and self.returncode is None and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def stop(self, grace: float = 3.0) -> int:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._fd, signal.SIGTERM)
            with trio.move_on_after(grace):
                return await self.wait()
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._fd, signal.SIGKILL)
        with trio.CancelScope(shield=True):
            status = await self.wait()
        return status
