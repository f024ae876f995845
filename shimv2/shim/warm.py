"""Warm shims: each pod's daemon forked from a process that has imported it already.

A cold daemon spends ~0.4 s importing trio, protobuf and virtcontainers before
it serves containerd's first request, and each one holds its own copy of those
modules (~25 MiB). ``kata-py factory serve`` runs a server that imports them
once and, when ``start`` asks on ``SOCKET``, forks a daemon: the child starts
serving at once and shares the imported pages with its siblings.

What containerd sees does not change: ``start`` still creates the listening
socket and replies with its address; the child gets that socket as fd 3, the
log FIFO as stdout and stderr, the bundle as cwd, ``start``'s environment and
cgroups, a session of its own, and the shim's command line (``/proc/<pid>/
cmdline``, so ``ps`` and pid checks see a shim). Its parent is the server,
which reaps it. Without a server, or if it fails, ``start`` spawns a cold
daemon as before.

Only root may ask (SO_PEERCRED); a request is bounded and checked field by
field before anything is forked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ctypes

log = logging.getLogger(__name__)

SOCKET = "/run/kata-py/shims.sock"
TITLE_ROOM = 4096  # bytes of argument area the server keeps for its shims' command lines
PROGRAM = "containerd-shim-kata-py-v2"
MAX_REQUEST = 64 * 1024
MAX_ARGS = 32
MAX_ENV = 512
REQUEST_TIMEOUT = 2.0
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


# -- the client side, in ``start`` ---------------------------------------------------


def request_daemon(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    listen_fd: int,
    out_fd: int,
    path: str = SOCKET,
) -> int | None:
    """Ask the server for a daemon; its pid, or None when no server answers."""
    if not os.path.exists(path):
        return None
    body = json.dumps({"argv": list(argv), "env": dict(env), "cwd": cwd}).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(REQUEST_TIMEOUT)
            conn.connect(path)
            socket.send_fds(conn, [body], [listen_fd, out_fd])
            conn.shutdown(socket.SHUT_WR)
            reply = conn.recv(4096)
        pid = json.loads(reply)["pid"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("start: no warm shim (%s); starting a cold one", exc)
        return None
    if not isinstance(pid, int) or pid <= 0:
        log.warning("start: the warm shim server answered %r; starting a cold one", reply[:80])
        return None
    return pid


# -- the server ----------------------------------------------------------------------


class BadRequest(ValueError):
    pass


def parse_request(body: bytes) -> tuple[list[str], dict[str, str], str]:
    """argv, env and cwd of a request, each checked; ``BadRequest`` otherwise."""
    try:
        req = json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"not JSON: {exc}") from None
    if not isinstance(req, dict):
        raise BadRequest("not an object")
    argv, env, cwd = req.get("argv"), req.get("env"), req.get("cwd")
    if not isinstance(argv, list) or not 0 < len(argv) <= MAX_ARGS:
        raise BadRequest("argv: want a list of 1 to 32 strings")
    if not all(isinstance(a, str) and "\0" not in a for a in argv):
        raise BadRequest("argv: want strings")
    if not isinstance(env, dict) or len(env) > MAX_ENV:
        raise BadRequest("env: want an object of at most 512 strings")
    for key, value in env.items():
        if not isinstance(value, str) or not key or "=" in key or "\0" in key + value:
            raise BadRequest(f"env: bad entry {key!r}")
    if not isinstance(cwd, str) or not os.path.isabs(cwd) or "\0" in cwd:
        raise BadRequest("cwd: want an absolute path")
    return argv, env, cwd


def _peer(conn: socket.socket) -> tuple[int, int]:
    """The connecting process's pid and uid."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    pid, uid, _gid = struct.unpack("3i", creds)
    return pid, uid


def serve(path: str = SOCKET, *, preload: Sequence[str] = PRELOAD) -> int:
    """Run the server until SIGTERM or SIGINT; the exit status."""
    import importlib

    for module in preload:
        importlib.import_module(module)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(64)
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
        peer_pid, peer_uid = _peer(conn)
        if peer_uid != 0:
            raise BadRequest(f"uid {peer_uid} may not ask for a shim")
        body, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, 2)
        if len(fds) != 2:
            raise BadRequest(f"want 2 fds (socket, log), got {len(fds)}")
        argv, env, cwd = parse_request(body)
        pid = os.fork()
        if pid == 0:
            _child(argv, env, cwd, fds, peer_pid, [conn.fileno(), listener.fileno()])
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
        _join_cgroups(peer)
        for fd in close:
            os.close(fd)
        listen_fd, out_fd = fds
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.dup2(listen_fd, 3)  # dup2 clears close-on-exec, as spawn_daemon's does
        os.closerange(4, 1 << 16)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
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
    import ctypes  # here: ``start`` imports this module and must stay light

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
