"""What the kernel's mount table says about a path, for assertions in tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def mounted(path: str | Path) -> bool:
    """Something is mounted on ``path`` itself (``mountpoint(1)``, which reads the mount table)."""
    return subprocess.run(["mountpoint", "-q", str(path)], check=False).returncode == 0


def mounts_in_every_namespace(prefix: str) -> list[str]:
    """Mount points at or below ``prefix`` in any mount namespace a live process is in.

    The shim keeps a pod's mounts in the pod's own namespace, so the test
    process's table alone would never show them leaking.
    """
    seen: set[str] = set()
    found: set[str] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for task in _tasks(pid):
            try:
                ns = os.readlink(f"/proc/{pid}/task/{task}/ns/mnt")
                if ns in seen:
                    continue
                root = os.readlink(f"/proc/{pid}/task/{task}/root")
                with open(f"/proc/{pid}/task/{task}/mountinfo") as f:
                    points = [line.split()[4] for line in f]
            except OSError:
                continue  # gone meanwhile
            if root == "/":
                seen.add(ns)
            else:
                # A chrooted task (virtiofsd) sees mount points relative to its root, and
                # none outside it: its namespace is read again from any task that is not.
                points = [root.rstrip("/") + p if p != "/" else root for p in points]
            found |= {p for p in points if p == prefix or p.startswith(prefix.rstrip("/") + "/")}
    return sorted(found)


def _tasks(pid: str) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
