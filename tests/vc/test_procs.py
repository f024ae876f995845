"""Process identity before a kill: a recorded pid may be another process by now.

Decoys are real processes whose command lines look like a sandbox's QEMU or
virtiofsd (``python -c SLEEP -name kata-py-<id>``); only the last test, marked
``vm``, starts a VM.
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
import trio

from shimv2.oci import spec_to_json
from shimv2.vc.api import VirtContainers
from shimv2.vc.config import Config, RuntimeConfig
from shimv2.vc.persist import SandboxState
from shimv2.vc.procs import Child, ProcessIdentity, process_start_time
from shimv2.vc.qemu import Qemu
from shimv2.vc.qemu_config import QemuConfig
from shimv2.vc.sandbox import kill_recorded
from tests.guest.rootfs import build_rootfs, make_spec
from tests.leaks import vm_processes
from tests.vc.test_sandbox import FETCH_SCRIPT

SLEEP = "import time; time.sleep(120)"


class Decoys:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", SLEEP, *args])
        self.procs.append(proc)
        # Popen returns while the kernel may still be setting up the new argv.
        for _ in range(1000):
            with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                if SLEEP.encode() in f.read():
                    return proc
            time.sleep(0.001)
        raise AssertionError("the decoy never showed its command line")


@pytest.fixture
def decoys() -> Iterator[Decoys]:
    d = Decoys()
    yield d
    for proc in d.procs:
        proc.kill()
        proc.wait()


def alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


async def test_kill_recorded_spares_a_longer_sandbox_name(decoys: Decoys) -> None:
    # The state's pid was reused by sandbox "abc"'s QEMU; "kata-py-ab" is a substring.
    other = decoys.start("-name", "kata-py-abc")
    await kill_recorded(SandboxState(id="ab", state="running", qemu_pid=other.pid))
    assert alive(other)


async def test_kill_recorded_spares_a_virtiofsd_of_a_longer_vm_dir(decoys: Decoys) -> None:
    other = decoys.start("--socket-path=/run/kpy/vm/abc/vfs.sock")
    state = SandboxState(id="ab", state="running", vm_dir="/run/kpy/vm/ab", virtiofsd_pid=other.pid)
    await kill_recorded(state)
    assert alive(other)


async def test_kill_recorded_spares_a_reused_pid(decoys: Decoys) -> None:
    # Same command line, but not the process that was started: its start time differs.
    proc = decoys.start("-name", "kata-py-ab")
    started = process_start_time(proc.pid)
    state = SandboxState(id="ab", state="running", qemu_pid=proc.pid, qemu_start_time=started + 1)
    await kill_recorded(state)
    assert alive(proc)


async def test_kill_recorded_kills_the_recorded_processes(decoys: Decoys) -> None:
    qemu = decoys.start("-name", "kata-py-ab")
    virtiofsd = decoys.start("--fd=3")
    state = SandboxState(
        id="ab",
        state="running",
        qemu_pid=qemu.pid,
        qemu_start_time=process_start_time(qemu.pid),
        virtiofsd_pid=virtiofsd.pid,
        virtiofsd_start_time=process_start_time(virtiofsd.pid),
    )
    with trio.fail_after(10):
        await kill_recorded(state)
    assert qemu.wait(5) == -signal.SIGKILL
    assert virtiofsd.wait(5) == -signal.SIGKILL


async def test_kill_recorded_of_an_old_state_matches_the_exact_argv(decoys: Decoys) -> None:
    # States written before start times were recorded (0): the exact argument decides.
    qemu = decoys.start("-name", "kata-py-ab")
    virtiofsd = decoys.start("--socket-path=/run/kpy/vm/ab/vfs.sock")
    state = SandboxState(
        id="ab",
        state="running",
        vm_dir="/run/kpy/vm/ab",
        qemu_pid=qemu.pid,
        virtiofsd_pid=virtiofsd.pid,
    )
    with trio.fail_after(10):
        await kill_recorded(state)
    assert qemu.wait(5) == -signal.SIGKILL
    assert virtiofsd.wait(5) == -signal.SIGKILL


def test_identity_needs_a_start_time_or_an_argv(decoys: Decoys) -> None:
    proc = decoys.start("-name", "kata-py-ab")
    started = process_start_time(proc.pid)
    assert started > 0
    assert ProcessIdentity(proc.pid, started).matches()
    assert ProcessIdentity(proc.pid, started, ("-name", "kata-py-ab")).matches()
    assert ProcessIdentity(proc.pid, 0, ("-name", "kata-py-ab")).matches()
    assert not ProcessIdentity(proc.pid, started, ("-name", "kata-py-a")).matches()
    assert not ProcessIdentity(proc.pid, 0, ("-name", "kata-py-a")).matches()
    assert not ProcessIdentity(proc.pid, started + 1).matches()
    assert not ProcessIdentity(proc.pid, 0).matches()  # nothing to tell it by
    fd = ProcessIdentity(proc.pid, started).open_pidfd()
    assert fd is not None
    ns = ProcessIdentity(proc.pid, started).open_mount_namespace()
    assert ns is not None
    assert os.fstat(ns).st_ino == os.stat(f"/proc/{proc.pid}/ns/mnt").st_ino
    os.close(ns)
    assert ProcessIdentity(proc.pid, started + 1).open_mount_namespace() is None
    proc.kill()
    proc.wait()
    assert not ProcessIdentity(proc.pid, started).matches()
    assert ProcessIdentity(proc.pid, started).open_pidfd() is None
    assert ProcessIdentity(proc.pid, started).open_mount_namespace() is None
    os.close(fd)


async def test_child_records_its_start_time(tmp_path: Path) -> None:
    child = await Child.spawn("sleep", ["sleep", "30"])
    try:
        assert child.start_time == process_start_time(child.pid) > 0
    finally:
        await child.stop(grace=1)


async def test_adopt_refuses_a_pid_that_is_another_process(
    decoys: Decoys, tmp_path: Path, nursery: trio.Nursery
) -> None:
    argv = Qemu("vm1", QemuConfig(), tmp_path).argv()
    assert argv[argv.index("-name") + 1] == "kata-py-vm1"  # what adopt checks, exactly
    other = decoys.start("-name", "kata-py-vm1")
    started = process_start_time(other.pid)
    with pytest.raises(ProcessLookupError):
        await Qemu.adopt(
            "vm1", QemuConfig(), tmp_path, other.pid, 0, 0, nursery, start_time=started + 1
        )
    impostor = decoys.start("-name", "kata-py-vm12")
    with pytest.raises(ProcessLookupError):
        await Qemu.adopt("vm1", QemuConfig(), tmp_path, impostor.pid, 0, 0, nursery)
    assert alive(other)
    assert alive(impostor)


@pytest.mark.vm
async def test_cleanup_after_the_owner_died_kills_its_vm_by_identity(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    state_dir = f"/run/kpy-{uuid.uuid4().hex[:8]}"
    sid = f"sb{uuid.uuid4().hex[:8]}"
    bundle = tmp_path / "bundle"
    build_rootfs(bundle / "rootfs")
    spec = spec_to_json(make_spec("rootfs", ["sleep", "1000"]))
    try:
        with trio.fail_after(120):
            owner = await trio.run_process(
                [sys.executable, "-c", FETCH_SCRIPT, state_dir, sid, str(bundle), json.dumps(spec)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                cwd=str(Path(__file__).resolve().parents[2]),
            )
        assert b"RUNNING" in owner.stdout, owner.stderr.decode()[-2000:]
        vc = VirtContainers(nursery, Config(runtime=RuntimeConfig(state_dir=state_dir)))
        state = vc.store.load(sid)
        assert state.qemu_start_time == process_start_time(state.qemu_pid) > 0
        assert state.virtiofsd_start_time == process_start_time(state.virtiofsd_pid) > 0
        # QEMU, virtiofsd and (auto on this host: hybrid vsock) the vsock backend.
        assert state.vsock_backend_start_time == process_start_time(state.vsock_backend_pid) > 0
        assert len(vm_processes(state_dir)) == 3
        with trio.fail_after(60):
            await vc.cleanup_sandbox(sid)
        assert vm_processes(state_dir) == []
    finally:
        for leak in vm_processes(state_dir):
            os.kill(int(leak.split(":")[0]), signal.SIGKILL)
        shutil.rmtree(state_dir, ignore_errors=True)
