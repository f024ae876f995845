"""The sandbox's cgroup on the host: QEMU and virtiofsd are charged to the pod.

As Kata's ``sandbox_cgroup_only``: the sandbox container's ``linux.cgroupsPath``
(CRI: the pause container's, under kubelet's pod cgroup; ``ctr run``:
``/<namespace>/<id>``) names one cgroup, and both processes join it before
they exec, so the guest's RAM is charged to the pod from its first page.
(``shimv2/guest/cgroups.py`` is the guest side: the containers' cgroups.)

- cgroup v2 (``<root>/cgroup.controllers`` exists): one directory; the
  memory, pids, cpu and io controllers are enabled on the way down where the
  parent offers them.
- cgroup v1: the same directory in each of the memory, pids, cpu, cpuacct and
  blkio hierarchies that are mounted (co-mounted ones counted once).

Only directories this module made are removed, children first, and only once
nothing runs in them. No limits are set here: a pod's limits are kubelet's, on
the pod cgroup above ours.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import trio

from shimv2.errdefs import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

CGROUP_ROOT = "/sys/fs/cgroup"
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "blkio")
V2_CONTROLLERS = ("memory", "pids", "cpu", "io")
# Where a sandbox goes when its spec names no cgroup (a kata-py choice, not
# Kata's): one directory per sandbox under a parent that is kata-py's alone.
KATA_PARENT = "/kata-py"
# runc's systemd driver puts a scope under system.slice when no slice is given.
DEFAULT_SLICE = "system.slice"
_SYSTEMD_PART = re.compile(r"[A-Za-z0-9_.@-]*")
_MAX_PATH = 4096
_MAX_NAME = 255


def default_path(sid: str) -> str:
    return f"{KATA_PARENT}/{sid}"


def sandbox_cgroup(cgroups_path: str, sid: str) -> str:
    """The cgroup directory path (``/a/b``) for a spec's ``cgroupsPath``.

    An empty value means kata-py's default. InvalidArgument for anything that
    could leave the hierarchy or confuse ``/proc/<pid>/cgroup``.
    """
    if not cgroups_path:
        return check_path(default_path(sid))
    if "\0" in cgroups_path:
        raise InvalidArgument("cgroupsPath contains NUL")
    if cgroups_path.startswith("/"):
        return check_path(cgroups_path)
    if cgroups_path.count(":") == 2:
        return check_path(systemd_to_path(cgroups_path))
    raise InvalidArgument(
        f"cgroupsPath {cgroups_path[:80]!r}: want an absolute path or slice:prefix:name"
    )


def check_path(path: str) -> str:
    """``path`` normalised (no empty components); never the root, ``.`` or ``..``."""
    if len(path) > _MAX_PATH or not path.startswith("/"):
        raise InvalidArgument(f"cgroup path {path[:80]!r}: want an absolute path")
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise InvalidArgument("cgroup path: the root cgroup is not a sandbox's")
    for part in parts:
        if part in (".", "..") or len(part) > _MAX_NAME:
            raise InvalidArgument(f"cgroup path {path[:80]!r}: bad component {part[:80]!r}")
        # A newline would forge lines in /proc/<pid>/cgroup; NUL cannot reach the kernel.
        if any(ord(ch) < 0x20 or ch == "\x7f" for ch in part):
            raise InvalidArgument(f"cgroup path {path[:80]!r}: control character")
    return "/" + "/".join(parts)


def systemd_to_path(cgroups_path: str) -> str:
    """``slice:prefix:name`` as the directory runc's systemd drivers use.

    We create directories directly (no systemd D-Bus call), at the path
    systemd would give the unit: the slice expanded to its ancestry
    (``kubepods-besteffort-pod1.slice`` →
    ``/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice``,
    ``-.slice`` → ``/``, empty → ``system.slice``), then the unit: ``name``
    itself if it ends in ``.slice``, else ``prefix-name.scope`` (``name.scope``
    without a prefix).
    """
    slice_, prefix, name = cgroups_path.split(":")
    for part in (slice_, prefix, name):
        if not _SYSTEMD_PART.fullmatch(part) or part in (".", ".."):
            raise InvalidArgument(f"cgroupsPath {cgroups_path[:80]!r}: bad systemd name")
    if not name:
        raise InvalidArgument(f"cgroupsPath {cgroups_path[:80]!r}: no unit name")
    if name.endswith(".slice"):
        unit = name
    else:
        unit = f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
    return f"{expand_slice(slice_ or DEFAULT_SLICE)}/{unit}"


def expand_slice(slice_: str) -> str:
    """A slice's directory: each dash-separated prefix is a parent slice."""
    stem = slice_.removesuffix(".slice")
    if stem == slice_ or not stem:
        raise InvalidArgument(f"systemd slice {slice_[:80]!r}: want NAME.slice")
    if stem == "-":
        return ""  # the root slice
    words = stem.split("-")
    if "" in words:
        raise InvalidArgument(f"systemd slice {slice_[:80]!r}: empty component")
    return "".join(f"/{'-'.join(words[: i + 1])}.slice" for i in range(len(words)))


