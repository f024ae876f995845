"""Warm shims: ``start`` gets its daemon forked by a server that imported it already."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shimv2.pb.containerd.runtime.task.v2.shim_pb2 import DeleteResponse
from shimv2.shim.bootstrap import WARM_SHIMS_ENV
from shimv2.shim.warm import BadRequest, parse_request
from tests.mountinfo import mounted as is_mountpoint
from tests.shim.test_bootstrap import SHIM, Env, env, processes, stop_daemon
from tests.shim.test_cleanup import bind, mounts

__all__ = ["env", "mounts"]  # the fixtures, used by name


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    path = str(tmp_path / "shims.sock")
    kata_py = f"{sys.executable.rsplit('/', 1)[0]}/kata-py"  # as an operator runs it
    proc = subprocess.Popen([kata_py, "factory", "serve", "--socket", path], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the warm shim server did not listen"
        time.sleep(0.05)
    try:
        yield path, proc
    finally:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert not os.path.exists(path)  # it removes its socket


def test_start_gets_a_daemon_forked_by_the_server(
    env: Env, server: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    path, proc = server
    env.bundle("w1")
    config = tmp_path / "configuration.toml"  # its metrics socket goes here, not in /run
    config.write_text(f'[runtime]\nstate_dir = "{tmp_path}/state"\n')
    began = time.monotonic()
    out = env.start("w1", extra_env={WARM_SHIMS_ENV: path, "KATA_PY_CONFIG": str(config)})
    assert out.returncode == 0, out.stderr
    [pid] = processes(env.address)  # found by its command line: the shim's, not the server's
    assert _ppid(pid) == proc.pid
    cmdline = [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    assert cmdline[:5] == [b"containerd-shim-kata-py-v2", b"-namespace", b"default",
                           b"-id", b"w1"]  # fmt: skip
    assert env.address.encode() in cmdline
    assert os.readlink(f"/proc/{pid}/cwd") == str(env.root / "w1")
    assert os.getsid(pid) == pid  # a session of its own, as a spawned daemon
    # It serves containerd's calls and shuts down as a cold one does; the server reaps it.
    stop_daemon(env, "w1")
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, "the server did not reap its shim"
        time.sleep(0.05)
    assert time.monotonic() - began < 30


def test_without_a_server_start_spawns_a_cold_daemon(env: Env, tmp_path: Path) -> None:
    stale = tmp_path / "gone.sock"
    stale.touch()  # a server that died without removing its socket
    env.bundle("w2")
    config = tmp_path / "configuration.toml"
    config.write_text(f'[runtime]\nstate_dir = "{tmp_path}/state"\n')
    out = env.start("w2", extra_env={WARM_SHIMS_ENV: str(stale), "KATA_PY_CONFIG": str(config)})
    assert out.returncode == 0, out.stderr
    [pid] = processes(env.address)
    # Spawned: the interpreter running the shim's script, as spawn_daemon starts it.
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[0].startswith(sys.executable.encode())  # python, or python3 beside it
    assert argv[1:3] == [b"-P", SHIM.encode()]
    stop_daemon(env, "w2")


def test_requests_are_checked_before_anything_is_forked() -> None:
    request = b'{"argv": ["-id", "x"], "env": {"A": "1"}, "cwd": "/b"}'
    assert parse_request(request) == (["-id", "x"], {"A": "1"}, "/b", False)
    for bad in (
        b"not json", b"[]", b'{"argv": [], "env": {}, "cwd": "/"}',
        b'{"argv": [1], "env": {}, "cwd": "/"}',
        b'{"argv": ["a"], "env": {"A=B": "1"}, "cwd": "/"}',
        b'{"argv": ["a"], "env": {"A": 1}, "cwd": "/"}',
        b'{"argv": ["a"], "env": {}, "cwd": "relative"}',
        b'{"argv": ["a\\u0000b"], "env": {}, "cwd": "/"}',
        b'{"argv": ["a"], "env": {}, "cwd": "/", "delete": 1}',
    ):  # fmt: skip
        with pytest.raises(BadRequest):
            parse_request(bad)


def test_delete_is_run_by_the_server(
    server: tuple[str, subprocess.Popen[bytes]], tmp_path: Path, mounts: list[Path]
) -> None:
    """``delete`` runs after every shim: the server's child does it, with what it
    imported already, and answers on the asker's stdout."""
    path, proc = server
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"annotations": {}}))
    bind(tmp_path / "layer", bundle / "rootfs")
    mounts.append(bundle / "rootfs")
    config = tmp_path / "config.toml"
    config.write_text(f'[runtime]\nstate_dir = "{tmp_path}/state"\n')
    argv = [SHIM, "-namespace", "default", "-address", str(tmp_path / "cd.sock")]
    argv += ["-id", "c1", "-bundle", str(bundle), "delete"]
    env = {**os.environ, WARM_SHIMS_ENV: path, "KATA_PY_CONFIG": str(config)}
    out = subprocess.run(argv, cwd=bundle, capture_output=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    resp = DeleteResponse.FromString(out.stdout)
    assert (resp.pid, resp.exit_status) == (0, 137)
    assert not is_mountpoint(bundle / "rootfs")  # cleaned up, by the server's child:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert proc.stderr is not None
    assert b"delete" in proc.stderr.read().split(b"forked", 1)[1].split(b"\n", 1)[0]


def test_a_second_server_leaves_a_live_one_alone(
    server: tuple[str, subprocess.Popen[bytes]],
) -> None:
    path, proc = server
    kata_py = f"{sys.executable.rsplit('/', 1)[0]}/kata-py"
    second = subprocess.run(
        [kata_py, "factory", "serve", "--socket", path], capture_output=True, text=True, timeout=60
    )
    assert second.returncode != 0
    assert "already listens" in second.stderr
    assert proc.poll() is None  # the first still serves its socket
    assert os.path.exists(path)
