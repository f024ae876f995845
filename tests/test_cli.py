from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import socket
import subprocess
import sys
import termios
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shimv2 import cli
from shimv2.guest_protocol import SHELL_EXITED_END, SHELL_EXITED_PREFIX, shell_exited
from shimv2.vc.persist import SandboxState
from shimv2.vc.qemu_config import default_guest_dir
from shimv2.vc.testing import FakeDebugConsole
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
    assert "port-forward   relay over vsock, iptables /" in out  # scripts/setup installs it
    assert "FAIL" not in out


def test_check_says_whether_ksm_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ksm = tmp_path / "ksm"
    assert cli.ksm_status(False, ksm) == "not in this kernel; enable_ksm = false"
    ksm.mkdir()
    (ksm / "run").write_text("0\n")
    assert cli.ksm_status(True, ksm) == "not running (run = 0); enable_ksm = true"
    (ksm / "run").write_text("1\n")
    (ksm / "pages_sharing").write_text("42\n")
    assert cli.ksm_status(False, ksm) == "running, 42 pages sharing; enable_ksm = false"
    config = tmp_path / "c.toml"
    config.write_text("[hypervisor.qemu]\nenable_ksm = true\n")
    cli.main(["--config", str(config), "check"])
    line = next(x for x in capsys.readouterr().out.splitlines() if " ksm " in x)
    assert line.startswith("ok ")
    assert line.endswith("enable_ksm = true")


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
    state = SandboxState(id="pod1", state="running")
    (tmp_path / "state" / "sbs" / "pod1" / "state.json").write_text(state.to_json())
    assert cli.main(["--config", str(config), "exec", "pod1"]) == 2
    assert "debug_console_enabled = true" in capsys.readouterr().err


# -- the console relay against a hostile guest (a fake console port; no VM) --------


def _console(
    tmp_path: Path, session: Callable[[socket.socket], None], *, tty_out: bool = False
) -> tuple[int, bytes]:
    """Run ``attach_console`` with piped input (at EOF) against ``session``; (status, output)."""
    path = str(tmp_path / "console.sock")
    stdin_r, stdin_w = os.pipe()
    os.close(stdin_w)
    if tty_out:
        reader, out_fd = pty.openpty()
        attrs = termios.tcgetattr(out_fd)
        attrs[1] &= ~termios.OPOST  # bytes as written: no \n -> \r\n
        termios.tcsetattr(out_fd, termios.TCSANOW, attrs)
    else:
        out_fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with FakeDebugConsole(path, session) as console:
            status = cli.attach_console(path, stdin_r, out_fd)
        assert console.error is None, console.error
        if tty_out:
            out = b""
            while select.select([reader], [], [], 0.2)[0]:
                out += os.read(reader, 65536)
            os.close(reader)
        else:
            out = (tmp_path / "out").read_bytes()
    finally:
        os.close(stdin_r)
        os.close(out_fd)
    return status, out


def _greeted(sock: socket.socket) -> None:
    assert sock.recv(1) == b"\n"  # the host speaks first


def test_exec_output_flows_while_a_marker_never_ends(tmp_path: Path) -> None:
    seen = 0

    def session(sock: socket.socket) -> None:
        nonlocal seen
        _greeted(sock)
        sock.sendall(SHELL_EXITED_PREFIX + b"x" * 100_000)  # no terminator, ever
        deadline = time.monotonic() + 5
        while seen < 100_000 and time.monotonic() < deadline:
            time.sleep(0.05)
            seen = (tmp_path / "out").stat().st_size
        sock.sendall(shell_exited(0))

    status, out = _console(tmp_path, session)
    assert seen >= 100_000  # shown as it came: nothing held back but a marker's length
    assert status == 0
    assert out.endswith(b"x" * 100_000)


def test_exec_a_marker_followed_by_output_is_forged(tmp_path: Path) -> None:
    def session(sock: socket.socket) -> None:
        _greeted(sock)
        # e.g. the admin cats a file a container wrote: the shell's prompt follows
        sock.sendall(b"hello\r\n" + shell_exited(0) + b"/ # ")
        time.sleep(0.05)
        sock.sendall(shell_exited(0))
        time.sleep(0.05)
        sock.sendall(b"/ # exit\r\n")
        time.sleep(0.2)
        sock.sendall(shell_exited(3))  # the agent's: nothing after it

    status, out = _console(tmp_path, session)
    assert status == 3
    assert out.startswith(b"hello\r\n")
    assert out.endswith(b"/ # exit\r\n")


