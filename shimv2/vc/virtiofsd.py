"""One virtiofsd per sandbox, sharing its shared directory under the tag kataShared."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from shimv2.vc.mountns import nsenter_argv
from shimv2.vc.procs import Child
from shimv2.vc.qemu_config import VIRTIOFSD

# Extended attributes the guest may use on host files: file capabilities (an
# image's setcap binaries must keep working, and guest root can make setuid
# files anyway), everything else but security.* and trusted.*, which label
# files for the host's LSMs and its overlayfs. Those answer ENOTSUP, not EPERM:
# the guest kernel's execve treats EPERM on security.capability as fatal.
XATTR_MAP = (
    ":ok:all:security.capability:security.capability:"
    ":unsupported:all:security.:security.:"
    ":unsupported:all:trusted.:trusted.:"
    ":ok:all:::"
)


def listening_socket(path: Path) -> socket.socket:
    """A unix socket already listening at ``path``, mode 0600.

    virtiofsd gets it as ``--fd``: QEMU can connect as soon as the path
    exists (virtiofsd's own socket is bound before it listens, and a connect
    in between is refused, failing QEMU's start).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock


async def start_virtiofsd(
    socket_path: Path,
    shared_dir: Path,
    log_path: Path,
    *,
    binary: str = VIRTIOFSD,
    cgroup: tuple[str, ...] = (),
    mount_ns: str = "",
) -> Child:
    """Start virtiofsd on a listening socket (QEMU connects to it at launch).

    ``shared_dir`` is the sandbox's read-only view (``shimv2.vc.storage``).
    ``sandbox=chroot`` keeps virtiofsd in the mount namespace it starts in:
    the pod's (``mount_ns``, joined through nsenter, which execs it in place),
    where a rootfs mounted after the VM booted appears through propagation.
    """
    with listening_socket(socket_path) as sock:
        argv = [
            *(nsenter_argv(mount_ns) if mount_ns else ()),
            binary, f"--fd={sock.fileno()}", "-o", f"source={shared_dir}", "-o", "cache=auto",
            "-o", "sandbox=chroot", "-o", f"xattrmap={XATTR_MAP}",
        ]  # fmt: skip
        with open(log_path, "ab") as log_file:
            child = await Child.spawn(
                "virtiofsd",
                argv,
                stderr=log_file.fileno(),
                pass_fds=(sock.fileno(),),
                cgroup=cgroup,
            )
    # A virtiofsd that dies at once (bad option or source) closes the socket:
    # QEMU's connect then fails, and the launch reports both logs.
    return child
