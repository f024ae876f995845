"""Leak checks for tests that start VMs: no QEMU, virtiofsd, run dir or cgroup left behind."""

from __future__ import annotations

import os
from pathlib import Path

from shimv2.vc.cgroups import HostCgroups


def _cmdlines() -> dict[int, str]:
    out: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            out[int(entry)] = raw.replace(b"\0", b" ").decode(errors="replace")
    return out


def vm_processes(marker: str) -> list[str]:
    """QEMU, virtiofsd or vsock backend processes whose command line mentions ``marker``."""
    helpers = ("qemu-system", "virtiofsd", "vhost-device-vsock")
    return [
        f"{pid}: {cmd[:200]}"
        for pid, cmd in _cmdlines().items()
        # By the program run, not by any word: a shell script that names them is none.
        if marker in cmd and os.path.basename(cmd.split(" ", 1)[0]).startswith(helpers)
    ]


CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_HIERARCHIES = ("memory", "pids", "cpu", "cpuacct", "blkio")  # shimv2.vc.cgroups
# Where containerd's pods get their host cgroups: ``/<namespace>/<id>`` for ctr
# (``default``) and CRI (``k8s.io``). Sandboxes made in-process are checked with
# RecordingCgroups instead: other VM tests may be using kata-py's ``/kata-py``.
POD_CGROUP_PARENTS = ("/default", "/k8s.io")


def cgroup_hierarchies(root: Path = CGROUP_ROOT) -> list[Path]:
    if (root / "cgroup.controllers").exists():
        return [root]
    return [root / h for h in CGROUP_HIERARCHIES if (root / h / "cgroup.procs").exists()]


def cgroup_dirs(parents: tuple[str, ...] = POD_CGROUP_PARENTS) -> set[str]:
    """Cgroup directories below ``parents`` (the pods'), as ``hierarchy:/path``.

    Compare a snapshot taken before a test with one after: nothing new may stay.
    The parents themselves are containerd's namespaces, not any pod's: one stays
    when the pod that made it leaves while another pod still lives in it.
    """
    out: set[str] = set()
    for h in cgroup_hierarchies():
        for parent in parents:
            top = h / parent.strip("/")
            for dirpath, _, _ in os.walk(top):
                if Path(dirpath) != top:
                    out.add(f"{h.name}:/{Path(dirpath).relative_to(h)}")
    return out


def process_cgroups(pid: int) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` as {controller: path}; v2's line is under ""."""
    out: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            out[c] = path
    return out


class RecordingCgroups(HostCgroups):
    """The host's cgroups, remembering each directory made: which are still there."""

    def __init__(self, root: Path = CGROUP_ROOT) -> None:
        super().__init__(root)
        self.made: list[str] = []

    def create(self, path: str) -> list[str]:
        made = super().create(path)
        self.made += made
        return made

    def left(self) -> list[str]:
        """Made and still there; a parent holding someone else's cgroup is not counted."""
        return [
            d for d in dict.fromkeys(self.made)
            if os.path.isdir(d) and not any(e.is_dir() for e in os.scandir(d))
        ]  # fmt: skip
