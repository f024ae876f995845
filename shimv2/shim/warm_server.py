"""The warm shim server (``kata-py factory serve``): forks pods' shim daemons.

See ``shimv2.shim.warm`` for what it is for and what ``start`` sends it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from shimv2.errdefs import AlreadyExists
from shimv2.shim.bootstrap import listen
from shimv2.shim.warm import MAX_REQUEST, REQUEST_TIMEOUT, SOCKET, BadRequest, parse_request
from shimv2.ttrpc import peer_credentials

log = logging.getLogger(__name__)

TITLE_ROOM = 4096  # bytes of argument area the server keeps for its shims' command lines
PROGRAM = "containerd-shim-kata-py-v2"
# What a daemon imports before it serves (shimv2.shim.daemon and what it loads
# lazily for a pod), imported once here.
PRELOAD = (
    "shimv2.shim.daemon",
    "shimv2.task_service.service",
    "shimv2.vc.api",
    "shimv2.vc.qmp",
    "shimv2.vc.template",
    "shimv2.vc.network",
)
_PR_SET_MM = 35
_PR_SET_MM_ARG_START = 8
_PR_SET_MM_ARG_END = 9
_CGROUP_ROOT = Path("/sys/fs/cgroup")


def serve(path: str = SOCKET, *, preload: Sequence[str] = PRELOAD) -> int:
    """Run the server until SIGTERM or SIGINT; the exit status."""
    import importlib

    for module in preload:
        importlib.import_module(module)
    # As a shim's own socket: mode 0600, a stale one replaced, a live server left alone.
    listener = listen(path)
    if listener is None:
        raise AlreadyExists(f"a warm shim server already listens on {path}")
    listener.settimeout(0.5)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("warm shims: serving on %s (pid %d)", path, os.getpid())
    try:
        while not stopping:
            _reap()
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except InterruptedError:
                continue
            with conn:
                _answer(conn, listener)
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    log.info("warm shims: stopped; the shims forked here keep running")
    return 0


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _answer(conn: socket.socket, listener: socket.socket) -> None:
    fds: list[int] = []
    try:
        conn.settimeout(REQUEST_TIMEOUT)
        creds = peer_credentials(conn)
        if creds is None:
            raise BadRequest("not a unix socket peer")
        peer_pid, peer_uid = creds.pid, creds.uid
        if peer_uid != 0:
            raise BadRequest(f"uid {peer_uid} may not ask for a shim")
        body, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, 2)
        if len(fds) != 2:
            raise BadRequest(f"want 2 fds (socket or stdout, log or stderr), got {len(fds)}")
        argv, env, cwd, delete = parse_request(body)
        pid = os.fork()
        if pid == 0:
            if delete:
                _delete_child(argv, env, cwd, fds, peer_pid, conn, listener.fileno())
            _child(argv, env, cwd, fds, peer_pid, [conn.fileno(), listener.fileno()])
        if not delete:  # a delete's child answers itself, once done
            conn.sendall(json.dumps({"pid": pid}).encode())
        log.info("warm shims: forked %d for %s", pid, " ".join(argv))
    except (BadRequest, OSError) as exc:
        log.warning("warm shims: refused a request: %s", exc)
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"error": str(exc)}).encode())
    finally:
        for fd in fds:
            os.close(fd)


def _child(
    argv: list[str], env: dict[str, str], cwd: str, fds: list[int], peer: int, close: list[int]
) -> None:
    """In the forked daemon: become what ``spawn_daemon`` would have started. Never returns."""
    status = 1
    try:
        os.setsid()
        for fd in close:
            os.close(fd)
        listen_fd, out_fd = fds
        _take_on(peer, cwd, env, (out_fd, out_fd))
        os.dup2(listen_fd, 3)  # dup2 clears close-on-exec, as spawn_daemon's does
        os.closerange(4, 1 << 16)
        # As spawn_daemon: blocked until the daemon's handlers are in place.
        signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGINT))
        title = set_cmdline([PROGRAM, *argv])  # kept alive: the kernel reads it
        from shimv2.shim import run

        status = run(argv)
        del title
    except BaseException as exc:  # the child must end here, whatever happened
        with contextlib.suppress(Exception):
            print(f"{PROGRAM}: warm start failed: {exc!r}", file=sys.stderr, flush=True)
    finally:
        os._exit(status)


def _delete_child(
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    fds: list[int],
    peer: int,
    conn: socket.socket,
    listener: int,
) -> None:
    """In the forked child: run ``delete`` with the asker's stdout and stderr, answer
    its exit status on ``conn``. Never returns."""
    status = 1
    try:
        os.close(listener)
        _take_on(peer, cwd, env, (fds[0], fds[1]))
        from shimv2.shim import run

        status = run(argv, warm=False)
    except BaseException as exc:  # the child must end here, whatever happened
        with contextlib.suppress(Exception):
            print(f"{PROGRAM}: warm delete failed: {exc!r}", file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            conn.sendall(json.dumps({"status": status}).encode())
        os._exit(status)


def _take_on(peer: int, cwd: str, env: dict[str, str], out: tuple[int, int]) -> None:
    """In a forked child: the asker's cgroups, directory and environment, no stdin,
    ``out`` as stdout and stderr, and the default SIGTERM and SIGINT."""
    _join_cgroups(peer)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out[0], 1)
    os.dup2(out[1], 2)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)


def _join_cgroups(pid: int) -> None:
    """Move this process into the cgroups ``pid`` (the ``start`` process) is in."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        _hid, controllers, path = line.split(":", 2)
        if controllers:  # v1: the hierarchy is mounted under its controllers' names
            names = [c.removeprefix("name=") for c in controllers.split(",")]
            mounted = [_CGROUP_ROOT / n for n in (controllers, *names)]
            base = next((m for m in mounted if m.is_dir()), None)
        else:
            base = _CGROUP_ROOT if (_CGROUP_ROOT / "cgroup.procs").exists() else None
        if base is None:
            continue
        with contextlib.suppress(OSError):
            (base / path.lstrip("/") / "cgroup.procs").write_text("0")


def set_cmdline(argv: Sequence[str]) -> ctypes.Array[ctypes.c_char] | None:
    """Make ``/proc/self/cmdline`` read ``argv``; the buffer to keep alive, if one is used.

    With CAP_SYS_RESOURCE, PR_SET_MM points the kernel at a new buffer: exact.
    Without (a container's root may lack it), ``argv`` is written over the
    process's own argument area, which the server makes roomy (``TITLE_ROOM``);
    what does not fit is cut, and the rest of the area is NULs.
    """
    raw = b"\0".join(a.encode() for a in argv) + b"\0"
    buffer = ctypes.create_string_buffer(raw, len(raw))
    libc = ctypes.CDLL(None, use_errno=True)
    start = ctypes.addressof(buffer)
    fields = ((_PR_SET_MM_ARG_START, start), (_PR_SET_MM_ARG_END, start + len(raw)))
    if all(libc.prctl(_PR_SET_MM, f, ctypes.c_ulong(a), 0, 0) == 0 for f, a in fields):
        return buffer
    stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    arg_start, arg_end = int(stat[45]), int(stat[46])  # fields 48 and 49 of stat(5)
    room = arg_end - arg_start
    if room > 1:
        title = raw[: room - 1].ljust(room, b"\0")
        ctypes.memmove(arg_start, title, room)
    return None
