"""The guest root as a read-only erofs image mapped with DAX, and the initramfs fallback.

The VM tests boot the real guest under TCG: on each machine the root is the
image on /dev/pmem0, mounted ``dax=always``, and a guest writing to /dev/pmem0
changes nothing on the host. The others check the command line and the
configuration keys (``image``, ``image_initrd``, ``initrd``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import trio

from shimv2.errdefs import FailedPrecondition, InvalidArgument
from shimv2.vc.agent import connect_agent
from shimv2.vc.config import HypervisorConfig, parse_config
from shimv2.vc.qemu import Qemu
from shimv2.vc.qemu_config import QemuConfig, default_guest_dir
from tests.leaks import vm_processes
from tests.vc.test_qemu import _guest_shell, _vm

GUEST = default_guest_dir()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_microvm_puts_the_image_between_two_parts_of_guest_ram(tmp_path: Path) -> None:
    size = (GUEST / "root.erofs").stat().st_size >> 20
    argv = " ".join(_vm(tmp_path, memory_mib=512).argv())
    assert f"-m {512 + size}M " in argv
    assert "-object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem" in argv
    assert (
        f"-object memory-backend-file,id=rootimg,mem-path={GUEST / 'root.erofs'},size={size}M,"
        "share=on,readonly=on -numa node,memdev=rootimg"
    ) in argv
    assert "-object memory-backend-memfd,id=mem1,size=256M,share=on -numa node,memdev=mem1" in argv
    assert f"memmap={size}M!256M" in argv  # the same range, made pmem for the guest
    assert "-M microvm,pcie=on" in argv
    assert "memory-backend=mem" not in argv
    assert f"-initrd {GUEST / 'image-initrd.img'}" in argv
    # without virtio-fs, plain RAM
    vm = Qemu("t-plain", QemuConfig(memory_mib=1024), tmp_path / "run")
    argv = " ".join(vm.argv())
    assert "memory-backend-ram,id=mem,size=512M -numa" in argv
    assert "memory-backend-ram,id=mem1,size=512M -numa" in argv


def test_q35_attaches_the_image_as_virtio_pmem(tmp_path: Path) -> None:
    size = (GUEST / "root.erofs").stat().st_size >> 20
    argv = " ".join(_vm(tmp_path, machine="q35", memory_mib=512, max_memory_mib=2048).argv())
    assert f"-m 512M,slots=8,maxmem={2048 + size}M " in argv  # hotplug room unchanged
    assert "share=on,readonly=on -device virtio-pmem-pci,memdev=rootimg,id=rootpmem" in argv
    assert "-M q35,memory-backend=mem" in argv
    assert "memmap=" not in argv


def test_without_an_image_the_initrd_holds_the_root(tmp_path: Path) -> None:
    initrd = str(GUEST / "initrd.img")
    for machine in ("microvm", "q35"):
        argv = " ".join(_vm(tmp_path, machine=machine, image="", initrd=initrd).argv())
        assert f"-initrd {initrd}" in argv
        assert "rootimg" not in argv
        assert "memmap=" not in argv
        assert "-numa" not in argv
        assert f"-M {machine},memory-backend=mem" in argv
    argv = " ".join(_vm(tmp_path, image="", initrd=initrd, memory_mib=512).argv())
    assert "-m 512M " in argv  # the guest's RAM alone


def test_an_image_that_is_not_whole_sections_is_refused(tmp_path: Path) -> None:
    odd = tmp_path / "odd,name.erofs"
    odd.write_bytes(b"\0" * 4096)
    with pytest.raises(FailedPrecondition, match="multiple of 128 MiB"):
        _vm(tmp_path, image=str(odd)).config.validate()
    with pytest.raises(FailedPrecondition, match="missing"):
        _vm(tmp_path, image=str(tmp_path / "absent")).config.validate()
    # A comma in the path is escaped for QEMU's option syntax.
    with odd.open("r+b") as f:
        f.truncate(128 << 20)
    assert "mem-path=" + str(odd).replace(",", ",,") + ",size=128M" in " ".join(
        _vm(tmp_path, image=str(odd)).argv()
    )


def test_config_image_and_initrd_exclude_each_other() -> None:
    default = parse_config("")
    assert default.hypervisor.image == str(GUEST / "root.erofs")
    assert default.hypervisor.image_initrd == str(GUEST / "image-initrd.img")
    assert default.hypervisor.initrd == ""
    qemu = default.qemu(None)
    assert (qemu.image, qemu.initrd) == (str(GUEST / "root.erofs"), str(GUEST / "image-initrd.img"))
    # as in Kata: naming only an initrd boots the root from it
    fallback = parse_config('[hypervisor.qemu]\ninitrd = "/g/initrd.img"\n')
    assert (fallback.hypervisor.image, fallback.hypervisor.initrd) == ("", "/g/initrd.img")
    assert (fallback.qemu(None).image, fallback.qemu(None).initrd) == ("", "/g/initrd.img")
    custom = parse_config('[hypervisor.qemu]\nimage = "/g/r.erofs"\nimage_initrd = "/g/m.img"\n')
    assert (custom.qemu(None).image, custom.qemu(None).initrd) == ("/g/r.erofs", "/g/m.img")
    with pytest.raises(InvalidArgument, match="mutually exclusive"):
        parse_config('[hypervisor.qemu]\nimage = "/g/r.erofs"\ninitrd = "/g/i.img"\n')
    with pytest.raises(InvalidArgument, match="needs an image or an initrd"):
        parse_config('[hypervisor.qemu]\nimage = ""\n')
    with pytest.raises(InvalidArgument, match="mutually exclusive"):
        HypervisorConfig(initrd="/g/i.img").qemu(None)
    with pytest.raises(InvalidArgument, match="unknown key"):
        parse_config('[hypervisor.qemu]\nrootfs_image = "/g/r.erofs"\n')


@pytest.mark.vm
@pytest.mark.parametrize("machine", ["microvm", "q35"])
async def test_the_root_is_a_dax_erofs_the_guest_cannot_write(
    tmp_path: Path, nursery: trio.Nursery, machine: str
) -> None:
    # A copy of our own: a rebuild of build/guest while the test runs cannot change it.
    image = tmp_path / "root.erofs"
    await trio.run_process(["cp", "--sparse=always", str(GUEST / "root.erofs"), str(image)])
    before = _digest(image)
    vm = _vm(
        tmp_path,
        machine=machine,
        image=str(image),
        debug_console=True,
        kernel_params=("kata_py.debug_console=1",),
    )
    await vm.start(nursery)
    try:
        async with connect_agent(vm.agent_endpoint(), ready_timeout=90):
            out = await _guest_shell(
                vm,
                "grep ' / ' /proc/mounts; echo dax=$(cat /sys/block/pmem0/queue/dax);"
                " for d in /tmp /etc /var /root; do touch $d/w && echo rw:$d; done;"
                " touch /usr/w 2>/dev/null || echo ro:$(echo /usr);"
                " dd if=/dev/zero of=/dev/pmem0 bs=1M count=4 conv=fsync 2>&1;"
                " echo 3 > /proc/sys/vm/drop_caches;"
                ' python3.11 -c \'print("py", "alive")\'',
            )
        text = out.decode(errors="replace")
        root = next(line for line in text.splitlines() if line.startswith("/dev/pmem0 / "))
        fstype, options = root.split()[2:4]
        assert fstype == "erofs"
        assert "ro" in options.split(","), root
        assert "dax=always" in options.split(","), root
        assert "dax=1" in text
        assert all(f"rw:{d}" in text for d in ("/tmp", "/etc", "/var", "/root")), text
        assert "ro:/usr" in text
        assert "py alive" in text  # the root still reads back whole after the write
        console = vm.console_path.read_text(errors="replace")
        assert "KATA_PY_ROOT_MOUNTED" in console
        assert "KATA_PY_ROOT_FAIL" not in console
    finally:
        await vm.shutdown()
    assert _digest(image) == before  # readonly=on: the host file is untouched
    assert vm_processes(vm.vm_id) == []


@pytest.mark.vm
async def test_the_initramfs_fallback_boots(tmp_path: Path, nursery: trio.Nursery) -> None:
    vm = _vm(
        tmp_path,
        image="",
        initrd=str(GUEST / "initrd.img"),
        debug_console=True,
        kernel_params=("kata_py.debug_console=1",),
    )
    await vm.start(nursery)
    try:
        async with connect_agent(vm.agent_endpoint(), ready_timeout=90):
            out = await _guest_shell(
                vm, "echo pmem-mounts=$(grep -c pmem /proc/mounts); ls /dev/pmem0 2>&1"
            )
        text = out.decode(errors="replace")
        assert "pmem-mounts=0" in text, text
        assert "No such file" in text
        assert "KATA_PY_ROOT_MOUNTED" not in vm.console_path.read_text(errors="replace")
    finally:
        await vm.shutdown()
    assert vm_processes(vm.vm_id) == []
