"""Container storage on the host, under the sandbox's shared directory.

containerd hands the shim the rootfs as mounts (usually one overlay). They are
mounted at ``<shared>/<cid>/rootfs``, which virtiofsd exports to the guest,
where the same tree appears under ``GUEST_SHARED``. The host paths that the
spec's bind mounts name (``ctr run --mount``, CRI's hosts and resolv.conf,
volumes) are bound at ``<shared>/<cid>/mounts/<index>`` the same way, and the
guest's spec names those instead. Mount points are recorded in the persisted
state before the mount, so a later ``delete`` can undo them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from shimv2.errdefs import Internal, InvalidArgument
from shimv2.vc.ids import container_id

log = logging.getLogger(__name__)

GUEST_SHARED = "/run/kata-containers/shared/containers"
ALLOWED_TYPES = frozenset({"overlay", "bind", "rbind", "tmpfs"})
# Bind sources inside these name the guest's own trees (it has its own /proc,
# /sys and /dev), so they are left as they are, as Kata does for system mounts.
GUEST_OWN_TREES = ("/proc", "/sys", "/dev")


@dataclass(frozen=True, slots=True)
class RootfsMount:
    """containerd's ``containerd.types.Mount``, as far as we use it."""

    type: str
    source: str
    options: tuple[str, ...] = ()


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        # Field 5 is the mount point, with spaces and such octal-escaped.
        return [line.split(" ", 5)[4].encode().decode("unicode_escape") for line in f]


def is_mountpoint(path: str | Path) -> bool:
    """From the mount table: ``os.path.ismount`` misses same-filesystem bind mounts."""
    return os.path.realpath(path) in _mount_points()


def host_rootfs(shared_dir: str | Path, cid: str) -> Path:
    return Path(shared_dir) / container_id(cid) / "rootfs"


def guest_rootfs(cid: str) -> str:
    return f"{GUEST_SHARED}/{container_id(cid)}/rootfs"


def _check(mount: RootfsMount) -> None:
    if mount.type not in ALLOWED_TYPES:
        raise InvalidArgument(f"rootfs mount type {mount.type!r} not supported")
    for opt in mount.options:
        if "," in opt or "\0" in opt or "\n" in opt:
            raise InvalidArgument(f"bad rootfs mount option {opt!r}")


async def _run_mount(argv: Sequence[str]) -> None:
    with trio.fail_after(30):
        proc = await trio.run_process(
            list(argv), capture_stdout=True, capture_stderr=True, check=False
        )
    if proc.returncode != 0:
        raise Internal(f"{' '.join(argv)}: {proc.stderr.decode(errors='replace').strip()}")


async def _bind(source: str, target: Path, options: Sequence[str], recursive: bool) -> None:
    """Bind ``source``; read-only as the OCI options say, like runc does on a host.

    A bind mount becomes read-only by a remount. ``ro`` is the top mount only
    (the mounts below an rbind stay writable: critest checks it); ``rro``
    (Kubernetes' recursive read-only) is every mount of the tree.
    """
    await _run_mount(["mount", "--rbind" if recursive else "--bind", source, str(target)])
    top = str(target)
    if "rro" in options:
        points = [p for p in _mount_points() if p == top or p.startswith(top + "/")]
    elif "ro" in options:
        points = [top]
    else:
        return
    for point in points:
        await _run_mount(["mount", "-o", "remount,bind,ro", point])


async def mount_rootfs(
    shared_dir: str | Path,
    cid: str,
    mounts: Sequence[RootfsMount],
    bundle_rootfs: str | Path | None,
    record: list[str],
) -> Path:
    """Mount the rootfs under the shared dir; ``record`` gets each mount point first.

    With no mounts (``ctr run --rootfs``, or a prepared bundle) the bundle's
    ``rootfs`` directory is bind-mounted instead.
    """
    target = host_rootfs(shared_dir, cid)
    for m in mounts:
        _check(m)
    if not mounts:
        if bundle_rootfs is None or not os.path.isdir(bundle_rootfs):
            raise InvalidArgument(f"container {cid}: no rootfs mounts and no bundle rootfs")
        mounts = [RootfsMount("bind", str(bundle_rootfs), ("rbind",))]
    target.mkdir(parents=True, exist_ok=True)
    for m in mounts:
        record.append(str(target))
        if m.type in ("bind", "rbind"):
            await _bind(m.source, target, m.options, m.type == "rbind" or "rbind" in m.options)
        else:
            opts = ",".join(m.options)
            argv = ["mount", "-t", m.type, *(["-o", opts] if opts else []), m.source, str(target)]
            await _run_mount(argv)
    return target


def guest_mount_source(cid: str, index: int) -> str:
    return f"{GUEST_SHARED}/{container_id(cid)}/mounts/{index}"


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


async def share_bind_mounts(
    shared_dir: str | Path,
    cid: str,
    mounts: Sequence[Mapping[str, Any]],
    record: list[str],
) -> dict[int, str]:
    """Bind the host paths of the spec's bind mounts under the shared dir.

    Returns, by index in ``mounts``, the source the guest's spec must name
    instead. Every source is checked before anything is mounted; ``record``
    gets each mount point before its mount.
    """
    top = Path(shared_dir) / container_id(cid) / "mounts"
    wanted = [(i, _host_bind_source(m, i), m) for i, m in enumerate(mounts)]
    guest: dict[int, str] = {}
    for index, source, mount in wanted:
        if source is None:
            continue
        options = [str(o) for o in mount.get("options") or []]
        target = top / str(index)
        top.mkdir(parents=True, exist_ok=True)
        if os.path.isdir(source):
            target.mkdir(exist_ok=True)
        else:
            target.touch()  # a file (hosts, resolv.conf) is bound onto a file
        record.append(str(target))
        await _bind(source, target, options, "rbind" in options)
        guest[index] = guest_mount_source(cid, index)
    return guest


async def unmount_all(points: Sequence[str]) -> list[str]:
    """Unmount recorded points, newest first; returns what could not be undone."""
    failed: list[str] = []
    for point in reversed(points):
        if not is_mountpoint(point):
            continue
        proc = await trio.run_process(
            ["umount", "-R", point], capture_stdout=True, capture_stderr=True, check=False
        )
        if proc.returncode != 0:
            # Busy: detach it so nothing stays reachable, and say so.
            lazy = await trio.run_process(
                ["umount", "-R", "-l", point], capture_stderr=True, check=False
            )
            if lazy.returncode != 0:
                failed.append(point)
                log.error("umount %s: %s", point, proc.stderr.decode(errors="replace").strip())
    return failed


def remove_container_dir(shared_dir: str | Path, cid: str) -> None:
    """Remove ``<shared>/<cid>`` once nothing is mounted in it (never crosses mounts)."""
    top = Path(shared_dir) / container_id(cid)
    if not top.exists():
        return
    for root, dirs, files in os.walk(top, topdown=True):
        for name in (*dirs, *files):
            if is_mountpoint(os.path.join(root, name)):
                raise Internal(f"{os.path.join(root, name)} is still mounted")
    for root, dirs, files in os.walk(top, topdown=False):
        for f in files:
            os.unlink(os.path.join(root, f))
        for d in dirs:
            os.rmdir(os.path.join(root, d))
    os.rmdir(top)
