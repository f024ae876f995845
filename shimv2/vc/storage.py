"""Container storage on the host, in a tree the guest can read but never change.

Each sandbox directory holds two views of one tree:

- ``mounts/``: where the host mounts. It is a shared mount of its own, never
  exported, so nothing the guest does can create, rename or link anything in it.
- ``shared/``: what virtiofsd exports. A read-only, recursive, slave copy of
  ``mounts/`` (Kata's ``mounts/`` → ``shared/`` split): every mount the host
  makes later under ``mounts/`` appears here too, with its own flags (a rootfs
  stays writable), while the directories around the mounts stay read-only.

containerd's rootfs mounts go on ``mounts/<cid>/rootfs``; the host paths that
the spec's bind mounts name (``ctr run --mount``, CRI's hosts and resolv.conf,
volumes) on ``mounts/<cid>/mounts/<index>``, and the guest's spec names their
place under ``GUEST_SHARED`` instead. Binds are built detached (``open_tree``),
given their propagation and read-only flags there, and only then attached, so
the guest never sees one writable that should not be. Every path is resolved
with ``shimv2.vc.safefs``: no link is ever followed beneath the sandbox.
Mount points are recorded in the persisted state before the mount, so a later
``delete`` can undo them. These calls block: run them in a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from shimv2.errdefs import Internal, InvalidArgument
from shimv2.vc import linux, safefs
from shimv2.vc.ids import container_id

log = logging.getLogger(__name__)

# Where host paths are opened: the host's namespace, when the tree is in the
# pod's own (``shimv2.vc.mountns.MountNamespace.host``).
HostView = Callable[[], contextlib.AbstractContextManager[object]]

GUEST_SHARED = "/run/kata-containers/shared/containers"
MOUNTS = "mounts"
SHARED = "shared"
ALLOWED_TYPES = frozenset({"overlay", "bind", "rbind", "tmpfs"})
# Bind sources inside these name the guest's own trees (it has its own /proc,
# /sys and /dev), so they are left as they are, as Kata does for system mounts.
GUEST_OWN_TREES = ("/proc", "/sys", "/dev")
# Mount options that are flags for mount(2), not filesystem data.
FS_FLAGS = {
    "ro": linux.MS_RDONLY, "rw": 0, "nosuid": linux.MS_NOSUID, "suid": 0,
    "nodev": linux.MS_NODEV, "dev": 0, "noexec": linux.MS_NOEXEC, "exec": 0,
    "sync": linux.MS_SYNCHRONOUS, "async": 0, "noatime": linux.MS_NOATIME,
    "nodiratime": linux.MS_NODIRATIME, "relatime": linux.MS_RELATIME,
    "strictatime": linux.MS_STRICTATIME, "defaults": 0,
}  # fmt: skip
# Bind options that become mount attributes: of the top mount, or (r…) of the tree.
BIND_ATTRS = {
    "ro": linux.MOUNT_ATTR_RDONLY, "nosuid": linux.MOUNT_ATTR_NOSUID,
    "nodev": linux.MOUNT_ATTR_NODEV, "noexec": linux.MOUNT_ATTR_NOEXEC,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class RootfsMount:
    """containerd's ``containerd.types.Mount``, as far as we use it."""

    type: str
    source: str
    options: tuple[str, ...] = ()


def host_rootfs(sandbox_dir: str | Path, cid: str) -> Path:
    return Path(sandbox_dir) / MOUNTS / container_id(cid) / "rootfs"


def guest_rootfs(cid: str) -> str:
    return f"{GUEST_SHARED}/{container_id(cid)}/rootfs"


def guest_mount_source(cid: str, index: int) -> str:
    return f"{GUEST_SHARED}/{container_id(cid)}/mounts/{index}"


class SharedBind(NamedTuple):
    """A spec bind mount as the guest must name it."""

    source: str  # under ``GUEST_SHARED``
    # A plain ``ro`` over a tree with submounts: the host made the top mount
    # read-only and left the submounts writable, but virtio-fs shows the guest
    # one mount, where ``ro`` would cover them all. The guest must not repeat it.
    ro_on_host_only: bool = False


