"""Container rootfs on the host, under the sandbox's shared directory.

containerd hands the shim the rootfs as mounts (usually one overlay). They are
mounted at ``<shared>/<cid>/rootfs``, which virtiofsd exports to the guest,
where the same tree appears under ``GUEST_SHARED``. Mount points are recorded
in the persisted state before the mount, so a later ``delete`` can undo them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from shimv2.errdefs import Internal, InvalidArgument
from shimv2.vc.ids import container_id

log = logging.getLogger(__name__)

GUEST_SHARED = "/run/kata-containers/shared/containers"
ALLOWED_TYPES = frozenset({"overlay", "bind", "rbind", "tmpfs"})


@dataclass(frozen=True, slots=True)
class RootfsMount:
    """containerd's ``containerd.types.Mount``, as far as we use it."""

    type: str
    source: str
    options: tuple[str, ...] = ()


def is_mountpoint(path: str | Path) -> bool:
    """From the mount table: ``os.path.ismount`` misses same-filesystem bind mounts."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with spaces and such octal-escaped.
            point = line.split(" ", 5)[4].encode().decode("unicode_escape")
            if point == target:
                return True
    return False


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
            flag = "--rbind" if m.type == "rbind" or "rbind" in m.options else "--bind"
            await _run_mount(["mount", flag, m.source, str(target)])
            if "ro" in m.options:
                await _run_mount(["mount", "-o", "remount,bind,ro", str(target)])
        else:
            opts = ",".join(m.options)
            argv = ["mount", "-t", m.type, *(["-o", opts] if opts else []), m.source, str(target)]
            await _run_mount(argv)
    return target


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
    for root, dirs, _files in os.walk(top, topdown=True):
        for d in dirs:
            if is_mountpoint(os.path.join(root, d)):
                raise Internal(f"{os.path.join(root, d)} is still mounted")
    for root, dirs, files in os.walk(top, topdown=False):
        for f in files:
            os.unlink(os.path.join(root, f))
        for d in dirs:
            os.rmdir(os.path.join(root, d))
    os.rmdir(top)
