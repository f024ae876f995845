"""Unix socket plumbing: file sockets with mode 0600 and the peer's credentials.

Never abstract sockets: any process in the network namespace can reach those
(CVE-2020-15257).
"""

from __future__ import annotations

import errno
import os
import socket
import stat

import trio

from shimv2.ttrpc._service import PeerCredentials as PeerCredentials
from shimv2.ttrpc._service import peer_credentials as peer_credentials

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_PATH = 107


def _check_path(path: str) -> None:
    if not path or path.startswith("\0"):
        raise ValueError("ttrpc: only file sockets are allowed, not abstract ones")
    if len(os.fsencode(path)) > MAX_PATH:
        raise ValueError(f"ttrpc: socket path longer than {MAX_PATH} bytes: {path}")


def _remove_stale(path: str) -> None:
    """Remove a socket file nobody listens on; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise FileExistsError(errno.EADDRINUSE, "a server is already listening", path)


async def open_unix_listener(
    path: str, *, mode: int = 0o600, backlog: int = 128
) -> trio.SocketListener:
    """Listen on a file socket that only its owner can connect to."""
    _check_path(path)
    _remove_stale(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The umask makes the file private from the moment it exists; chmod then
        # sets exactly the requested mode.
        old = os.umask(0o177)
        try:
            await sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def open_unix_stream(path: str) -> trio.SocketStream:
    _check_path(path)
    return await trio.open_unix_socket(path)