def _mounts_below(path: Path) -> bool:
    """Anything mounted beneath ``path``."""
    prefix = str(path).rstrip("/") + "/"
    for char, code in (("\\", "\\134"), (" ", "\\040"), ("\t", "\\011"), ("\n", "\\012")):
        prefix = prefix.replace(char, code)  # as mountinfo writes it
    wanted = os.fsencode(prefix)
    with open("/proc/thread-self/mountinfo", "rb") as f:  # this thread's namespace
        return any(line.split(b" ", 5)[4].startswith(wanted) for line in f)


# -- the two views ------------------------------------------------------------------


def prepare_shared(sandbox_dir: str | Path) -> Path:
    """Make ``mounts/`` and its read-only slave view ``shared/``; returns ``shared/``."""
    with safefs.opened(safefs.open_root(sandbox_dir)) as root:
        if not safefs.is_mountpoint(root, MOUNTS):
            with safefs.opened(safefs.makedirs(root, MOUNTS)) as fd:
                linux.mount(linux.fd_path(fd), linux.fd_path(fd), None, linux.MS_BIND)
            # A peer group of its own: private first, so that it leaves the
            # group of its parent (on hosts where /run is shared), then shared.
            with safefs.opened(safefs.open_beneath(root, MOUNTS)) as fd:
                linux.mount(None, linux.fd_path(fd), None, linux.MS_PRIVATE)
                linux.mount(None, linux.fd_path(fd), None, linux.MS_SHARED)
        if not safefs.is_mountpoint(root, SHARED):
            with safefs.opened(safefs.open_beneath(root, MOUNTS)) as fd:
                view = linux.open_tree_clone(fd, "", recursive=True)
            with safefs.opened(view), safefs.opened(safefs.makedirs(root, SHARED)) as target:
                linux.mount_setattr(
                    view, recursive=True, attr_set=linux.MOUNT_ATTR_RDONLY,
                    propagation=linux.MS_SLAVE,
                )  # fmt: skip
                linux.move_mount(view, target)
    return Path(sandbox_dir) / SHARED


def release_shared(sandbox_dir: str | Path) -> None:
    """Detach ``shared/`` and then ``mounts/`` (with anything still under them)."""
    with (
        contextlib.suppress(FileNotFoundError),
        safefs.opened(safefs.open_root(sandbox_dir)) as root,
    ):
        for name in (SHARED, MOUNTS):
            if safefs.unmount(root, name):
                log.debug("unmounted %s/%s", sandbox_dir, name)


def _open_mounts(sandbox_dir: str | Path) -> int:
    """An fd of ``mounts/``, from which the host's own tree is walked without crossing mounts."""
    with safefs.opened(safefs.open_root(sandbox_dir)) as root:
        return safefs.open_beneath(root, MOUNTS, flags=os.O_DIRECTORY)


# -- rootfs ---------------------------------------------------------------------------


def _check(mount: RootfsMount) -> None:
    if mount.type not in ALLOWED_TYPES:
        raise InvalidArgument(f"rootfs mount type {mount.type!r} not supported")
    for opt in mount.options:
        if "," in opt or "\0" in opt or "\n" in opt:
            raise InvalidArgument(f"bad rootfs mount option {opt!r}")


def _fs_flags_and_data(options: Sequence[str]) -> tuple[int, str]:
    flags, data = 0, []
    for opt in options:
        if opt in FS_FLAGS:
            flags |= FS_FLAGS[opt]
        else:
            data.append(opt)
    return flags, ",".join(data)


