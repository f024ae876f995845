"""``start`` as containerd runs it: the real console script, a bundle, a log FIFO."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from google.protobuf.any_pb2 import Any
from google.protobuf.empty_pb2 import Empty

from shimv2.errdefs import Unimplemented
from shimv2.pb.containerd.runtime.bootstrap.v1.bootstrap_pb2 import (
    BootstrapParams,
    BootstrapResult,
    Extension,
)
from shimv2.pb.containerd.runtime.task.v2.shim_pb2 import ShutdownRequest
from shimv2.shim import bootstrap
from shimv2.shim.flags import Flags
from shimv2.ttrpc import open_unix_client

SHIM = f"{sys.executable.rsplit('/', 1)[0]}/containerd-shim-kata-py-v2"
CONTAINERD = "/usr/bin/containerd"
CRI_TYPE = "io.kubernetes.cri.container-type"
CRI_SANDBOX = "io.kubernetes.cri.sandbox-id"


def processes(marker: str) -> dict[int, str]:
    """Live (not zombie) processes whose command line mentions ``marker``."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmd and state != "Z":
            found[int(entry)] = cmd
    return found


def wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state == "Z":
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still running")


class LogFifo:
    """containerd's side of ``bundle/log``: opened for reading before ``start``."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.text = ""

    def read(self) -> str:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return self.text
            if not chunk:
                return self.text
            self.text += chunk.decode()


@dataclass
class Env:
    """One containerd as the shim sees it: a unique address, bundles, the daemons."""

    root: Path
    address: str
    logs: dict[str, LogFifo] = field(default_factory=dict)

    def bundle(self, cid: str, annotations: dict[str, str] | None = None) -> Path:
        path = self.root / cid
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"annotations": annotations or {}}))
        self.logs[cid] = LogFifo(path / "log")
        return path

    def start(
        self,
        cid: str,
        *,
        stdin: bytes = b"",
        publish_binary: str = CONTAINERD,
        extra_env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        argv = [SHIM, "-namespace", "default", "-address", self.address]
        argv += ["-publish-binary", publish_binary, "-id", cid, "start"]
        env = {**os.environ, "TTRPC_ADDRESS": self.address + ".ttrpc", "MAX_SHIM_VERSION": "2"}
        env |= extra_env or {}
        return subprocess.run(
            argv, cwd=self.root / cid, input=stdin, capture_output=True, env=env, timeout=20
        )

    def socket(self, group: str) -> str:
        digest = hashlib.sha256(f"{self.address}/default/{group}".encode()).hexdigest()
        return f"/run/containerd/s/{digest}"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path, str(tmp_path / "containerd.sock"))
    yield e
    left = processes(e.address)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    for pid in left:
        wait_gone(pid)
    sockets = [e.socket(cid) for cid in e.logs if os.path.exists(e.socket(cid))]
    for path in sockets:
        os.unlink(path)
    for log in e.logs.values():
        os.close(log.fd)
    assert not left, f"daemons left running: {left}"
    assert not sockets, f"sockets left: {sockets}"


def stop_daemon(e: Env, cid: str) -> None:
    """Shutdown over the Task API; SIGTERM while there is no task service yet."""
    path = e.socket(cid)

    async def shutdown() -> bool:
        async with open_unix_client(path) as client:
            try:
                await client.call(
                    "containerd.task.v2.Task", "Shutdown", ShutdownRequest(id=cid), Empty
                )
            except Unimplemented:
                return False
        return True

    [pid] = processes(e.address)
    if not trio.run(shutdown):
        os.kill(pid, signal.SIGTERM)
    wait_gone(pid)
    assert not os.path.exists(path)


def test_start_spawns_a_detached_daemon_and_a_pod_shares_it(env: Env) -> None:
    env.bundle("c1")
    # containerd's own shims make it 0700 when they come first (a critest run, say)
    had_socket_dir = os.path.exists("/run/containerd/s")
    began = time.monotonic()
    out = env.start("c1")
    took = time.monotonic() - began
    address = f"unix://{env.socket('c1')}"
    assert (out.returncode, out.stdout.decode(), out.stderr) == (0, address, b"")
    assert took < 5, "start waited for its daemon: the daemon holds start's pipes"
    assert stat.S_IMODE(os.stat(env.socket("c1")).st_mode) == 0o600
    if not had_socket_dir:
        assert stat.S_IMODE(os.stat("/run/containerd/s").st_mode) & 0o711 == 0o711
    assert (env.root / "c1" / "address").read_text() == address

    [(pid, cmd)] = processes(env.address).items()
    assert " start" not in cmd
    assert f"-bundle {env.root / 'c1'}" in cmd
    fds = {n: os.readlink(f"/proc/{pid}/fd/{n}") for n in (0, 1, 2, 3)}
    assert fds[0] == "/dev/null"
    assert fds[1] == fds[2] == str(env.root / "c1" / "log")
    assert fds[3].startswith("socket:")
    assert os.getsid(pid) == pid  # its own session

    env.bundle("c2", {CRI_TYPE: "container", CRI_SANDBOX: "c1"})
    again = env.start("c2")
    assert (again.returncode, again.stdout.decode(), again.stderr) == (0, address, b"")
    assert (env.root / "c2" / "address").read_text() == address
    assert list(processes(env.address)) == [pid]

    stop_daemon(env, "c1")
    log = env.logs["c1"].read()
    assert "level=info" in log, log
    assert "exited" in log, log


def test_sandbox_container_gets_its_own_daemon(env: Env) -> None:
    env.bundle("p1", {CRI_TYPE: "sandbox", CRI_SANDBOX: "p1"})
    env.bundle("p2", {CRI_TYPE: "sandbox", CRI_SANDBOX: "p2"})
    one, two = env.start("p1"), env.start("p2")
    assert one.stdout != two.stdout
    assert len(processes(env.address)) == 2
    stop_daemon_pid = list(processes(env.address))
    for pid in stop_daemon_pid:
        os.kill(pid, signal.SIGTERM)
    for pid in stop_daemon_pid:
        wait_gone(pid)
    assert not os.path.exists(env.socket("p1"))
    assert not os.path.exists(env.socket("p2"))


def test_bootstrap_params_get_a_protobuf_result(env: Env) -> None:
    env.bundle("c1")
    params = BootstrapParams(instance_id="c1", namespace="default", containerd_version="2.3.0")
    params.extensions.append(Extension(value=Any(type_url="runtimeoptions.v1.Options")))
    out = env.start("c1", stdin=params.SerializeToString())
    assert (out.returncode, out.stderr) == (0, b"")
    result = BootstrapResult.FromString(out.stdout)
    assert (result.version, result.address, result.protocol) == (
        3,
        f"unix://{env.socket('c1')}",
        "ttrpc",
    )
    stop_daemon(env, "c1")


def test_containerd_2_gets_json_v3(env: Env) -> None:
    fake = env.root / "containerd"
    fake.write_text("#!/bin/sh\necho 'containerd containerd.io v2.1.0 abc'\n")
    fake.chmod(0o755)
    env.bundle("c1")
    # An Any of runtime options on stdin, as containerd <= 2.2 sends.
    options = Any(type_url="runtimeoptions.v1.Options", value=b"")
    out = env.start("c1", stdin=options.SerializeToString(), publish_binary=str(fake))
    assert (out.returncode, out.stderr) == (0, b"")
    assert json.loads(out.stdout) == {
        "version": 3,
        "address": f"unix://{env.socket('c1')}",
        "protocol": "ttrpc",
    }
    stop_daemon(env, "c1")


def test_start_records_the_configuration_file_cri_named_for_delete(env: Env) -> None:
    config = env.root / "pod.toml"
    config.write_text("")
    env.bundle("c1")
    # runtimeoptions.v1.Options field 2 (config_path), as CRI sends a runtime's ConfigPath.
    path = str(config).encode()
    options = Any(type_url="runtimeoptions.v1.Options", value=b"\x12" + bytes([len(path)]) + path)
    out = env.start("c1", stdin=options.SerializeToString())
    assert (out.returncode, out.stderr) == (0, b"")
    assert bootstrap.read_config_path(str(env.root / "c1")) == str(config)
    [pid] = processes(env.address)
    daemon_env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"KATA_PY_CONFIG={config}".encode() in daemon_env
    stop_daemon(env, "c1")
    env.bundle("c2")  # no options: nothing recorded
    assert bootstrap.read_config_path(str(env.root / "c2")) is None


def test_start_error_is_one_line_on_stderr(env: Env) -> None:
    bundle = env.bundle("c1")
    (bundle / "config.json").write_text("{not json")
    out = env.start("c1")
    assert (out.returncode, out.stdout) == (1, b"")
    assert out.stderr.decode().count("\n") == 1
    assert b"config.json" in out.stderr
    assert processes(env.address) == {}


# -- the pieces, without processes ---------------------------------------------


def test_socket_path_is_runc_s() -> None:
    digest = hashlib.sha256(b"/run/containerd/containerd.sock/k8s.io/abc").hexdigest()
    assert bootstrap.socket_path("/run/containerd/containerd.sock/", "k8s.io", "abc") == (
        f"/run/containerd/s/{digest}"
    )


def test_group_id() -> None:
    assert bootstrap.group_id("c", {}) == "c"
    assert bootstrap.group_id("c", {CRI_TYPE: "sandbox", CRI_SANDBOX: "c"}) == "c"
    assert bootstrap.group_id("c", {CRI_TYPE: "container", CRI_SANDBOX: "s"}) == "s"


def test_stdin_kinds_are_told_apart() -> None:
    flags = Flags(id="c1", namespace="default")
    params = BootstrapParams(instance_id="c1", namespace="default")
    assert bootstrap.decode_stdin(params.SerializeToString(), flags).params == params
    # The same bytes with another id are an Any whose type_url is "c1"...
    other = bootstrap.decode_stdin(params.SerializeToString(), Flags(id="c2", namespace="x"))
    assert other.params is None
    assert other.options is not None
    options = Any(type_url="runtimeoptions.v1.Options", value=b"\x12\x05/etc/")
    got = bootstrap.decode_stdin(options.SerializeToString(), flags)
    assert got.params is None
    assert bootstrap.config_path_from(got.options) == "/etc/"
    assert bootstrap.decode_stdin(b"", flags) == bootstrap.StartInput()


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (None, b"unix:///s"),
        ((1, 6), b"unix:///s"),
        ((1, 7), b"unix:///s"),
        ((2, 0), b'{"version":3,"address":"unix:///s","protocol":"ttrpc"}'),
        ((2, 2), b'{"version":3,"address":"unix:///s","protocol":"ttrpc"}'),
    ],
)
def test_reply_formats(version: tuple[int, int] | None, expected: bytes) -> None:
    assert bootstrap.reply("unix:///s", None, version) == expected


def test_containerd_version_of_debian_containerd() -> None:
    assert bootstrap.containerd_version(CONTAINERD) == (1, 6)
    assert bootstrap.containerd_version("/nonexistent") is None
