"""Leak checks for tests that start VMs: no QEMU, virtiofsd or run dir left behind."""

from __future__ import annotations

import os
from pathlib import Path


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
    """QEMU or virtiofsd processes whose command line mentions ``marker``."""
    return [
        f"{pid}: {cmd[:200]}"
        for pid, cmd in _cmdlines().items()
        if marker in cmd and ("qemu-system" in cmd or "virtiofsd" in cmd)
    ]