def _bundle_root(bundle: str | Path, root_path: str) -> int:
    """An fd of the spec's ``root.path``, which must lie inside the bundle."""
    if not root_path or "\0" in root_path:
        raise InvalidArgument(f"bad root.path {root_path!r}")
    try:
        rel = safefs.relative(bundle, root_path) if os.path.isabs(root_path) else root_path
        with safefs.opened(safefs.open_root(bundle)) as bfd:
            return safefs.open_beneath(bfd, rel, flags=os.O_DIRECTORY)
    except InvalidArgument:
        raise InvalidArgument(f"root.path {root_path!r} is not inside the bundle") from None
    except OSError as exc:
        raise InvalidArgument(f"root.path {root_path!r} is not a directory inside the bundle "
                              f"({exc.strerror})") from None  # fmt: skip


def mount_rootfs(
    sandbox_dir: str | Path,
    cid: str,
    mounts: Sequence[RootfsMount],
    bundle: str | Path,
    root_path: str,
    record: list[str],
    host: HostView = contextlib.nullcontext,
) -> Path:
    """Mount the rootfs on ``mounts/<cid>/rootfs``; ``record`` gets each mount point first.

    With no mounts (``ctr run --rootfs``, or a prepared bundle) the spec's
    ``root.path`` in the bundle is bound instead.
    """
    target = host_rootfs(sandbox_dir, cid)
    for m in mounts:
        _check(m)
    bundle_tree = None  # the bundle's root.path, cloned (detached) where it was opened
    if not mounts:
        with host(), safefs.opened(_bundle_root(bundle, root_path)) as bundle_root:
            bundle_tree = linux.open_tree_clone(bundle_root, "", recursive=True)
    try:
        with contextlib.ExitStack() as stack:
            mounts_fd = stack.enter_context(safefs.opened(_open_mounts(sandbox_dir)))
            cdir = stack.enter_context(safefs.opened(safefs.makedirs(mounts_fd, container_id(cid))))
            if bundle_tree is not None:
                record.append(str(target))
                tree, bundle_tree = bundle_tree, None  # _attach owns it now
                _attach(tree, cdir, "rootfs", ["rbind"])
            for m in mounts:
                record.append(str(target))
                if m.type in ("bind", "rbind"):
                    recursive = m.type == "rbind" or "rbind" in m.options
                    with host():
                        tree = _clone(m.source, recursive)
                    _attach(tree, cdir, "rootfs", list(m.options))
                    continue
                flags, data = _fs_flags_and_data(m.options)
                with safefs.opened(safefs.make_mount_point(cdir, "rootfs", directory=True)) as fd:
                    try:
                        linux.mount(m.source, linux.fd_path(fd), m.type, flags, data)
                    except OSError as exc:
                        raise Internal(f"mount {m.type} on {target}: {exc.strerror}") from None
    finally:
        if bundle_tree is not None:
            os.close(bundle_tree)
    return target


# -- binds ------------------------------------------------------------------------


def _clone(source: str, recursive: bool) -> int:
    """A detached copy of ``source``, the host path the orchestrator named."""
    try:
        return linux.open_tree_clone(linux.AT_FDCWD, source, recursive=recursive)
    except OSError as exc:
        raise InvalidArgument(f"bind source {source}: {exc.strerror}") from None


def _attach(tree: int, dir_fd: int, name: str, options: Sequence[str]) -> None:
    """Give the detached ``tree`` its propagation and flags, then attach it at ``name``.

    Propagation is rprivate unless the spec says (r)slave; rshared is taken as
    rslave, since nothing the guest mounts can come back through virtio-fs.
    Either way the copy is never a peer of its source, so unmounting it can
    never unmount the host's own mounts. ``ro``, ``nosuid``, ``nodev`` and
    ``noexec`` cover the top mount (as runc, and critest, define them), their
    ``r``-forms (``rro`` is Kubernetes' recursive read-only) every mount of
    the tree; the kernel applies them, and before the guest can see the tree.
    """
    with safefs.opened(tree):
        slave = any(o in ("slave", "rslave", "shared", "rshared") for o in options)
        linux.mount_setattr(
            tree, recursive=True, propagation=linux.MS_SLAVE if slave else linux.MS_PRIVATE
        )
        top = sum(attr for opt, attr in BIND_ATTRS.items() if opt in options)
        tree_attrs = sum(attr for opt, attr in BIND_ATTRS.items() if "r" + opt in options)
        if tree_attrs:
            linux.mount_setattr(tree, recursive=True, attr_set=tree_attrs)
        if top:
            linux.mount_setattr(tree, recursive=False, attr_set=top)
        directory = stat.S_ISDIR(os.fstat(tree).st_mode)
        with safefs.opened(safefs.make_mount_point(dir_fd, name, directory=directory)) as fd:
            linux.move_mount(tree, fd)


