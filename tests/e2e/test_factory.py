"""Pods cloned from a VM template, as containerd sees them (``[factory] enable_template``).

One containerd (2.4) whose shims read a configuration with templates on; the
template is built with ``kata-py factory init`` as an operator would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shimv2.shim.bootstrap import WARM_SHIMS_ENV
from shimv2.vc.qemu_config import default_guest_dir
from tests.e2e.conftest import (
    IMAGE,
    RUNTIME,
    Containerd,
    assert_nothing_left,
    shim_pids,
    shim_sockets,
)
from tests.e2e.test_ctr import cid, kill_a_running_pods_vm, remove
from tests.leaks import cgroup_dirs, vm_processes

pytestmark = pytest.mark.vm

ROOT = Path(__file__).resolve().parents[2]
GUEST_KERNEL = (default_guest_dir() / "kver").read_text().strip()


@pytest.fixture(scope="module")
def templated() -> Iterator[tuple[Containerd, Path]]:
    """containerd 2.4 whose kata-py shims clone pods from a template built for them."""
    base = Path(f"/run/kpy-e2e-{uuid.uuid4().hex[:6]}")
    base.mkdir()
    shm = Path("/dev/shm") / f"kpy-e2e-{uuid.uuid4().hex[:6]}"
    config = base / "configuration.toml"
    config.write_text(f'[factory]\nenable_template = true\ntemplate_path = "{shm}/template"\n')
    cli = [sys.executable, "-m", "shimv2.cli", "--config", str(config), "factory"]
    release = ROOT / "build" / "containerd-v2.4.2"
    # Shims use a warm shim server there when one runs (test_warm_shims), else start cold.
    env = {"KATA_PY_CONFIG": str(config), WARM_SHIMS_ENV: str(base / "shims.sock")}
    cd = Containerd(str(release / "containerd"), str(release / "ctr"), base, "2.4", env=env)
    try:
        subprocess.run([*cli, "init"], check=True, cwd=ROOT, timeout=300)
        status = subprocess.run([*cli, "status"], capture_output=True, text=True, cwd=ROOT)
        assert status.returncode == 0, status.stdout  # this configuration has its template
        cd.start()
        cd.import_image(IMAGE)
        yield cd, shm
    finally:
        cd.stop()
        subprocess.run(["umount", "-R", str(base / "root")], check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
        subprocess.run([*cli, "destroy"], check=False, cwd=ROOT)
        shutil.rmtree(shm, ignore_errors=True)


def test_ctr_run_from_a_template(templated: tuple[Containerd, Path]) -> None:
    cd, shm = templated
    before, cgroups_before = shim_sockets(), cgroup_dirs()
    out = cd.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, cid(), "uname", "-r")
    assert out.stdout.strip() == GUEST_KERNEL
    failed = cd.ctr(
        "run", "--rm", "--runtime", RUNTIME, IMAGE, cid(), "sh", "-c", "exit 3", check=False
    )
    assert failed.returncode == 3

    name = cid()
    cd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, name, "sleep", "1000")
    try:
        state = json.loads(Path(f"/run/kata-py/sbs/{name}/state.json").read_text())
        memory_dir = state["hypervisor"]["memory_dir"]  # recorded for clones only
        assert memory_dir.startswith(f"{shm}/clones/")
        assert os.path.isdir(memory_dir)
        exec_out = cd.ctr("task", "exec", "--exec-id", "e1", name, "uname", "-r")
        assert exec_out.stdout.strip() == GUEST_KERNEL
    finally:
        remove(cd, name)
    assert not os.path.exists(memory_dir)
    assert list((shm / "clones").iterdir()) == []
    assert_nothing_left(before, cgroups_before)


def test_a_killed_clones_shim_is_cleaned_up_by_delete(templated: tuple[Containerd, Path]) -> None:
    cd, shm = templated
    before, cgroups_before = shim_sockets(), cgroup_dirs()
    name = cid()
    cd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, name, "sleep", "1000")
    try:
        memory_dir = shm / "clones" / name
        assert memory_dir.is_dir()
        assert len(shim_pids()) == 1
        os.kill(shim_pids()[0], signal.SIGKILL)
        # containerd runs the shim's `delete`, which cleans up from the state alone,
        # the clone's copy of the template's RAM included.
        deadline = time.monotonic() + 60
        while vm_processes(f"kata-py-{name}") or memory_dir.exists():
            assert time.monotonic() < deadline, vm_processes(f"kata-py-{name}")
            time.sleep(0.5)
    finally:
        remove(cd, name)
    assert_nothing_left(before, cgroups_before)


def test_a_clone_whose_vsock_backend_dies_ends_like_a_cold_pod(
    templated: tuple[Containerd, Path],
) -> None:
    """Clones talk to their agent over hybrid vsock here (``auto``): its device is
    plugged after the restore, and its backend's death ends the pod."""
    cd, shm = templated
    before, cgroups_before = shim_sockets(), cgroup_dirs()
    name = kill_a_running_pods_vm(cd, "vhost-device-vsock")
    assert not (shm / "clones" / name).exists()
    assert_nothing_left(before, cgroups_before)


