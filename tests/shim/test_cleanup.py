"""``delete``: after a dead shim, from the bundle and kata-py's persisted state."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shimv2.pb.containerd.runtime.task.v2.shim_pb2 import DeleteResponse
from shimv2.shim.bootstrap import CONFIG_PATH_FILE, monitor_socket, socket_path
from shimv2.shim.cleanup import clean
from shimv2.shim.flags import Flags
from shimv2.vc.config import Config, RuntimeConfig
from shimv2.vc.persist import ContainerState, SandboxState, Store
from shimv2.vc.storage import host_rootfs, prepare_shared
from tests.mountinfo import mounted as is_mountpoint

SHIM = f"{sys.executable.rsplit('/', 1)[0]}/containerd-shim-kata-py-v2"
CRI_SANDBOX = "io.kubernetes.cri.sandbox-id"


def bind(source: Path, target: Path) -> None:
    source.mkdir(exist_ok=True)
    target.mkdir(exist_ok=True)
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points a test makes; whatever is still mounted at the end is a failure."""
    made: list[Path] = []
    yield made
    left = [p for p in made if is_mountpoint(p)]
    for p in left:
        subprocess.run(["umount", "-l", str(p)], check=False)
    assert not left, f"still mounted: {left}"


def run_delete(bundle: Path, state_dir: Path, cid: str) -> subprocess.CompletedProcess[bytes]:
    config = state_dir / "config.toml"
    config.write_text(f'[runtime]\nstate_dir = "{state_dir}"\n')
    argv = [SHIM, "-namespace", "default", "-address", str(state_dir / "cd.sock")]
    argv += ["-publish-binary", "/usr/bin/containerd", "-id", cid, "-bundle", str(bundle)]
    env = {**os.environ, "KATA_PY_CONFIG": str(config)}
    return subprocess.run([*argv, "delete"], cwd=bundle, capture_output=True, env=env, timeout=30)


def test_delete_unmounts_the_rootfs(tmp_path: Path, mounts: list[Path]) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"annotations": {}}))
    bind(tmp_path / "layer", bundle / "rootfs")
    mounts.append(bundle / "rootfs")
    out = run_delete(bundle, tmp_path, "c1")
    assert out.returncode == 0, out.stderr
    assert not is_mountpoint(bundle / "rootfs")
    resp = DeleteResponse.FromString(out.stdout)
    assert (resp.pid, resp.exit_status) == (0, 137)
    assert resp.exited_at.seconds > 0


def test_delete_removes_a_dead_shims_sockets_and_keeps_a_live_one(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    # run_delete passes -address <tmp_path>/cd.sock, so these paths are this test's own.
    dead_paths = [
        socket_path(str(tmp_path / "cd.sock"), "default", "dead"),
        monitor_socket(str(tmp_path), "dead"),  # run_delete's state_dir is tmp_path
    ]
    live_path = socket_path(str(tmp_path / "cd.sock"), "default", "live")
    for path in dead_paths:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(path)
        dead.close()  # what a SIGKILLed daemon leaves: a socket file nobody listens on
    live = socket.socket(socket.AF_UNIX)
    live.bind(live_path)
    live.listen(1)
    try:
        assert run_delete(bundle, tmp_path, "dead").returncode == 0
        assert [os.path.exists(p) for p in dead_paths] == [False, False]
        assert run_delete(bundle, tmp_path, "live").returncode == 0
        assert os.path.exists(live_path)
    finally:
        live.close()
        for path in (*dead_paths, live_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def test_delete_uses_the_configuration_file_start_recorded(tmp_path: Path) -> None:
    """CRI's ConfigPath reaches ``start`` only; ``delete`` reads it from the bundle,
    so a pod's state directory from that file is cleaned, not the default's."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    state_dir = tmp_path / "pod-state"
    config = tmp_path / "pod.toml"
    config.write_text(f'[runtime]\nstate_dir = "{state_dir}"\n')
    (bundle / CONFIG_PATH_FILE).write_text(str(config))
    dead_path = monitor_socket(str(state_dir), "dead")
    os.makedirs(os.path.dirname(dead_path), exist_ok=True)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(dead_path)
    dead.close()
    argv = [SHIM, "-namespace", "default", "-address", str(tmp_path / "cd.sock")]
    argv += ["-publish-binary", "/usr/bin/containerd", "-id", "dead", "-bundle", str(bundle)]
    env = {k: v for k, v in os.environ.items() if k != "KATA_PY_CONFIG"}
    out = subprocess.run([*argv, "delete"], cwd=bundle, capture_output=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    assert not os.path.exists(dead_path)


def test_delete_with_nothing_to_clean(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    out = run_delete(bundle, tmp_path, "c1")
    assert out.returncode == 0, out.stderr
    assert DeleteResponse.FromString(out.stdout).exit_status == 137


def test_container_then_sandbox_from_state(tmp_path: Path, mounts: list[Path]) -> None:
    state_dir = tmp_path / "state"
    store = Store(state_dir)
    store.create("pod1")
    top = store.sandbox_dir("pod1")
    shared = prepare_shared(top)
    roots = {cid: host_rootfs(top, cid) for cid in ("pod1", "c2")}
    for cid, root in roots.items():
        root.parent.mkdir()
        bind(tmp_path / f"layer-{cid}", root)
    mounts += [*roots.values(), top / "shared", top / "mounts"]
    assert is_mountpoint(shared / "c2" / "rootfs")  # what the guest sees follows
    store.save(
        SandboxState(
            id="pod1",
            state="running",
            shared_dir=str(shared),
            containers={
                cid: ContainerState(id=cid, bundle=f"/b-{cid}", state="running", mounts=[str(root)])
                for cid, root in roots.items()
            },
        )
    )
    config = Config(runtime=RuntimeConfig(state_dir=str(state_dir)))
    b2 = tmp_path / "b2"
    b2.mkdir()
    (b2 / "config.json").write_text(json.dumps({"annotations": {CRI_SANDBOX: "pod1"}}))

    clean(Flags(id="c2", namespace="default"), str(b2), config)
    assert not is_mountpoint(roots["c2"])
    assert not is_mountpoint(shared / "c2" / "rootfs")
    assert not (top / "mounts" / "c2").exists()
    assert is_mountpoint(roots["pod1"])
    assert list(store.load("pod1").containers) == ["pod1"]

    clean(Flags(id="pod1", namespace="default"), str(tmp_path / "b1"), config)
    assert not is_mountpoint(roots["pod1"])
    assert not is_mountpoint(top / "shared")
    assert not is_mountpoint(top / "mounts")
    assert not top.exists()
    assert store.list() == []
