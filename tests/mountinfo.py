"""What the kernel's mount table says about a path, for assertions in tests."""

from __future__ import annotations

import subprocess
from pathlib import Path


def mounted(path: str | Path) -> bool:
    """Something is mounted on ``path`` itself (``mountpoint(1)``, which reads the mount table)."""
    return subprocess.run(["mountpoint", "-q", str(path)], check=False).returncode == 0
