from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import termios
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shimv2 import cli
from shimv2.vc.qemu import default_guest_dir
from tests.leaks import vm_processes

GUEST_KERNEL = (default_guest_dir() / "kver").read_text().strip()


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


@pytest.fixture
def console_pod(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A sandbox with the debug console, run by a helper process; (config path, sandbox id)."""
    state_dir = f"/run/kpy-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "c.toml"
    config.write_text(
        f'[runtime]\nstate_dir = "{state_dir}"\n[agent.kata]\ndebug_console_enabled = true\n'
    )
    sid = f"sb{uuid.uuid4().hex[:8]}"
    holder = subprocess.Popen(
        [sys.executable, "-m", "tests.vm_holder", str(config), sid],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        yield config, sid
    finally:
        holder.terminate()
        assert holder.wait(timeout=60) == 0
        assert vm_processes(state_dir) == []
        assert not os.path.exists(f"{state_dir}/sbs/{sid}")
        shutil.rmtree(state_dir, ignore_errors=True)


def kata_py(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    bindir = sys.executable.rsplit("/", 1)[0]
    return subprocess.run(
        [f"{bindir}/kata-py", "--config", str(config), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.vm
def test_exec_gives_a_shell_in_the_vm(console_pod: tuple[Path, str]) -> None:
    config, sid = console_pod
    out = kata_py(config, "exec", sid, stdin="uname -r\n")
    assert out.returncode == 0, out.stderr
    assert GUEST_KERNEL in out.stdout
    assert "shell-exited" not in out.stdout  # the marker is consumed, not shown
    # a new session, a new shell; its exit status comes back
    out = kata_py(config, "exec", sid, stdin="echo pid=$$; echo $$ > /tmp/pid; exit 7\n")
    assert out.returncode == 7, out.stderr
    pid = re.findall(r"^pid=(\d+)\r?$", out.stdout, re.M)
    assert len(pid) == 1
    # the same VM: what the last session wrote is there; its PID 1 is the guest's init
    out = kata_py(config, "exec", sid, stdin="cat /tmp/pid /proc/1/comm\n")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[lines.index(pid[0]) + 1] == "init"
    # a console left in the middle of a command: its shell and the command are ended
    bindir = sys.executable.rsplit("/", 1)[0]
    left = subprocess.Popen(
        [f"{bindir}/kata-py", "--config", str(config), "exec", sid],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert left.stdin is not None
    assert left.stdout is not None
    left.stdin.write(b"sleep 1000; echo sleep-ended\n")
    left.stdin.flush()
    seen = b""
    while b"sleep 1000;" not in seen:  # the shell's echo of the command: it started
        seen += os.read(left.stdout.fileno(), 4096)
    time.sleep(1)
    left.kill()
    left.wait()
    out = kata_py(config, "exec", sid, stdin="ps | grep -c '[s]leep 1000'\n")
    assert out.returncode == 1  # grep found nothing
    assert "\n0\n" in out.stdout  # (text mode turned the \r\n into \n)


@pytest.mark.vm
def test_exec_on_a_terminal_is_raw_and_detaches_on_ctrl_close_bracket(
    console_pod: tuple[Path, str],
) -> None:
    config, sid = console_pod
    leader, follower = pty.openpty()
    bindir = sys.executable.rsplit("/", 1)[0]
    proc = subprocess.Popen(
        [f"{bindir}/kata-py", "--config", str(config), "exec", sid],
        stdin=follower,
        stdout=follower,
        stderr=subprocess.PIPE,
    )
    os.close(follower)
    seen = b""

    def read_until(marker: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 60
        while marker not in seen:
            assert time.monotonic() < deadline, seen
            ready, _, _ = select.select([leader], [], [], 1)
            if ready:
                seen += os.read(leader, 4096)

    try:
        read_until(b"^] leaves")
        os.write(leader, b"uname -r\r")  # a terminal's Enter: raw mode passes it through
        read_until(GUEST_KERNEL.encode())
        os.write(leader, b"\x1d")
        assert proc.wait(timeout=30) == 0
        # the terminal is restored: back in canonical mode with echo
        attrs = termios.tcgetattr(leader)
        assert attrs[3] & termios.ICANON
        assert attrs[3] & termios.ECHO
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)


def test_exec_without_a_debug_console_says_how_to_get_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[runtime]\nstate_dir = "{tmp_path}/state"\n')
    assert cli.main(["--config", str(config), "exec", "nosuch"]) == 2
    assert "no sandbox nosuch" in capsys.readouterr().err
    (tmp_path / "state" / "sbs" / "pod1").mkdir(parents=True)
    (tmp_path / "state" / "sbs" / "pod1" / "state.json").write_text("{}")
    assert cli.main(["--config", str(config), "exec", "pod1"]) == 2
    assert "debug_console_enabled = true" in capsys.readouterr().err
