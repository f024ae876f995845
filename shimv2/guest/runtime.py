"""A thin wrapper around the OCI runtime binary (crun by default, runc selectable).

Every verb runs the binary through the agent's ``Reaper`` and is bounded by a
deadline. ``create`` and ``exec`` give the runtime the process's stdio as its
own fds 0-2 (the container inherits them), so the runtime's own messages go to
``--log`` instead, and that log is what a failure reports.

Error handling: a failing verb raises ``RuntimeFailed`` (FailedPrecondition,
with the runtime's message); ``DeadlineExceeded`` when it outlives its deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from collections.abc import Sequence
from typing import Any

from shimv2.aio import move_on_after
from shimv2.errdefs import DeadlineExceeded, FailedPrecondition, Internal
from shimv2.guest.process import Exit, Reaper

DEFAULT_TIMEOUT = 60.0
CRUN_STATE_ROOT = "/run/crun"  # crun's --root when run as root
_LOG_TAIL = 4096


class RuntimeFailed(FailedPrecondition):
    """The OCI runtime refused a verb (bad spec, wrong state, …)."""


class Runtime:
    def __init__(
        self,
        binary: str = "crun",
        *,
        reaper: Reaper | None = None,
        command_prefix: Sequence[str] = (),
        root: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """``command_prefix`` runs the binary under a wrapper (tests: a mount namespace);
        ``root`` is the runtime's state dir (``--root``)."""
        self.binary = binary
        self.reaper = reaper if reaper is not None else Reaper()
        self._prefix = tuple(command_prefix)
        self._root = root
        self._timeout = timeout

    def _argv(self, *args: str) -> list[str]:
        argv = [*self._prefix, self.binary]
        if self._root is not None:
            argv += ["--root", self._root]
        return [*argv, *args]

    async def _run(self, *args: str) -> bytes:
        code, out, err = await self.reaper.run_command(self._argv(*args), timeout=self._timeout)
        if code != 0:
            message = err.decode(errors="replace").strip()[-_LOG_TAIL:]
            raise RuntimeFailed(f"{self.binary} {args[0]}: exit {code}: {message}")
        return out

    async def _run_with_stdio(
        self, args: Sequence[str], log: str, stdio: tuple[int, int, int]
    ) -> None:
        """Run a verb whose fds 0-2 go to the container; errors come from ``log``."""
        argv = self._argv("--log", log, *args)
        exit_ = self.reaper.spawn(argv, *stdio)
        code = await _wait_bounded(exit_, self._timeout)
        if code != 0:
            raise RuntimeFailed(f"{self.binary} {args[0]}: exit {code}: {_log_tail(log)}")

    async def create(
        self,
        cid: str,
        bundle: str,
        pid_file: str,
        *,
        log: str,
        stdio: tuple[int, int, int],
        console_socket: str | None = None,
    ) -> None:
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket is not None:
            args += ["--console-socket", console_socket]
        await self._run_with_stdio([*args, cid], log, stdio)

    async def exec(
        self,
        cid: str,
        process_json: str,
        pid_file: str,
        *,
        log: str,
        stdio: tuple[int, int, int],
        console_socket: str | None = None,
    ) -> None:
        args = ["exec", "--process", process_json, "--detach", "--pid-file", pid_file]
        if console_socket is not None:
            args += ["--tty", "--console-socket", console_socket]
        await self._run_with_stdio([*args, cid], log, stdio)

    async def start(self, cid: str, *, poststart_hooks: bool = False) -> None:
        """Let the created container's process run.

        crun's ``start`` opens the container's exec FIFO, removes it and writes
        one byte, then runs poststart hooks. Without hooks the agent does the
        same itself: an exec of crun costs ~0.15 s under TCG. Whenever the FIFO
        cannot be opened (no such container, its process died), ``crun start``
        runs and reports why.
        """
        if not poststart_hooks and self._release_exec_fifo(cid):
            return
        await self._run("start", cid)

    def _release_exec_fifo(self, cid: str) -> bool:
        if os.path.basename(self.binary) != "crun" or "/" in cid or cid in ("", ".", ".."):
            return False
        fifo = os.path.join(self._root or CRUN_STATE_ROOT, cid, "exec.fifo")
        try:
            # Non-blocking: with no reader (the container's process is gone) this
            # fails at once instead of hanging.
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            os.unlink(fifo)  # crun tells "created" from "running" by the FIFO
            os.write(fd, b"\0")
        finally:
            os.close(fd)
        return True

    def remove_stopped(self, cid: str, cgroup: str) -> bool:
        """Do what crun's ``delete`` does for a stopped container, without an exec of crun.

        crun removes the container's cgroup and its state directory, then runs
        poststop hooks; the caller has reaped every process of the container and
        its spec has no such hooks. False when it cannot be done here, with
        nothing changed that crun's own delete then misses: the cgroup still busy
        (an orphan not yet gone), or no state of crun's.
        """
        if os.path.basename(self.binary) != "crun" or "/" in cid or cid in ("", ".", ".."):
            return False
        state = os.path.join(self._root or CRUN_STATE_ROOT, cid)
        if os.path.islink(state) or not os.path.isdir(state):
            return False
        if cgroup:
            try:
                os.rmdir(cgroup)
            except FileNotFoundError:
                pass
            except OSError:
                return False
        shutil.rmtree(state, ignore_errors=True)
        return not os.path.lexists(state)

    async def kill(self, cid: str, sig: int, *, all_processes: bool = False) -> None:
        args = ["kill"] + (["--all"] if all_processes else []) + [cid, str(sig)]
        await self._run(*args)

    async def delete(self, cid: str, *, force: bool = False) -> None:
        await self._run("delete", *(["--force"] if force else []), cid)

    async def pause(self, cid: str) -> None:
        await self._run("pause", cid)

    async def resume(self, cid: str) -> None:
        await self._run("resume", cid)

    async def update(self, cid: str, resources_json: str) -> None:
        await self._run("update", "--resources", resources_json, cid)

    async def ps(self, cid: str) -> list[int]:
        out = await self._run("ps", "--format", "json", cid)
        pids = _parse_json(out, "ps")
        if not isinstance(pids, list) or not all(isinstance(p, int) for p in pids):
            raise Internal(f"{self.binary} ps: unexpected output {out[:200]!r}")
        return pids

    async def state(self, cid: str) -> dict[str, Any]:
        out = await self._run("state", cid)
        state = _parse_json(out, "state")
        if not isinstance(state, dict):
            raise Internal(f"{self.binary} state: unexpected output {out[:200]!r}")
        return state


async def _wait_bounded(exit_: Exit, timeout: float) -> int:
    async with move_on_after(timeout) as scope:
        return await exit_.wait()
    assert scope.expired()
    with contextlib.suppress(ProcessLookupError):
        os.kill(exit_.pid, signal.SIGKILL)
    await exit_.wait()  # no longer cancelled: the deadline was ours
    raise DeadlineExceeded(f"OCI runtime did not finish within {timeout}s")


def _parse_json(out: bytes, verb: str) -> Any:
    try:
        return json.loads(out or b"null")
    except ValueError as exc:
        raise Internal(f"{verb}: undecodable output: {exc}") from exc


def _log_tail(path: str) -> str:
    """The runtime's last messages (crun/runc write one JSON object per line)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _LOG_TAIL))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    messages = []
    for line in lines[-5:]:
        try:
            entry = json.loads(line)
            messages.append(str(entry.get("msg", line)) if isinstance(entry, dict) else line)
        except ValueError:
            messages.append(line)
    return "; ".join(messages) or "(empty log)"