class HostCgroups:
    """The host's cgroup hierarchies under ``root`` (a directory of fakes in tests)."""

    def __init__(self, root: str | Path = CGROUP_ROOT) -> None:
        self.root = Path(root)

    @property
    def unified(self) -> bool:
        return (self.root / "cgroup.controllers").is_file()

    def hierarchies(self) -> list[Path]:
        """The v2 root, or the mounted v1 hierarchies we use (each once)."""
        if self.unified:
            return [self.root]
        out: list[Path] = []
        for name in V1_CONTROLLERS:
            real = Path(os.path.realpath(self.root / name))
            # cpu and cpuacct are often one hierarchy, reached through symlinks.
            if (real / "cgroup.procs").is_file() and real not in out:
                out.append(real)
        return out

    def dirs(self, path: str) -> list[Path]:
        rel = check_path(path).lstrip("/")
        return [h / rel for h in self.hierarchies()]

    def procs_files(self, path: str) -> tuple[str, ...]:
        """The ``cgroup.procs`` files a process writes to join ``path`` everywhere."""
        return tuple(str(d / "cgroup.procs") for d in self.dirs(path))

    def create(self, path: str) -> list[str]:
        """Make ``path`` in every hierarchy; the directories made, parents first.

        An existing directory is joined, not taken over: it is not returned, so
        it is never removed. ``/kata-py`` is the exception: kata-py's own parent,
        removed once empty whoever made it, so sandboxes side by side leave
        nothing. On failure what this call made is removed again.
        """
        hierarchies = self.hierarchies()
        if not hierarchies:
            raise FailedPrecondition(f"no cgroup hierarchy under {self.root}")
        parts = check_path(path).strip("/").split("/")
        made: list[str] = []
        try:
            for h in hierarchies:
                for attempt in range(5):
                    try:
                        self._make_chain(h, parts, made)
                        break
                    except FileNotFoundError:
                        # Another sandbox removed an empty parent under us: again.
                        if attempt == 4:
                            raise
        except BaseException as exc:
            self.remove_now(list(dict.fromkeys(made)))
            if isinstance(exc, OSError):
                raise FailedPrecondition(f"cannot create cgroup {path}: {exc}") from exc
            raise
        return list(dict.fromkeys(made))

    def _make_chain(self, hierarchy: Path, parts: list[str], made: list[str]) -> None:
        d = hierarchy
        for i, part in enumerate(parts):
            if self.unified:
                self._enable_controllers(d)
            d = d / part
            try:
                d.mkdir(mode=0o755)
                made.append(str(d))
            except FileExistsError:
                if d.is_symlink() or not d.is_dir():  # in cgroupfs, every directory is a cgroup
                    raise InvalidArgument(f"cgroup {d} exists and is not a cgroup") from None
                if i == 0 and f"/{part}" == KATA_PARENT and len(parts) > 1:
                    made.append(str(d))

    def _enable_controllers(self, parent: Path) -> None:
        """Offer our controllers to ``parent``'s children (v2), where ``parent`` has them."""
        try:
            offered = (parent / "cgroup.controllers").read_text().split()
            enabled = (parent / "cgroup.subtree_control").read_text().split()
        except OSError:
            return
        wanted = [f"+{c}" for c in V2_CONTROLLERS if c in offered and c not in enabled]
        if not wanted:
            return
        try:
            with open(parent / "cgroup.subtree_control", "w") as f:
                f.write(" ".join(wanted))
        except OSError as exc:
            # A parent with processes of its own cannot delegate (EBUSY): the sandbox
            # still joins its cgroup, without these controllers' accounting.
            log.warning("cgroup %s: cannot enable %s: %s", parent, " ".join(wanted), exc)

    def _owned(self, d: str) -> bool:
        """A directory ``create`` could have made: below a hierarchy's root, no ``..``."""
        path = Path(d)
        return ".." not in path.parts and any(
            path != h and path.is_relative_to(h) for h in self.hierarchies()
        )

    def _rmdir(self, d: str) -> bool:
        """Remove ``d`` if it is empty; False while processes still run in it."""
        if not self._owned(d):
            log.error("cgroup %s: not under %s; not removed", d, self.root)
            return True
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                log.warning("cgroup %s: %s", d, exc)
                return False  # kept in the record: delete fails with a coded error
            # Another sandbox's cgroup below: not ours to drop, and not a leak of ours.
            return _has_children(d)
        return True

    def remove_now(self, dirs: Sequence[str]) -> list[str]:
        """rmdir ``dirs`` (parents first, as ``create`` returns them), children first.

        Returns those still busy, parents first; a busy directory keeps its
        ancestors, to be tried again once it is gone.
        """
        left: list[str] = []
        for d in reversed(dirs):
            if any(Path(x).is_relative_to(d) for x in left) or not self._rmdir(d):
                left.append(d)
        return left[::-1]

    async def remove(self, dirs: Sequence[str], *, timeout: float = 5.0) -> list[str]:
        """As ``remove_now``, waiting up to ``timeout`` for exiting processes to leave."""
        left = self.remove_now(dirs)
        with trio.move_on_after(timeout):
            while left:
                await trio.sleep(0.02)
                left = self.remove_now(left)
        return left


def _has_children(d: str) -> bool:
    try:
        with os.scandir(d) as entries:
            return any(e.is_dir(follow_symlinks=False) for e in entries)
    except OSError:
        return False
