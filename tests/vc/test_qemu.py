"""The QEMU launcher with real QEMU (TCG here), real virtiofsd, the real guest image."""

from __future__ import annotations

import os
import re
import shutil
import signal
import uuid
from pathlib import Path

import pytest
import trio

from shimv2.errdefs import FailedPrecondition, InvalidArgument
from shimv2.vc.agent import connect_agent
from shimv2.vc.console import CONSOLE_LIMIT
from shimv2.vc.qemu import Qemu
from shimv2.vc.qemu_config import TCG_TB_SIZE_MIB, QemuConfig
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
        # QEMU runs under its seccomp filter (-sandbox on): mode 2, a filter.
        assert "\nSeccomp:\t2\n" in Path(f"/proc/{vm.pid}/status").read_text()
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
    # Whatever the caller: nothing that would split, cut or truncate the kernel command line.
    for params in (("a\nb",), ("a\x00b",), ("",), ("a b",), ("x" * 2048,)):
        vm = _vm(tmp_path, kernel_params=params)
        try:
            with pytest.raises(InvalidArgument, match="kernel"):
                await vm.start(nursery)
        finally:
            await vm.shutdown()  # had it started
    assert vm_processes(vm.vm_id) == []


async def test_command_line_for_both_machines(tmp_path: Path) -> None:
    micro = " ".join(_vm(tmp_path).argv())
    assert "-M microvm,pcie=on" in micro  # RAM around the root image (tests/vc/test_root_image.py)
    assert "vhost-user-fs-device,chardev=vfs,tag=kataShared" in micro
    assert "virtio-mmio.force-legacy=false" in micro
    assert "name=agent.channel.0" in micro
    # Its serial ports on that PCIe bus: on virtio-mmio each port's receive ring is
    # 1024 guest buffers of 4 KiB. virtio-fs fills no ring ahead and stays on mmio.
    assert "-device virtio-serial-pci,bus=pcie.0,id=vser0" in micro
    no_bus = " ".join(_vm(tmp_path, image="").argv())
    assert "pcie=on" not in no_bus
    assert "-device virtio-serial-device,id=vser0" in no_bus
    q35 = " ".join(_vm(tmp_path, machine="q35").argv())
    assert "-M q35,memory-backend=mem" in q35
    assert "vhost-user-fs-pci" in q35
    assert "virtio-serial-pci" in q35
    assert "debug.console.0" not in micro
    sandbox = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    for argv in (micro, q35):
        assert f"-sandbox {sandbox}" in argv
        assert "mitigations=off" not in argv  # the guest keeps its mitigations by default
        assert "nokaslr" not in argv
    fast = " ".join(_vm(tmp_path, disable_mitigations=True).argv())
    assert "mitigations=off nokaslr" in fast
    console = _vm(tmp_path, debug_console=True)
    argv = " ".join(console.argv())
    assert f"socket,id=dbgcon,path={console.debug_console_path},server=on,wait=off" in argv
    assert "virtserialport,bus=vser0.0,chardev=dbgcon,name=debug.console.0" in argv


def _arg(argv: list[str], flag: str) -> str:
    """The value of ``flag`` (which must appear exactly once)."""
    assert argv.count(flag) == 1, argv
    return argv[argv.index(flag) + 1]


async def test_translation_cache_and_ksm_on_the_command_line(tmp_path: Path) -> None:
    for machine in ("microvm", "q35"):
        vm = _vm(tmp_path, machine=machine)
        argv = vm.argv()  # no accelerator chosen yet: TCG
        assert _arg(argv, "-accel") == f"tcg,tb-size={TCG_TB_SIZE_MIB}"
        assert _arg(argv, "-M").endswith(",mem-merge=off")  # QEMU's default is on
        vm.accelerator = "kvm"
        argv = vm.argv()
        assert _arg(argv, "-accel") == "kvm"  # the cache is TCG's alone
        assert not any("tb-size" in a for a in argv)
        merging = _vm(tmp_path, machine=machine, ksm=True, tcg_tb_size=32)
        argv = merging.argv()
        assert _arg(argv, "-M").endswith(",mem-merge=on")
        assert "mem-merge=off" not in " ".join(argv)
        assert _arg(argv, "-accel") == "tcg,tb-size=32"