def _host_bind_source(mount: Mapping[str, Any], index: int) -> str | None:
    """The host path a spec mount binds into the container, or None if it binds none."""
    options = mount.get("options") or []
    if mount.get("type") != "bind" and "bind" not in options and "rbind" not in options:
        return None
    source = mount.get("source")
    if not isinstance(source, str) or not os.path.isabs(source) or "\0" in source:
        raise InvalidArgument(f"mount {index}: bind source {source!r} is not an absolute path")
    path = os.path.normpath(source)
    if any(path == tree or path.startswith(tree + "/") for tree in GUEST_OWN_TREES):
        return None
    if not os.path.exists(path):
        raise InvalidArgument(f"mount {index}: bind source {source!r} does not exist")
    return path


def share_bind_mounts(
    sandbox_dir: str | Path,
    cid: str,
    mounts: Sequence[Mapping[str, Any]],
    record: list[str],
    host: HostView = contextlib.nullcontext,
) -> dict[int, SharedBind]:
    """Bind the host paths of the spec's bind mounts into ``mounts/<cid>/mounts``.

    Returns, by index in ``mounts``, how the guest's spec must name each one
    instead. Every source is checked before anything is mounted; ``record``
    gets each mount point before its mount.
    """
    with host():
        wanted = [(i, _host_bind_source(m, i), m) for i, m in enumerate(mounts)]
    wanted = [(i, source, m) for i, source, m in wanted if source is not None]
    guest: dict[int, SharedBind] = {}
    if not wanted:
        return guest
    rel = f"{container_id(cid)}/mounts"
    with contextlib.ExitStack() as stack:
        mounts_fd = stack.enter_context(safefs.opened(_open_mounts(sandbox_dir)))
        top = stack.enter_context(safefs.opened(safefs.makedirs(mounts_fd, rel)))
        for index, source, mount in wanted:
            assert source is not None
            options = [str(o) for o in mount.get("options") or []]
            with host():
                tree = _clone(source, "rbind" in options)
            point = Path(sandbox_dir) / MOUNTS / rel / str(index)
            record.append(str(point))
            _attach(tree, top, str(index), options)
            host_only = "ro" in options and "rro" not in options and _mounts_below(point)
            guest[index] = SharedBind(guest_mount_source(cid, index), host_only)
    return guest


# -- teardown ------------------------------------------------------------------------


def unmount_all(root: str | Path, points: Sequence[str]) -> list[str]:
    """Unmount recorded points beneath ``root``, newest first; returns what is left.

    A point outside ``root`` is never touched (and is reported as left).
    """
    failed: list[str] = []
    try:
        root_fd = safefs.open_root(root)
    except FileNotFoundError:
        return []
    with safefs.opened(root_fd):
        for point in reversed(points):
            try:
                safefs.unmount(root_fd, safefs.relative(root, point))
            except (OSError, InvalidArgument) as exc:
                log.error("umount %s: %s", point, exc)
                failed.append(point)
    return failed


def remove_container_dir(sandbox_dir: str | Path, cid: str) -> None:
    """Remove ``mounts/<cid>`` once nothing is mounted in it (never crosses a mount)."""
    try:
        mounts_fd = _open_mounts(sandbox_dir)
    except FileNotFoundError:
        return
    with safefs.opened(mounts_fd):
        safefs.remove_tree(mounts_fd, container_id(cid))
