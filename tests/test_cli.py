from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def test_check_passes_on_this_host(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "this host can run kata-py" in out
    assert "accelerator" in out
    assert "FAIL" not in out


def test_check_fails_clearly_with_a_bad_hypervisor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[hypervisor.qemu]\npath = "no-such-qemu"\n')
    assert cli.main(["--config", str(config), "check"]) == 1
    assert "FAIL hypervisor" in capsys.readouterr().out


def test_env_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[runtime]\nstate_dir = "{tmp_path}/state"\n')
    assert cli.main(["--config", str(config), "env"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["runtime"]["state_dir"] == f"{tmp_path}/state"
    assert env["hypervisor"]["machine_type"] == "microvm"
    assert cli.main(["--config", str(config), "list"]) == 0
    assert capsys.readouterr().out == ""
    assert cli.main(["--config", str(tmp_path / "missing.toml"), "env"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("sandbox", "message"), [("nosuch", "no shim serves sandbox nosuch"), ("../x", "invalid")]
)
def test_metrics_of_a_pod_that_is_not_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sandbox: str, message: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[runtime]\nstate_dir = "{tmp_path}/state"\n')
    assert cli.main(["--config", str(config), "metrics", sandbox]) == 2
    assert message in capsys.readouterr().err