async def test_a_balloon_for_free_page_reporting_only(tmp_path: Path) -> None:
    for machine, device in (("microvm", "virtio-balloon-device"), ("q35", "virtio-balloon-pci")):
        argv = _vm(tmp_path, machine=machine).argv()
        assert f"{device},free-page-reporting=on" in argv
        assert sum("virtio-balloon" in a for a in argv) == 1
        argv = _vm(tmp_path, machine=machine, free_page_reporting=False).argv()
        assert not any("virtio-balloon" in a for a in argv)


async def test_the_guest_runs_in_the_default_size(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Booted to its agent with the default translation cache and RAM, and no more RAM."""
    vm = _vm(tmp_path, debug_console=True, kernel_params=("kata_py.debug_console=1",))
    await vm.start(nursery)
    try:
        async with connect_agent(vm.agent_endpoint(), ready_timeout=90):
            out = await _guest_shell(vm, "grep MemTotal /proc/meminfo")
            inodes = await _guest_shell(vm, "grep '^inode_cache ' /proc/slabinfo")
        assert vm.pid is not None
        argv = Path(f"/proc/{vm.pid}/cmdline").read_bytes().decode().split("\0")
        if vm.accelerator == "tcg":
            assert _arg(argv, "-accel") == f"tcg,tb-size={TCG_TB_SIZE_MIB}"
        match = re.search(rb"MemTotal:\s+(\d+) kB", out)
        assert match is not None, out
        # What the kernel keeps for itself (its image, page tables) is not in MemTotal.
        memory = QemuConfig().memory_mib
        assert memory * 1024 * 0.75 < int(match[1]) <= memory * 1024
        # tracefs, when the kernel makes it, holds ~10,000 of these (8.6 MiB with dentries).
        match = re.search(rb"inode_cache\s+(\d+)", inodes)
        assert match is not None, inodes
        assert int(match[1]) < 2000, inodes
    finally:
        await vm.shutdown()
    assert vm_processes(vm.vm_id) == []


def _guest_ram_rss_mib(pid: int) -> float:
    """What QEMU holds of guest RAM (its memfd mappings), MiB."""
    rss, in_ram = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(None, 5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            in_ram = len(head) == 6 and head[5].startswith("/memfd:")
        elif in_ram and line.startswith("Rss:"):
            rss += int(line.split()[1])
    return rss / 1024


async def test_memory_the_guest_frees_goes_back_to_the_host(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    vm = _vm(tmp_path, debug_console=True, kernel_params=("kata_py.debug_console=1",))
    await vm.start(nursery)
    try:
        async with connect_agent(vm.agent_endpoint(), ready_timeout=90):
            drivers = await _guest_shell(vm, "ls /sys/bus/virtio/drivers")
            assert b"virtio_balloon" in drivers, "the guest image lacks virtio_balloon"
            assert vm.pid is not None
            before = _guest_ram_rss_mib(vm.pid)
            await _guest_shell(
                vm,
                "mkdir -p /tmp/fill && mount -t tmpfs fill /tmp/fill &&"
                " dd if=/dev/zero of=/tmp/fill/f bs=1M count=160 2>/dev/null;"
                " rm /tmp/fill/f; umount /tmp/fill",
            )
            # Reports go out about 2 s after the pages are freed.
            for _ in range(300):
                if _guest_ram_rss_mib(vm.pid) < before + 32:
                    break
                await trio.sleep(0.1)
            else:
                pytest.fail(
                    f"guest RAM held: {_guest_ram_rss_mib(vm.pid):.0f} MiB, {before:.0f} before"
                )
    finally:
        await vm.shutdown()
    assert vm_processes(vm.vm_id) == []


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


async def _guest_shell(vm: Qemu, script: str, timeout: float = 120) -> bytes:
    """Run ``script`` as root in the guest (its debug console); its output."""
    stream = await trio.open_unix_socket(str(vm.debug_console_path))
    async with stream:
        # The guest starts a shell when the host first speaks; the marker is
        # computed by the shell, so its echo of the command line cannot match.
        await stream.send_all(f"\n{script}; echo END-$((6*7))\n".encode())
        out = b""
        with trio.fail_after(timeout):
            while b"END-42" not in out:
                out += await stream.receive_some(65536)
    return out


async def test_a_guest_flooding_its_console_stays_capped_on_the_host(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    vm = _vm(tmp_path, debug_console=True, kernel_params=("kata_py.debug_console=1",))
    await vm.start(nursery)
    try:
        async with connect_agent(vm.agent_endpoint(), ready_timeout=90):
            flood = 5 * CONSOLE_LIMIT // 2
            await _guest_shell(
                vm,
                f"head -c {flood} /dev/zero | tr '\\0' x > /dev/ttyS0;"
                " echo LAST-WORDS > /dev/ttyS0",
            )
        for _ in range(100):  # the relay may lag the guest a little
            if b"LAST-WORDS" in vm.console_path.read_bytes():
                break
            await trio.sleep(0.1)
        else:
            pytest.fail("the guest's last words never reached console.log")
        sizes = {p.name: p.stat().st_size for p in vm.run_dir.glob("console.log*")}
        assert sizes.keys() == {"console.log", "console.log.1"}
        assert all(size <= CONSOLE_LIMIT for size in sizes.values()), sizes
        content = vm.console_path.read_bytes()
        assert b"x" * 4096 in content  # what was kept is the newest output
    finally:
        await vm.shutdown()
    assert vm_processes(vm.vm_id) == []
    assert not vm.run_dir.exists()


async def _console_shows(vm: Qemu, marker: bytes) -> bytes:
    for _ in range(100):  # the relay may lag the guest a little
        content = vm.console_path.read_bytes() if vm.console_path.exists() else b""
        if marker in content:
            return content
        await trio.sleep(0.1)
    pytest.fail(f"{marker!r} never reached console.log")


async def test_the_console_is_kept_again_after_a_shim_restart(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    first = _vm(tmp_path, debug_console=True, kernel_params=("kata_py.debug_console=1",))
    async with trio.open_nursery() as old_shim:
        await first.start(old_shim)
        async with connect_agent(first.agent_endpoint(), ready_timeout=90):
            await _guest_shell(first, "echo BEFORE-RESTART > /dev/ttyS0")
        await _console_shows(first, b"BEFORE-RESTART")
        await first.qmp.aclose()
        old_shim.cancel_scope.cancel()  # the shim dies; QEMU goes on
    assert first.pid is not None
    assert vm_processes(first.vm_id)
    try:
        vm = await Qemu.adopt(
            first.vm_id,
            first.config,
            first.run_dir,
            first.pid,
            first.virtiofsd_pid or 0,
            0,
            nursery,
            start_time=first.start_time,
            virtiofsd_start_time=first.virtiofsd_start_time,
            channel=first.channel or "",
            vsock_backend_pid=first.vsock_backend_pid or 0,
            vsock_backend_start_time=first.vsock_backend_start_time,
        )
    except BaseException:  # never leave the first VM behind
        for pid in (first.pid, first.virtiofsd_pid, first.vsock_backend_pid):
            if pid:
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(first.run_dir, ignore_errors=True)
        raise
    try:
        await _guest_shell(vm, "echo AFTER-RESTART > /dev/ttyS0")
        content = await _console_shows(vm, b"AFTER-RESTART")
        assert content.index(b"BEFORE-RESTART") < content.index(b"AFTER-RESTART")  # appended
    finally:
        await vm.shutdown()
    assert vm_processes(vm.vm_id) == []
    assert not vm.run_dir.exists()
