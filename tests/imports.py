"""What a fresh interpreter imports to run a piece of code: for tests that keep
start paths lean (which modules, never how long)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_MARK = "IMPORTED:"


def imported_by(code: str, *args: str) -> set[str]:
    """The modules ``code`` (run in a new interpreter, ``args`` as ``sys.argv[1:]``) added
    to those the interpreter starts with (site, .pth files)."""
    script = (
        "import sys\n"
        "_start = set(sys.modules)\n"
        f"{code}\n"
        f"print({_MARK!r} + ' '.join(sorted(set(sys.modules) - _start)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    last = out.stdout.splitlines()[-1]
    assert last.startswith(_MARK), out.stdout
    return set(last.removeprefix(_MARK).split())


def loaded(modules: set[str], *names: str) -> list[str]:
    """Which of ``names`` (packages count with their submodules) are in ``modules``."""
    return sorted(m for m in modules for name in names if m == name or m.startswith(f"{name}."))
