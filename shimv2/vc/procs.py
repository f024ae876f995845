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
    ) -> Child:
        proc = await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
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
