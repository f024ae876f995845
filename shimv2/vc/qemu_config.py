"""QEMU's configuration for one VM, and the constants its command line is built from.

Apart from ``shimv2.vc.qemu`` so that readers of the configuration (the TOML
config, ``delete``, templates' keys) do not load what runs a VM.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from shimv2.errdefs import FailedPrecondition, InvalidArgument

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
# The agent channel's transports (``shimv2.vc.vsock``); "auto": the best this host has.
CHANNELS = ("auto", "serial", "vsock", "hybrid-vsock")
VSOCK_BACKEND = "vhost-device-vsock"
VHOST_VSOCK = "/dev/vhost-vsock"
SHARED_TAG = "kataShared"
# Trimmed kernel command line measured in the VM recipe; tsc_early_khz keeps
# microvm from hanging while it calibrates the TSC under TCG. No tracefs: Linux 6.1
# makes an inode and a dentry for each of its ~10,000 files at boot, 8.6 MiB of
# every guest's RAM (6.6 makes them on demand); nothing in a pod's VM traces.
FAST_PARAMS = (
    "console=ttyS0", "quiet", "loglevel=0", "tsc=reliable", "no_timer_check",
    "cryptomgr.notests", "random.trust_cpu=on", "8250.nr_uarts=1", "panic=-1",
    "initcall_blacklist=tracer_init_tracefs",
)  # fmt: skip
# Only if the operator asks: the guest keeps its default CPU mitigations.
NO_MITIGATIONS = ("mitigations=off", "nokaslr")
COMMAND_LINE_SIZE = 2048  # x86's, with the final NUL
SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
ACCEL_CACHE = Path("/run/kata-py/accel.json")
HOTPLUG_PORTS = 4  # PCIe root ports free for device hotplug (q35, or late devices)
# A late vsock device's port: the last, so NICs keep rp1 and up.
LATE_VSOCK_PORT = f"rp{HOTPLUG_PORTS - 1}"
RESTORE_TIMEOUT = 20.0  # seconds to load a template's state (~0.02 s measured)
# TCG's translation cache, MiB: QEMU 7.2 reserves 1 GiB, fills ~94 MiB by the
# time a container runs, and keeps it. Full, it is flushed and refilled: at 48
# MiB start time did not change measurably (paired runs), at 32 +0.7 s, at 16
# +5 s (README).
TCG_TB_SIZE_MIB = 48
# Guest RAM when a pod states no memory limit. Only what the guest touches costs
# the host (~100 MiB at 128, 256 or 512 MiB: the RAM size barely matters), and
# 256 MiB leaves ~150 MiB free beside the agent and crun.
DEFAULT_MEMORY_MIB = 256
MEMORY_SLOTS = 8  # q35 only: DIMM slots for memory hotplug
# The root image is mapped as persistent memory (``Qemu._image_args``). Its size is
# whole 128 MiB memory blocks: on q35 it comes first in the hotplug area, and Linux
# takes a hotplugged DIMM only on a block boundary. microvm puts it below 4 GiB,
# after some guest RAM whose size is whole 2 MiB sections, what pmem maps.
IMAGE_ALIGN_MIB = 128
IMAGE_MAX_MIB = 1024
LOW_RAM_ALIGN_MIB = 2
LOW_RAM_MAX_MIB = 1024


def default_backend() -> str:
    """``vhost-device-vsock`` as scripts/setup builds it (build/bin), else on PATH; "" if none."""
    built = Path(__file__).resolve().parents[2] / "build" / "bin" / VSOCK_BACKEND
    if os.access(built, os.X_OK):
        return str(built)
    return shutil.which(VSOCK_BACKEND) or ""


def resolve_channel(requested: str, backend: str, vhost_vsock: str = VHOST_VSOCK) -> str:
    """The transport to use: ``requested``, or for ``auto`` the best this host has."""
    if requested != "auto":
        return requested
    if os.path.exists(vhost_vsock):
        return "vsock"
    if backend and os.access(backend, os.X_OK):
        return "hybrid-vsock"
    return "serial"


def default_guest_dir() -> Path:
    env = os.environ.get("KATA_PY_GUEST_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "build" / "guest"


def host_tsc_khz() -> int:
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError, IndexError):
        pass
    return 2_100_000


def image_mib(path: str) -> int:
    """The size of a root image in MiB: whole 128 MiB blocks, at most 1 GiB."""
    try:
        size = os.stat(path).st_size
    except OSError:
        raise FailedPrecondition(
            f"guest image file missing: {path} (run scripts/build-guest)"
        ) from None
    if not 0 < size <= IMAGE_MAX_MIB << 20 or size % (IMAGE_ALIGN_MIB << 20):
        raise FailedPrecondition(
            f"root image {path}: {size} bytes, not a multiple of {IMAGE_ALIGN_MIB} MiB up to "
            f"{IMAGE_MAX_MIB} MiB (scripts/build-guest pads it)"
        )
    return size >> 20


_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_NETDEV_ID = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")


@dataclass(frozen=True, slots=True)
class Nic:
    """A pod NIC: a tap QEMU gets as fd ``fd``, and the guest device's MAC.

    Rendered here, as launch arguments or as a hotplug after a restore, so no
    one parses QEMU argument strings back.
    """

    netdev_id: str
    fd: int
    mac: str

    def validate(self) -> None:
        # Both reach QEMU's option strings: a comma would add options.
        if not _NETDEV_ID.fullmatch(self.netdev_id) or not _MAC.fullmatch(self.mac):
            raise InvalidArgument(f"bad NIC: id {self.netdev_id!r}, MAC {self.mac!r}")
        if self.fd < 0:
            raise FailedPrecondition(f"NIC {self.netdev_id}: its tap has no open fd")

    def netdev_args(self) -> list[str]:
        return ["-netdev", f"tap,id={self.netdev_id},fd={self.fd}"]

    def device_args(self, machine: str, pci_bus: str = "") -> list[str]:
        """On ``pci_bus`` if given (a microvm's pcie.0), else as the machine has it."""
        if machine == "microvm" and not pci_bus:
            return ["-device", f"virtio-net-device,netdev={self.netdev_id},mac={self.mac}"]
        # romfile= skips the iPXE option ROM: the guest never network-boots.
        bus = f",bus={pci_bus}" if pci_bus else ""
        return ["-device", f"virtio-net-pci,netdev={self.netdev_id},mac={self.mac},romfile={bus}"]

    def device_add(self, bus: str) -> dict[str, object]:
        """QMP ``device_add`` arguments for plugging it on root port ``bus``."""
        return {"driver": "virtio-net-pci", "bus": bus, "netdev": self.netdev_id,
                "mac": self.mac, "romfile": ""}  # fmt: skip


@dataclass(frozen=True, slots=True)
class QemuConfig:
    kernel: str = field(default_factory=lambda: str(default_guest_dir() / "vmlinux"))
    # The initramfs the kernel boots: with ``image``, the small one that mounts it
    # (guest/image-init); without, the whole guest root.
    initrd: str = field(default_factory=lambda: str(default_guest_dir() / "image-initrd.img"))
    # The guest root, a read-only erofs image the guest maps with DAX: one copy in
    # the host's page cache for every VM. "" = the whole root is in ``initrd``.
    image: str = field(default_factory=lambda: str(default_guest_dir() / "root.erofs"))
    binary: str = "qemu-system-x86_64"
    machine: str = "microvm"
    accelerator: str = "auto"
    vcpus: int = 1
    memory_mib: int = DEFAULT_MEMORY_MIB
    # Headroom for hotplug (q35 only): vCPUs and MiB the VM may grow to.
    max_vcpus: int = 4
    max_memory_mib: int = 4096
    tcg_tb_size: int = TCG_TB_SIZE_MIB  # MiB; only when the accelerator is TCG
    # Guest RAM marked mergeable for the host's KSM (QEMU's mem-merge, on unless
    # turned off): an opt-in, as merging lets one guest time another's pages.
    ksm: bool = False
    # A balloon that only takes free-page reports: the guest hands back what it
    # frees, in 2 MiB blocks or more, instead of QEMU holding it until the VM exits.
    free_page_reporting: bool = True
    kernel_params: tuple[str, ...] = ()
    disable_mitigations: bool = False  # mitigations=off nokaslr, for speed over isolation
    # Directory exported to the guest over virtio-fs; None = no virtio-fs.
    shared_dir: str | None = None
    virtiofsd: str = VIRTIOFSD
    # The mount namespace that holds the shared dir's mounts (the pod's): virtiofsd joins it.
    shared_dir_mount_ns: str = ""
    # auto | vsock | hybrid-vsock | serial: ``shimv2.vc.vsock``
    agent_channel: str = "auto"
    vsock_backend: str = field(default_factory=default_backend)  # for hybrid-vsock
    # A virtio-serial port for the guest's debug shell (``kata-py exec``).
    debug_console: bool = False
    # The pod's NICs: each a tap QEMU gets as an open fd (same number).
    nics: tuple[Nic, ...] = ()
    # The sandbox's cgroup (its cgroup.procs files): QEMU and virtiofsd start in it.
    cgroup: tuple[str, ...] = ()
    # Guest RAM as files in this directory (tmpfs), mapped shared: a template's
    # RAM, or a clone's own copy of it (``shimv2.vc.template``).
    memory_dir: str | None = None
    # A template's saved device state: QEMU starts paused and loads it (a clone).
    incoming: str | None = None
    # virtio-fs and NICs are plugged after start, on PCIe root ports (templates
    # and clones: neither can be in a migrated VM); only the NICs' taps are
    # on the command line then.
    late_devices: bool = False

    def validate(self) -> None:
        if self.machine not in ("microvm", "q35"):
            raise InvalidArgument(f"machine must be microvm or q35, not {self.machine!r}")
        if self.agent_channel not in CHANNELS:
            raise InvalidArgument(
                f"agent channel must be one of {', '.join(CHANNELS)}: {self.agent_channel!r}"
            )
        if not 1 <= self.vcpus <= 64 or not 128 <= self.memory_mib <= 262144:
            raise InvalidArgument(f"bad VM size: {self.vcpus} vCPUs, {self.memory_mib} MiB")
        if not 1 <= self.tcg_tb_size <= 4096:
            raise InvalidArgument(f"bad TCG translation cache size: {self.tcg_tb_size} MiB")
        for param in self.kernel_params:
            # One word each: no separator, NUL or newline to split the command line.
            if not param or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in param):
                raise InvalidArgument(f"bad kernel parameter {param!r}")
        for path in (self.kernel, self.initrd):
            if not os.path.isfile(path):
                raise FailedPrecondition(
                    f"guest image file missing: {path} (run scripts/build-guest)"
                )
        if self.image:
            image_mib(self.image)
        # One port is virtio-fs's, and one a late vsock device's (any channel but serial).
        nic_ports = HOTPLUG_PORTS - 1 - (self.agent_channel != "serial")
        if self.late_devices and len(self.nics) > nic_ports:
            raise InvalidArgument(f"at most {nic_ports} NICs can be plugged late")
        if self.incoming and not self.late_devices:
            raise InvalidArgument("a clone's devices are plugged late (late_devices)")
        for nic in self.nics:
            nic.validate()
        if shutil.which(self.binary) is None:
            raise FailedPrecondition(f"hypervisor binary not found: {self.binary}")
