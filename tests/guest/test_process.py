"""The child reaper on asyncio: its SIGCHLD handler, commands, deadlines, unclaimed exits."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from shimv2.aio import start_task
from shimv2.errdefs import DeadlineExceeded, Unavailable
from shimv2.guest.process import Reaper
from tests.aio import asyncio_test, cancel_and_wait


@asynccontextmanager
async def running(reaper: Reaper) -> AsyncIterator[None]:
    async with asyncio.TaskGroup() as group:
        task, _ = await start_task(group, reaper.run)
        try:
            yield
        finally:
            await cancel_and_wait(task)


@asyncio_test
async def test_run_command_output_and_exit_code() -> None:
    reaper = Reaper()
    fds = os.listdir("/proc/self/fd")
    async with running(reaper):
        assert reaper.running
        code, out, err = await reaper.run_command(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (code, out, err) == (3, b"out\n", b"err\n")
    assert not reaper.running
    assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL  # the handler went with it
    assert os.listdir("/proc/self/fd") == fds


@asyncio_test
async def test_a_command_past_its_deadline_is_killed_and_reaped(tmp_path: Path) -> None:
    reaper = Reaper()
    pid_file = tmp_path / "pid"
    fds = os.listdir("/proc/self/fd")
    async with running(reaper), asyncio.timeout(10):
        with pytest.raises(DeadlineExceeded):
            await reaper.run_command(
                ["sh", "-c", f"echo $$ > {pid_file}; exec sleep 30"], timeout=0.3
            )
    pid = int(pid_file.read_text())
    assert not os.path.exists(f"/proc/{pid}")  # killed, and no zombie left
    assert os.listdir("/proc/self/fd") == fds


def test_spawn_needs_the_reaper_running() -> None:
    with pytest.raises(Unavailable):
        Reaper().spawn(["true"], 0, 1, 2)


@asyncio_test
async def test_an_exit_reaped_before_it_was_watched_is_kept() -> None:
    """A container's process may exit before the agent read its pid file."""
    reaper = Reaper()
    async with running(reaper), asyncio.timeout(10):
        # Not through the reaper's spawn: as crun's child, which the agent inherits.
        pid = os.posix_spawnp("true", ["true"], dict(os.environ))  # noqa: ASYNC221
        while pid not in reaper._unclaimed:  # noqa: ASYNC110 (SIGCHLD runs reap, no event)
            await asyncio.sleep(0.01)
        exit_ = reaper.watch(pid)
        assert exit_.status == 0
        assert await exit_.wait() == 0
