"""Child processes with bounded shutdown: helper daemons (QEMU, virtiofsd)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Sequence

import trio

log = logging.getLogger(__name__)


class Child:
    """A started process whose exit is noticed by whoever awaits ``wait``."""

    def __init__(self, name: str, proc: trio.Process) -> None:
        self.name = name
        self._proc = proc

    @classmethod
    async def spawn(
        cls,
        name: str,
        argv: Sequence[str],
        *,
        stdout: int | None = subprocess.DEVNULL,
        stderr: int | None = subprocess.DEVNULL,
        pass_fds: Sequence[int] = (),
    ) -> Child:
        proc = await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
        )
        log.debug("%s started, pid %d: %s", name, proc.pid, " ".join(argv))
        return cls(name, proc)

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


def pid_alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` runs and its command line contains ``marker`` (pids get reused)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{pid}/stat", "rb") as f:
            zombie = f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False
    return not zombie and bool(marker) and marker in cmdline


class Adopted:
    """A process we did not start (found from persisted state), watched by pidfd."""

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.pid = pid
        self._fd = os.pidfd_open(pid)
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
