from __future__ import annotations

import subprocess
import sys

SHIM = f"{sys.executable.rsplit('/', 1)[0]}/containerd-shim-kata-py-v2"


def test_version() -> None:
    out = subprocess.run([SHIM, "-v"], capture_output=True, text=True)
    assert (out.returncode, out.stdout.strip()) == (0, "containerd-shim-kata-py-v2 0.1.0")


def test_start_says_not_yet_on_stderr_only() -> None:
    out = subprocess.run(
        [SHIM, "-namespace", "default", "-id", "c1", "-address", "/run/x.sock", "start"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert out.stdout == ""
    assert "not yet available" in out.stderr
