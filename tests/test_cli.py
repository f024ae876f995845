from __future__ import annotations

import subprocess
import sys

import pytest

from shimv2 import cli


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"kata-py {cli.package_version()}"
    assert cli.package_version() == "0.1.0"


def test_console_scripts_are_installed() -> None:
    bindir = sys.executable.rsplit("/", 1)[0]
    out = subprocess.run([f"{bindir}/kata-py", "--version"], capture_output=True, text=True)
    assert (out.returncode, out.stdout.strip()) == (0, "kata-py 0.1.0")
