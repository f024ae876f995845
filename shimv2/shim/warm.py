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
field before anything is forked. This module is ``start``'s side and the
request's format, light enough for ``start``; the server is
``shimv2.shim.warm_server``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

SOCKET = "/run/kata-py/shims.sock"
ENV = "KATA_PY_SHIM_SERVER"  # another server socket than SOCKET
MAX_REQUEST = 64 * 1024
MAX_ARGS = 32
MAX_ENV = 512
REQUEST_TIMEOUT = 2.0
# A delete that finds a sandbox to clean stops its VM: seconds. containerd bounds it too.
DELETE_TIMEOUT = 60.0
MAX_REPLY = 4096


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


def request_delete(
    argv: Sequence[str], env: Mapping[str, str], cwd: str, path: str = SOCKET
) -> int | None:
    """Have the server run ``delete`` (argv) in a child, with our stdout and stderr.

    Its exit status; None, with nothing run, when no server takes the request.
    ``delete`` runs after every shim, a clean one included, and its imports
    cost it ~0.15 s here; the server's child has them already.
    """
    if not os.path.exists(path):
        return None
    body = json.dumps({"argv": list(argv), "env": dict(env), "cwd": cwd, "delete": True})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        try:
            conn.settimeout(REQUEST_TIMEOUT)
            conn.connect(path)
            socket.send_fds(conn, [body.encode()], [1, 2])
            conn.shutdown(socket.SHUT_WR)
        except OSError as exc:
            log.warning("delete: no warm shim server (%s); deleting here", exc)
            return None
        # The child answers once done; the server only when it refused.
        conn.settimeout(DELETE_TIMEOUT)
        reply = b""
        try:
            while len(reply) <= MAX_REPLY and (chunk := conn.recv(MAX_REPLY)):
                reply += chunk
            answer = json.loads(reply)
        except (OSError, ValueError) as exc:
            print(f"delete: the warm shim server's child failed: {exc}", file=sys.stderr)
            return 1
    if not isinstance(answer, dict) or not isinstance(answer.get("status"), int):
        log.warning("delete: the warm shim server answered %r; deleting here", reply[:80])
        return None
    status: int = answer["status"]
    return status


# -- the request, as the server reads it ----------------------------------------------


class BadRequest(ValueError):
    pass


def parse_request(body: bytes) -> tuple[list[str], dict[str, str], str, bool]:
    """argv, env, cwd and whether it is a ``delete``, each checked; ``BadRequest`` otherwise."""
    try:
        req = json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"not JSON: {exc}") from None
    if not isinstance(req, dict):
        raise BadRequest("not an object")
    delete = req.get("delete", False)
    if not isinstance(delete, bool):
        raise BadRequest("delete: want a boolean")
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
    return argv, env, cwd, delete
