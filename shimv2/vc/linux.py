"""Thin wrappers of the Linux calls that Python's ``os`` lacks: openat2 and the mount API.

No policy lives here: ``shimv2.vc.safefs`` decides what to resolve and how.
Syscall numbers are the same on every architecture from 424 on (open_tree,
move_mount, openat2, mount_setattr), so no table per architecture is needed.
"""

from __future__ import annotations

import ctypes
import functools
import os

# openat2(2) resolve flags
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40

MOUNT_ATTR_RDONLY = 0x01
MOUNT_ATTR_NOSUID = 0x02
MOUNT_ATTR_NODEV = 0x04
MOUNT_ATTR_NOEXEC = 0x08

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20

MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_OPENAT2 = 437
_SYS_MOUNT_SETATTR = 442


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _check(result: int, what: str, path: str | None = None) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return result


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2); the returned fd is close-on-exec."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    libc = _libc()
    fd = libc.syscall(
        _SYS_OPENAT2, dirfd, os.fsencode(path), ctypes.byref(how), ctypes.c_size_t(24)
    )
    return _check(fd, "openat2", path)


def open_tree_clone(dirfd: int, path: str, *, recursive: bool) -> int:
    """A detached copy of the mount (tree) at ``path``: visible nowhere until moved."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    if not path:
        flags |= AT_EMPTY_PATH
    fd = _libc().syscall(_SYS_OPEN_TREE, dirfd, os.fsencode(path), ctypes.c_uint(flags))
    return _check(fd, "open_tree", path)


def mount_setattr(
    fd: int, *, recursive: bool, attr_set: int = 0, attr_clr: int = 0, propagation: int = 0
) -> None:
    """Set mount attributes and propagation of the mount ``fd`` refers to (or its tree)."""
    attr = _MountAttr(attr_set, attr_clr, propagation, 0)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    result = _libc().syscall(
        _SYS_MOUNT_SETATTR, fd, b"", ctypes.c_uint(flags), ctypes.byref(attr), ctypes.c_size_t(32)
    )
    _check(result, "mount_setattr")


def move_mount(from_fd: int, to_fd: int) -> None:
    """Attach the (detached) mount ``from_fd`` on the directory or file ``to_fd``."""
    flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH
    result = _libc().syscall(_SYS_MOVE_MOUNT, from_fd, b"", to_fd, b"", ctypes.c_uint(flags))
    _check(result, "move_mount")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    result = _libc().mount(
        os.fsencode(source) if source is not None else None,
        os.fsencode(target),
        fstype.encode() if fstype is not None else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    _check(result, "mount", target)


def umount2(target: str, flags: int) -> None:
    _check(_libc().umount2(os.fsencode(target), ctypes.c_int(flags)), "umount2", target)


def fd_path(fd: int) -> str:
    """The magic link that makes a path-taking call act on exactly ``fd``'s object."""
    return f"/proc/self/fd/{fd}"


def mount_id(fd: int) -> int:
    """The id of the mount ``fd`` lies on (``mnt_id`` in fdinfo, as statx's STATX_MNT_ID)."""
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    raise OSError(f"fd {fd}: no mnt_id in fdinfo")