def test_warm_shims_are_forked_by_the_server(templated: tuple[Containerd, Path]) -> None:
    cd, _ = templated
    before, cgroups_before = shim_sockets(), cgroup_dirs()
    path = cd.env[WARM_SHIMS_ENV]
    kata_py = f"{sys.executable.rsplit('/', 1)[0]}/kata-py"
    server = subprocess.Popen([kata_py, "factory", "serve", "--socket", path])
    name = cid()
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            assert server.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.05)
        out = cd.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, cid(), "uname", "-r")
        assert out.stdout.strip() == GUEST_KERNEL
        cd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, name, "sleep", "1000")
        [shim] = shim_pids()  # found by its command line, the shim's own
        stat = Path(f"/proc/{shim}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(stat[1]) == server.pid  # forked by the server, not spawned
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0
        # The pod outlives the server that forked its shim.
        exec_out = cd.ctr("task", "exec", "--exec-id", "e1", name, "uname", "-r")
        assert exec_out.stdout.strip() == GUEST_KERNEL
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        remove(cd, name)
    assert not os.path.exists(path)
    assert_nothing_left(before, cgroups_before)


def test_pods_take_their_vms_from_the_vm_cache(templated: tuple[Containerd, Path]) -> None:
    """``vm_cache_number``: ``factory init`` keeps a VM ready; a pod's shim adopts it,
    and a SIGKILLed shim's ``delete`` cleans it up by the VM's own id."""
    cd, shm = templated
    before, cgroups_before = shim_sockets(), cgroup_dirs()
    config = Path(cd.env["KATA_PY_CONFIG"])
    plain = config.read_text()
    endpoint = config.parent / "cache.sock"
    config.write_text(
        plain + f'vm_cache_number = 1\nvm_cache_endpoint = "{endpoint}"\n'
    )  # the shims read it at start
    cli = [sys.executable, "-m", "shimv2.cli", "--config", str(config), "factory"]
    server = subprocess.Popen([*cli, "init"], cwd=ROOT, text=True)
    name = cid()
    try:
        _wait_for_cached_vm(cli, server)
        cd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, name, "sleep", "1000")
        state = json.loads(Path(f"/run/kata-py/sbs/{name}/state.json").read_text())
        vm_id = state["vm_id"]
        assert vm_id.startswith("cache-")  # the cached VM's own id, kept for life
        assert state["vm_dir"] == f"/run/kata-py/vm/{vm_id}"
        assert (shm / "clones" / vm_id).is_dir()  # cached VMs are the template's clones
        exec_out = cd.ctr("task", "exec", "--exec-id", "e1", name, "uname", "-r")
        assert exec_out.stdout.strip() == GUEST_KERNEL
        # The shim dies: containerd's `delete` finds the VM by its own id.
        [shim] = shim_pids()
        os.kill(shim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while vm_processes(f"kata-py-{vm_id}") or (shm / "clones" / vm_id).exists():
            assert time.monotonic() < deadline, vm_processes(f"kata-py-{vm_id}")
            time.sleep(0.5)
        assert not Path(f"/run/kata-py/vm/{vm_id}").exists()
        remove(cd, name)
        # The cache has started the next one; a `ctr run --rm` takes it.
        _wait_for_cached_vm(cli, server)
        out = cd.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, cid(), "uname", "-r")
        assert out.stdout.strip() == GUEST_KERNEL
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0  # after stopping the VM it still held
    finally:
        config.write_text(plain)
        if server.poll() is None:
            server.kill()
            server.wait()
        remove(cd, name)
    assert not endpoint.exists()
    assert vm_processes("kata-py-cache-") == []
    assert list((shm / "clones").iterdir()) == []
    assert_nothing_left(before, cgroups_before)


def _wait_for_cached_vm(cli: list[str], server: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert server.poll() is None, "the VM cache server exited"
        status = subprocess.run([*cli, "status"], capture_output=True, text=True, cwd=ROOT)
        if "vm cache: 1 of 1 ready" in status.stdout:
            return
        assert time.monotonic() < deadline, status.stdout
        time.sleep(0.5)
