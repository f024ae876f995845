"""A process's stdio: containerd's side (FIFOs, ``file://``, ``binary://``) to the agent's.

containerd names the destinations as strings (runc shim ``process/io.go``):

- ``""``: none;
- a plain path: a FIFO containerd created and already opened its own end of;
- ``file:///path``: stdout and stderr appended to one file;
- ``binary:///path?k=v``: a logging binary started with fd 3 = stdout, fd 4 =
  stderr (read ends of pipes), fd 5 = a pipe it closes (or writes) when ready,
  env ``CONTAINER_ID``/``CONTAINER_NAMESPACE``, the query as arguments.

With a terminal there is one stream (stdout); stderr is ignored.

Copiers: agent stdout/stderr → destination until the agent says EOF (b""),
one chunk at a time, so no more is read than was written (back-pressure);
stdin FIFO → agent, then CloseStdin. Output is always drained from the agent,
even with no destination, so a process never blocks on a full pipe.

Error handling: opening fails with ``InvalidArgument`` (bad URI) or
``FailedPrecondition`` (a FIFO or binary that cannot be used); a destination
that breaks while copying (reader gone) is logged once and the rest of the
output is discarded; an agent read that fails ends the stream as EOF.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qsl, urlparse

import trio

from shimv2.errdefs import Error, FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

CHUNK = 32 * 1024
BINARY_READY_TIMEOUT = 10.0
BINARY_EXIT_TIMEOUT = 10.0
STDIN_CLOSE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class StdioConfig:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


class AgentStreams(Protocol):
    """The stdio verbs of a vc container (``exec_id`` "" is the init)."""

    async def read_stdout(self, exec_id: str, max_bytes: int = ...) -> bytes: ...
    async def read_stderr(self, exec_id: str, max_bytes: int = ...) -> bytes: ...
    async def write_stdin(self, exec_id: str, data: bytes) -> int: ...
    async def close_stdin(self, exec_id: str) -> None: ...


Reader = Callable[[str, int], Awaitable[bytes]]


class Sink(Protocol):
    async def write_all(self, data: bytes) -> None: ...
    async def aclose(self) -> None: ...


# -- destinations ------------------------------------------------------------------


class StreamSink:
    """A FIFO or pipe write end (non-blocking, through trio's poller)."""

    def __init__(self, fd: int) -> None:
        self._stream = trio.lowlevel.FdStream(fd)

    async def write_all(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def aclose(self) -> None:
        await self._stream.aclose()


class FileSink:
    """A regular file opened for append (epoll cannot watch regular files)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._users = 0

    def share(self) -> FileSink:
        self._users += 1
        return self

    async def write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self._users -= 1
        if self._users <= 0 and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        await trio.lowlevel.checkpoint()


def open_fifo_writer(path: str) -> StreamSink:
    """Open a FIFO for writing without ever blocking the event loop.

    containerd opens its reader first, so O_WRONLY|O_NONBLOCK normally works;
    with no reader yet (ENXIO), O_RDWR opens at once and writes wait in the
    pipe buffer until a reader comes.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise FailedPrecondition(f"cannot open stdio {path}: {exc.strerror}") from exc
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    return StreamSink(fd)


def open_fifo_reader(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise FailedPrecondition(f"cannot open stdin {path}: {exc.strerror}") from exc


def open_append_file(path: str) -> FileSink:
    if not os.path.isabs(path):
        raise InvalidArgument(f"file:// stdio path must be absolute: {path!r}")
    # O_NOFOLLOW: a symlink planted at the log path must not redirect our writes
    # (ELOOP). O_NONBLOCK: a FIFO there must not hang the open; refused below.
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise FailedPrecondition(f"cannot open stdio file {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FailedPrecondition(f"stdio file {path} is not a regular file")
    os.set_blocking(fd, True)
    return FileSink(fd)


def binary_args(uri: str) -> tuple[str, list[str]]:
    """The binary's path and arguments: each query key, then its value if any."""
    parsed = urlparse(uri)
    if not parsed.path or not os.path.isabs(parsed.path):
        raise InvalidArgument(f"binary:// stdio needs an absolute path: {uri!r}")
    args: list[str] = []
    for key, value in parse_qsl(parsed.query, keep_blank_values=True):
        args.append(key)
        if value:
            args.append(value)
    return parsed.path, args


def _high_dup(fd: int) -> int:
    """A close-on-exec copy of ``fd`` numbered 10 or above (clear of 3, 4, 5)."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


def _spawn(path: str, argv: list[str], env: dict[str, str], fds: dict[int, int]) -> int:
    """posix_spawn (returns once the child exec'd) with ``fds`` as {child fd: our fd}."""
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, devnull, n) for n in (0, 1, 2)]
        actions += [(os.POSIX_SPAWN_DUP2, ours, child) for child, ours in fds.items()]
        return os.posix_spawn(path, argv, env, file_actions=actions)
    finally:
        os.close(devnull)


class BinaryLogger:
    """A logging binary (``binary://``): started, made ready, reaped."""

    def __init__(self, pid: int, pidfd: int, stdout: StreamSink, stderr: StreamSink) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self.stdout = stdout
        self.stderr = stderr

    @classmethod
    async def start(cls, uri: str, *, container_id: str, namespace: str) -> BinaryLogger:
        path, args = binary_args(uri)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        high = [_high_dup(fd) for fd in (out_r, err_r, ready_w)]
        for fd in (out_r, err_r, ready_w):
            os.close(fd)
        env = dict(os.environ, CONTAINER_ID=container_id, CONTAINER_NAMESPACE=namespace)
        try:
            pid = _spawn(path, [path, *args], env, dict(zip((3, 4, 5), high, strict=True)))
        except OSError as exc:
            for fd in (*high, out_w, err_w, ready_r):
                os.close(fd)
            raise FailedPrecondition(f"cannot start logging binary {path}: {exc}") from exc
        for fd in high:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        logger = cls(pid, pidfd, StreamSink(out_w), StreamSink(err_w))
        ready = trio.lowlevel.FdStream(ready_r)
        try:
            with trio.move_on_after(BINARY_READY_TIMEOUT) as waited:
                await ready.receive_some(1)  # a byte or EOF: ready
            if waited.cancelled_caught:
                raise FailedPrecondition(
                    f"logging binary {path} not ready within {BINARY_READY_TIMEOUT:g}s"
                )
        except BaseException:
            with trio.CancelScope(shield=True):
                await logger.aclose()
            raise
        finally:
            await ready.aclose()
        return logger

    async def aclose(self) -> None:
        """Close its pipes (it sees EOF), wait for it to exit; kill it if it lingers."""
        with contextlib.suppress(trio.ClosedResourceError):
            await self.stdout.aclose()
            await self.stderr.aclose()
        if self._pidfd < 0:
            return
        with trio.move_on_after(BINARY_EXIT_TIMEOUT):
            await trio.lowlevel.wait_readable(self._pidfd)
        if not self._reap():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with trio.move_on_after(BINARY_EXIT_TIMEOUT):
                await trio.lowlevel.wait_readable(self._pidfd)
            self._reap()
        trio.lowlevel.notify_closing(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1

    def _reap(self) -> bool:
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return True  # reaped by someone else (a subreaper's reaper)
        return pid != 0


# -- the process's IO -----------------------------------------------------------------


class ProcessIO:
    """The destinations of one process and the copiers that feed them."""

    def __init__(
        self,
        config: StdioConfig,
        *,
        stdin_fd: int = -1,
        stdout: Sink | None = None,
        stderr: Sink | None = None,
        logger: BinaryLogger | None = None,
    ) -> None:
        self.config = config
        self._stdin_fd = stdin_fd
        self._stdout = stdout
        self._stderr = stderr
        self._logger = logger
        self._started = False
        self._outputs_done = trio.Event()
        self._stdin_done = trio.Event()
        self._stdin_closing = False
        self._stdin_wait: trio.CancelScope | None = None
        self._stdin_scope = trio.CancelScope()
        if stdin_fd < 0:
            self._stdin_done.set()

    @classmethod
    async def open(cls, config: StdioConfig, *, container_id: str, namespace: str) -> ProcessIO:
        """Open every destination; on failure nothing stays open."""
        async with contextlib.AsyncExitStack() as undo:
            stdin_fd = -1
            if config.stdin:
                stdin_fd = open_fifo_reader(config.stdin)
                undo.callback(os.close, stdin_fd)
            stdout: Sink | None = None
            stderr: Sink | None = None
            logger = None
            scheme = urlparse(config.stdout).scheme if config.stdout else ""
            if scheme == "binary":
                logger = await BinaryLogger.start(
                    config.stdout, container_id=container_id, namespace=namespace
                )
                undo.push_async_callback(logger.aclose)
                stdout, stderr = logger.stdout, logger.stderr
            elif scheme == "file":
                shared = open_append_file(urlparse(config.stdout).path)
                undo.push_async_callback(shared.aclose)
                stdout = shared.share()
                if not config.terminal:
                    stderr = shared.share()
            elif scheme:
                raise InvalidArgument(f"unsupported stdio scheme {scheme!r}")
            else:
                if config.stdout:
                    stdout = open_fifo_writer(config.stdout)
                    undo.push_async_callback(stdout.aclose)
                if config.stderr and not config.terminal:
                    stderr = open_fifo_writer(config.stderr)
                    undo.push_async_callback(stderr.aclose)
            if config.terminal and logger is None and stderr is not None:
                await stderr.aclose()
                stderr = None
            io = cls(config, stdin_fd=stdin_fd, stdout=stdout, stderr=stderr, logger=logger)
            undo.pop_all()
        return io

    # -- copiers -----------------------------------------------------------------

    def start(self, nursery: trio.Nursery, streams: AgentStreams, exec_id: str) -> None:
        """Start the copiers (once the process runs)."""
        if self._started:
            return
        self._started = True
        nursery.start_soon(self._copy_outputs, streams, exec_id)
        if self._stdin_fd >= 0:
            nursery.start_soon(self._copy_stdin, streams, exec_id)

    async def _copy_outputs(self, streams: AgentStreams, exec_id: str) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._copy_out, streams.read_stdout, exec_id, self._stdout)
                if not self.config.terminal:
                    nursery.start_soon(self._copy_out, streams.read_stderr, exec_id, self._stderr)
        finally:
            self._outputs_done.set()

    async def _copy_out(self, read: Reader, exec_id: str, sink: Sink | None) -> None:
        broken = False
        try:
            while True:
                try:
                    data = await read(exec_id, CHUNK)
                except Error as exc:
                    # The error's text may be the guest's, a ttrpc frame long.
                    log.warning(
                        "exec %r: output read failed, taking it as EOF: %.300s", exec_id, exc
                    )
                    return
                if not data:
                    return
                if broken or sink is None:
                    continue
                try:
                    await sink.write_all(data)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    log.warning("exec %r: output destination broke, discarding: %s", exec_id, exc)
                    broken = True
        finally:
            if sink is not None:
                with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await sink.aclose()

    async def _copy_stdin(self, streams: AgentStreams, exec_id: str) -> None:
        fd = self._stdin_fd
        close_agent = False
        try:
            with self._stdin_scope:
                while True:
                    if not self._stdin_closing:
                        with trio.CancelScope() as self._stdin_wait:
                            await trio.lowlevel.wait_readable(fd)
                    try:
                        data = os.read(fd, CHUNK)
                    except BlockingIOError:
                        if self._stdin_closing:
                            close_agent = True  # forwarded what had been written
                            break
                        continue
                    if not data:
                        close_agent = True
                        break
                    view = memoryview(data)
                    while view:
                        n = await streams.write_stdin(exec_id, bytes(view))
                        view = view[n:] if 0 < n < len(view) else view[:0]
                if close_agent:
                    await streams.close_stdin(exec_id)
        except Error as exc:
            log.warning("exec %r: stdin copy ended: %.300s", exec_id, exc)
        finally:
            self._close_stdin_fd()
            self._stdin_done.set()

    def _close_stdin_fd(self) -> None:
        if self._stdin_fd >= 0:
            trio.lowlevel.notify_closing(self._stdin_fd)
            os.close(self._stdin_fd)
            self._stdin_fd = -1

    # -- verbs ---------------------------------------------------------------------

    async def close_stdin(self) -> None:
        """CloseIO: forward what is already in the stdin FIFO, then close the process's stdin.

        Before the process started, the copier does this as soon as it starts.
        """
        if self._stdin_done.is_set():
            return
        self._stdin_closing = True
        if self._stdin_wait is not None:
            self._stdin_wait.cancel()
        if self._started:
            with trio.move_on_after(STDIN_CLOSE_TIMEOUT):
                await self._stdin_done.wait()

    def stop_stdin(self) -> None:
        """The process is gone: stop forwarding stdin."""
        self._stdin_scope.cancel()
        if not self._started:
            self._close_stdin_fd()
            self._stdin_done.set()

    async def wait_outputs(self) -> None:
        """Until stdout and stderr were copied to EOF (at once if never started)."""
        if self._started:
            await self._outputs_done.wait()

    async def aclose(self) -> None:
        """Release everything (delete): stop copying, close destinations, reap the logger."""
        self.stop_stdin()
        if not self._started:
            for sink in (self._stdout, self._stderr):
                if sink is not None:
                    with contextlib.suppress(Exception):
                        await sink.aclose()
            self._stdout = self._stderr = None
        if self._logger is not None:
            logger, self._logger = self._logger, None
            await logger.aclose()
