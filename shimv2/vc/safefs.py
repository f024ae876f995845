"""File and mount operations confined beneath a directory the host owns.

Every path is resolved with openat2 ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``
relative to an open root, so a symlink or ``..`` planted anywhere on the way
fails the call instead of leading outside. Mounts and unmounts then act on the
resolved fd (``move_mount`` onto it, ``umount2`` of its ``/proc/self/fd``
link), never on a path string looked up again. Removal walks by fd, never
follows a link and never enters a mount (``RESOLVE_NO_XDEV``): a directory
that is still a mount point stops it with an error instead of losing what is
mounted there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from shimv2.errdefs import FailedPrecondition, InvalidArgument
from shimv2.vc import linux

CONFINED = linux.RESOLVE_BENEATH | linux.RESOLVE_NO_SYMLINKS | linux.RESOLVE_NO_MAGICLINKS
SAME_MOUNT = CONFINED | linux.RESOLVE_NO_XDEV
# Deeper than any tree kata-py makes; a deeper one is not ours to walk.
MAX_DEPTH = 16


@contextlib.contextmanager
def opened(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def open_root(path: str | Path) -> int:
    """An O_PATH fd of a directory the host made (its last component must not be a link)."""
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def relative(root: str | Path, path: str | Path) -> str:
    """``path`` as a path below ``root``; refused if it is not lexically beneath it."""
    rel = os.path.relpath(os.path.normpath(path), os.path.normpath(root))
    if rel == "." or rel == ".." or rel.startswith("../") or os.path.isabs(rel):
        raise InvalidArgument(f"{path} is not beneath {root}")
    return rel


def open_beneath(root_fd: int, rel: str, *, cross_mounts: bool = True, flags: int = 0) -> int:
    """An O_PATH fd of ``rel`` below ``root_fd``; never follows a link on the way."""
    resolve = CONFINED if cross_mounts else SAME_MOUNT
    return linux.openat2(root_fd, rel, os.O_PATH | os.O_NOFOLLOW | flags, resolve)


def makedirs(root_fd: int, rel: str, mode: int = 0o700) -> int:
    """Create ``rel`` below ``root_fd`` one component at a time; returns an fd of it.

    Each component is made with mkdirat and opened again without following a
    link or crossing a mount, so an existing link or mount point in the way is
    an error, not a detour.
    """
    fd = os.dup(root_fd)
    try:
        for name in Path(rel).parts:
            if name in ("..", "/", "."):
                raise InvalidArgument(f"bad path component in {rel!r}")
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, mode, dir_fd=fd)
            nxt = linux.openat2(fd, name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, SAME_MOUNT)
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def make_mount_point(dir_fd: int, name: str, *, directory: bool) -> int:
    """A directory or an empty file ``name`` in ``dir_fd`` to mount on; returns its fd.

    An existing one of the right kind is reused (a second rootfs mount stacks on
    the first); a link, or an entry of the other kind, is refused.
    """
    if "/" in name or name in ("", ".", ".."):
        raise InvalidArgument(f"bad mount point name {name!r}")
    if directory:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=dir_fd)
    else:
        with contextlib.suppress(FileExistsError):
            os.close(
                os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
                        | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
            )  # fmt: skip
    fd = linux.openat2(dir_fd, name, os.O_PATH | os.O_NOFOLLOW, CONFINED)
    kind = os.fstat(fd).st_mode
    if stat.S_ISLNK(kind) or stat.S_ISDIR(kind) != directory:
        os.close(fd)
        what = "a symbolic link" if stat.S_ISLNK(kind) else "another kind of file"
        raise InvalidArgument(f"mount point {name} exists as {what}")
    return fd


def is_mount_root(fd: int, parent_fd: int) -> bool:
    """``fd`` is the root of a mount stacked on ``parent_fd``'s mount."""
    return linux.mount_id(fd) != linux.mount_id(parent_fd)


def is_mountpoint(root_fd: int, rel: str) -> bool:
    """``rel`` (below ``root_fd``) has something mounted on it; False if it does not exist."""
    parent, name = os.path.split(rel)
    try:
        with (
            opened(open_beneath(root_fd, parent or ".")) as pfd,
            opened(open_beneath(pfd, name)) as fd,
        ):
            return is_mount_root(fd, pfd)
    except FileNotFoundError:
        return False


def unmount(root_fd: int, rel: str) -> bool:
    """Detach whatever is mounted on ``rel`` (its whole tree); False if nothing was.

    The path is resolved once, confined and without links, and the unmount
    acts on that very mount through its fd. The unmount is lazy: our own fd
    (and virtiofsd's, for a shared tree) keep a mount busy, and detaching
    makes it unreachable at once either way.
    """
    parent, name = os.path.split(rel)
    try:
        pfd = open_beneath(root_fd, parent or ".")
    except FileNotFoundError:
        return False
    with opened(pfd):
        unmounted = False
        for _ in range(MAX_DEPTH):  # mounts may be stacked on one point
            try:
                fd = open_beneath(pfd, name)
            except FileNotFoundError:
                return unmounted
            with opened(fd):
                if not is_mount_root(fd, pfd):
                    return unmounted
                linux.umount2(linux.fd_path(fd), linux.MNT_DETACH)
                unmounted = True
        raise FailedPrecondition(f"{rel}: more than {MAX_DEPTH} mounts stacked")


def remove_tree(root_fd: int, rel: str) -> None:
    """Remove ``rel`` below ``root_fd`` and everything in it, on its own mount only.

    Links are removed, never followed. Meeting a mount point (a directory or
    a file with something mounted on it) stops the removal with
    FailedPrecondition: what is mounted there is never touched.
    """
    parent, name = os.path.split(rel)
    try:
        pfd = open_beneath(root_fd, parent or ".")
    except FileNotFoundError:
        return
    with opened(pfd):
        _remove_entry(pfd, name, rel, 0)


def _remove_entry(dir_fd: int, name: str, shown: str, depth: int) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise FailedPrecondition(f"{shown} is still mounted") from None
            raise
        return
    if depth >= MAX_DEPTH:
        raise FailedPrecondition(f"{shown}: deeper than {MAX_DEPTH} levels")
    try:
        fd = linux.openat2(dir_fd, name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, SAME_MOUNT)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise FailedPrecondition(f"{shown} is still mounted") from None
        raise
    with opened(fd):
        for entry in os.listdir(fd):
            _remove_entry(fd, entry, f"{shown}/{entry}", depth + 1)
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise FailedPrecondition(f"{shown} is still mounted") from None
        raise