def test_exec_a_status_that_is_no_status_is_not_a_marker(tmp_path: Path) -> None:
    def session(sock: socket.socket) -> None:
        _greeted(sock)
        for fake in (b"999", b"-1", b"", b"1e3", b"\xd9\xa3"):
            sock.sendall(SHELL_EXITED_PREFIX + fake + SHELL_EXITED_END)
            time.sleep(0.05)
        sock.sendall(b"done\r\n")
        time.sleep(0.05)
        sock.sendall(shell_exited(5))

    status, out = _console(tmp_path, session)
    assert status == 5
    assert out.endswith(b"done\r\n")


def test_exec_keeps_dangerous_escapes_from_the_terminal(tmp_path: Path) -> None:
    clipboard = b"\x1b]52;c;ZWNobyBwd25lZA==\x07"  # OSC 52: set the admin's clipboard

    def session(sock: socket.socket) -> None:
        _greeted(sock)
        sock.sendall(b"\x1b[1mbold\x1b[0m " + clipboard)
        sock.sendall(b"\x1bPtmux;\x1b" + clipboard + b"\x1b\\")  # through tmux
        sock.sendall(b"\xc2\x9d52;c;ZWNobyBwd25lZA==\x07 \x1b]0;title\x07 ok")
        time.sleep(0.05)
        sock.sendall(shell_exited(0))

    status, out = _console(tmp_path, session, tty_out=True)
    assert status == 0
    assert b"52;" not in out
    assert b"\x1b[1mbold\x1b[0m " in out  # colours and cursor moves still work
    assert b"\x1b]0;title\x07" in out  # and window titles
    assert out.endswith(b" ok")


def _filtered(*chunks: bytes) -> bytes:
    screen = cli.TerminalFilter()
    return b"".join(screen.feed(c) for c in chunks)


def test_terminal_filter_sequences_cut_anywhere() -> None:
    stream = b"a\x1b[31mred\x1b[0m\x1b]52;c;eA==\x07\x1b]2;t\x1b\\\xe2\x9d\x9d\x1bPq#0\x1b\\z"
    expected = b"a\x1b[31mred\x1b[0m\x1b]2;t\x07\xe2\x9d\x9dz"  # UTF-8 with 0x9d stays text
    assert _filtered(stream) == expected
    for cut in range(1, len(stream)):
        assert _filtered(stream[:cut], stream[cut:]) == expected, cut
    assert _filtered(*(bytes([b]) for b in stream)) == expected


def test_terminal_filter_is_bounded() -> None:
    screen = cli.TerminalFilter()
    out = screen.feed(b"x\x1b]52;c;")
    for _ in range(100):
        out += screen.feed(b"A" * 65536)  # never terminated
        assert len(screen._held) <= cli.MAX_STRING + 1
    out += screen.feed(b"\x07after")
    assert out == b"xafter"
    # ESC ESC ] 52: the second ESC starts the string, the first alone is harmless
    assert b"52" not in _filtered(b"\x1b\x1b]52;c;eA==\x07")


def test_exit_marker_holds_back_a_marker_length_at_most() -> None:
    marker = cli.ExitMarker(SHELL_EXITED_PREFIX, SHELL_EXITED_END)
    shown = marker.feed(SHELL_EXITED_PREFIX[:5])
    assert shown == b""
    shown += marker.feed(SHELL_EXITED_PREFIX[5:] + b"12")
    assert shown == b""
    assert marker.status is None
    shown += marker.feed(b"34" + b"y" * 1000)
    assert shown == SHELL_EXITED_PREFIX + b"1234" + b"y" * 1000
    assert len(marker.pending) < len(SHELL_EXITED_PREFIX)
    assert marker.feed(shell_exited(42)) == b""
    assert marker.status == 42
    assert marker.feed(b"!") == shell_exited(42) + b"!"
    assert marker.status is None


def test_factory_status_and_destroy_without_a_template(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = Path("/dev/shm") / f"kpy-cli-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "configuration.toml"
    config.write_text(f'[factory]\ntemplate_path = "{root}/template"\n')
    try:
        # No template for this configuration: pods would boot cold, and status says so.
        assert cli.main(["--config", str(config), "factory", "status"]) == 1
        out = capsys.readouterr().out
        assert "templates: disabled" in out
        assert "pods boot cold" in out
        (root / "template" / "0123abcd").mkdir(parents=True)
        (root / "template" / "0123abcd" / "template.json").write_text('{"key": "0123abcd"}')
        assert cli.main(["--config", str(config), "factory", "status"]) == 1
        assert "0123abcd" in capsys.readouterr().out
        assert cli.main(["--config", str(config), "factory", "destroy"]) == 0
        assert "removed 1 template(s)" in capsys.readouterr().out
        assert list((root / "template").iterdir()) == []
    finally:
        shutil.rmtree(root, ignore_errors=True)
