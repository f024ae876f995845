"""The QEMU launcher with real QEMU (TCG here), real virtiofsd, the real guest image."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest
import trio

from shimv2.errdefs import FailedPrecondition, InvalidArgument
from shimv2.vc.qemu import Qemu, QemuConfig
from tests.leaks import vm_processes

pytestmark = pytest.mark.vm


def _vm(tmp_path: Path, **overrides: object) -> Qemu:
    vm_id = f"t-{uuid.uuid4().hex[:12]}"
    share = tmp_path / "shared"
    share.mkdir(exist_ok=True)
    config = QemuConfig(shared_dir=str(share), **overrides)  # type: ignore[arg-type]
    return Qemu(vm_id, config, Path("/run/kata-py/vm") / vm_id)


async def test_launch_qmp_and_clean_shutdown(tmp_path: Path, nursery: trio.Nursery) -> None:
    vm = _vm(tmp_path)
    await vm.start(nursery)
    try:
        assert vm.accelerator in ("kvm", "tcg")
        status = await vm.qmp.execute("query-status")
        assert status["status"] in ("running", "paused") or status["running"]
        await vm.qmp.execute("stop")
        assert (await vm.qmp.execute("query-status"))["status"] == "paused"
        await vm.qmp.execute("cont")
        assert (await vm.qmp.execute("query-status"))["running"] is True
        assert vm_processes(vm.vm_id)  # QEMU and virtiofsd are really there
    finally:
        await vm.shutdown()
    assert vm.exited
    assert vm_processes(vm.vm_id) == []
    assert not vm.run_dir.exists()


async def test_qemu_death_is_noticed_at_once(tmp_path: Path, nursery: trio.Nursery) -> None:
    vm = _vm(tmp_path)
    await vm.start(nursery)
    try:
        assert vm.pid is not None
        os.kill(vm.pid, signal.SIGKILL)
        with trio.fail_after(3):
            status = await vm.wait_exited()
        assert status == -signal.SIGKILL
    finally:
        await vm.shutdown()
    assert vm_processes(vm.vm_id) == []
    assert not vm.run_dir.exists()


async def test_bad_config_fails_clearly_and_leaves_nothing(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    vm = _vm(tmp_path, kernel=str(tmp_path / "missing-vmlinux"))
    with pytest.raises(FailedPrecondition, match="guest image file missing"):
        await vm.start(nursery)
    assert not vm.run_dir.exists()
    vm = _vm(tmp_path, machine="pc-i440fx")
    with pytest.raises(InvalidArgument, match="machine"):
        await vm.start(nursery)
    assert vm_processes(vm.vm_id) == []


async def test_command_line_for_both_machines(tmp_path: Path) -> None:
    micro = " ".join(_vm(tmp_path).argv())
    assert "-M microvm,memory-backend=mem" in micro
    assert "vhost-user-fs-device,chardev=vfs,tag=kataShared" in micro
    assert "virtio-mmio.force-legacy=false" in micro
    assert "name=agent.channel.0" in micro
    q35 = " ".join(_vm(tmp_path, machine="q35").argv())
    assert "-M q35,memory-backend=mem" in q35
    assert "vhost-user-fs-pci" in q35
    assert "virtio-serial-pci" in q35
    assert "debug.console.0" not in micro
    console = _vm(tmp_path, debug_console=True)
    argv = " ".join(console.argv())
    assert f"socket,id=dbgcon,path={console.debug_console_path},server=on,wait=off" in argv
    assert "virtserialport,bus=vser0.0,chardev=dbgcon,name=debug.console.0" in argv


async def test_virtiofsd_death_ends_the_vm(tmp_path: Path, nursery: trio.Nursery) -> None:
    vm = _vm(tmp_path)
    await vm.start(nursery)
    try:
        assert vm.virtiofsd_pid is not None
        os.kill(vm.virtiofsd_pid, signal.SIGKILL)
        with trio.fail_after(10):
            await vm.wait_exited()
    finally:
        await vm.shutdown()
    assert vm_processes(vm.vm_id) == []
