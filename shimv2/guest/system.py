"""The sandbox rpcs (CreateSandbox, DestroySandbox, GetGuestDetails, OnlineCPUMem,
ReseedRandomDev, SetGuestDateTime) and the guest setup steps the agent runs at boot.

Every side effect on the machine goes through ``GuestOS``, so that tests on
the host use ``shimv2.guest.testing.FakeGuestOS`` instead of renaming the
host or mounting on it. Semantics follow the Kata agent (src/agent/src/rpc.rs,
sandbox.rs): one sandbox per VM, storages mounted before containers use them.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import logging
import os
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from google.protobuf.empty_pb2 import Empty

from shimv2.aio import move_on_after
from shimv2.errdefs import AlreadyExists, FailedPrecondition, Internal, InvalidArgument
from shimv2.pb.kata import agent_pb2
from shimv2.ttrpc import CallContext

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"
SHARED_TAG = "kataShared"
SHARED_MOUNT = "/run/kata-containers/shared/containers"
MODULES_LIST = "/etc/kata-py/modules"
ONLINE_WAIT = 10.0  # seconds OnlineCPUMem waits for hotplugged CPUs and memory to appear
MOUNT_WAIT = 10.0  # seconds CreateSandbox waits for a hot-plugged virtio-fs device's tag
MOUNT_RETRY = 0.02  # seconds between two tries of such a mount
MAX_ENTROPY = 4096  # bytes ReseedRandomDev accepts at once
STORAGE_HANDLERS = ("virtio-fs",)
DEVICE_HANDLERS: tuple[str, ...] = ()

_PR_SET_CHILD_SUBREAPER = 36
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_MS_NODEV = 0x4
_MS_NOSUID = 0x2
_MNT_DETACH = 0x2
_SYS_FINIT_MODULE = 313  # x86_64
_RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
_RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
# A virtio-fs tag that is not probed yet: "virtio-fs: tag <x> not found" and EINVAL.
_MOUNT_NOT_YET = (errno.EINVAL, errno.ENOENT)


class GuestOS:
    """The guest machine's side effects, one small method each (the test seam)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def set_hostname(self, name: str) -> None:
        socket.sethostname(name)

    def read_text(self, path: str) -> str:
        return Path(path).read_text()

    def write_text(self, path: str, data: str) -> None:
        Path(path).write_text(data)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def symlink(self, target: str, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.islink(path):
            os.unlink(path)
        os.symlink(target, path)

    def is_mountpoint(self, path: str) -> bool:
        try:
            lines = Path("/proc/self/mountinfo").read_text().splitlines()
        except OSError:
            return os.path.ismount(path)
        target = os.path.realpath(path)
        return any(line.split()[4] == target for line in lines if len(line.split()) > 4)

    def mount(self, source: str, target: str, fstype: str, flags: int, data: str) -> None:
        rc = self._libc.mount(
            source.encode(), target.encode(), fstype.encode(), flags, data.encode() or None
        )
        self._check(rc, f"mount {source} on {target} ({fstype})")

    def umount(self, target: str) -> None:
        self._check(self._libc.umount2(target.encode(), _MNT_DETACH), f"umount {target}")

    def load_module(self, path: str, params: str = "") -> bool:
        """finit_module(2); False when the module was already loaded."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            rc = self._libc.syscall(_SYS_FINIT_MODULE, fd, params.encode(), 0)
        finally:
            os.close(fd)
        if rc != 0:
            err = ctypes.get_errno()
            if err == errno.EEXIST:
                return False
            raise OSError(err, f"finit_module {path}: {os.strerror(err)}")
        return True

    def set_link_up(self, name: str) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            req = struct.pack("16sH14x", name.encode(), 0)
            flags = struct.unpack_from("16sH", fcntl.ioctl(sock, _SIOCGIFFLAGS, req))[1]
            req = struct.pack("16sH14x", name.encode(), flags | _IFF_UP)
            fcntl.ioctl(sock, _SIOCSIFFLAGS, req)

    def set_child_subreaper(self) -> None:
        self._check(self._libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl")

    def kernel_release(self) -> str:
        return os.uname().release

    def add_entropy(self, data: bytes) -> None:
        """Mix ``data`` into the kernel's pool, credited, then reseed the CRNG at once:
        a VM cloned from a snapshot would otherwise keep its template's CRNG state."""
        fd = os.open("/dev/random", os.O_WRONLY | os.O_CLOEXEC)
        what = "RNDADDENTROPY"
        try:
            # A mutable buffer: fcntl copies anything else into 1024 bytes, and refuses more.
            fcntl.ioctl(fd, _RNDADDENTROPY, rand_pool_info(data), True)
            what = "RNDRESEEDCRNG"
            fcntl.ioctl(fd, _RNDRESEEDCRNG)
        except OSError as exc:
            raise OSError(exc.errno, f"{what} on /dev/random: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def reseed_random(self) -> None:
        """Reseed the ``random`` module: the clone has its template's state too."""
        random.seed(os.urandom(32))

    def set_realtime(self, sec: int, usec: int) -> None:
        time.clock_settime_ns(time.CLOCK_REALTIME, sec * 1_000_000_000 + usec * 1000)


def rand_pool_info(data: bytes) -> bytearray:
    """struct rand_pool_info: entropy_count (bits), buf_size (bytes), then the bytes."""
    return bytearray(struct.pack("ii", len(data) * 8, len(data)) + data)


# -- guest setup at boot: each step bounded by what it does, failures logged ------


def load_listed_modules(guest: GuestOS, listing: str = MODULES_LIST) -> int:
    """insmod every module named in ``listing`` (one path a line, in order); count new."""
    try:
        paths = [p.strip() for p in guest.read_text(listing).splitlines()]
    except OSError as exc:
        log.info("no module list %s: %s", listing, exc)
        return 0
    loaded = 0
    for path in filter(None, paths):
        try:
            loaded += guest.load_module(path)
        except OSError as exc:
            log.warning("module %s: %s", path, exc)
    return loaded


def link_virtio_ports(
    guest: GuestOS, sys_ports: str = "/sys/class/virtio-ports", dev: str = "/dev"
) -> list[str]:
    """Create /dev/virtio-ports/<name> -> ../vportXpY (udev's job, absent in the guest)."""
    made: list[str] = []
    try:
        ports = guest.listdir(sys_ports)
    except OSError:
        return made
    for port in ports:
        try:
            name = guest.read_text(f"{sys_ports}/{port}/name").strip()
            if name:
                guest.symlink(f"../{port}", f"{dev}/virtio-ports/{name}")
                made.append(name)
        except OSError as exc:
            log.warning("virtio port %s: %s", port, exc)
    return made


def mount_shared(guest: GuestOS, tag: str = SHARED_TAG, target: str = SHARED_MOUNT) -> bool:
    """Mount the virtio-fs share ``tag`` at ``target`` when a virtio-fs device exists."""
    driver = "/sys/bus/virtio/drivers/virtiofs"
    try:
        if not any(e.startswith("virtio") for e in guest.listdir(driver)):
            log.info("no virtio-fs device; %s not mounted", target)
            return False
    except OSError:
        log.info("no virtio-fs driver; trying the mount of %s anyway", tag)
    try:
        mount_storage(guest, "virtiofs", tag, target, ())
    except OSError as exc:
        log.warning("mount %s on %s: %s", tag, target, exc)
        return False
    return True


def mount_storage(
    guest: GuestOS, fstype: str, source: str, target: str, options: Sequence[str]
) -> bool:
    """Mount unless ``target`` is already a mount point; True when mounted now."""
    guest.makedirs(target)
    if guest.is_mountpoint(target):
        return False
    guest.mount(source, target, fstype, _MS_NODEV | _MS_NOSUID, ",".join(options))
    return True


class SetupReport:
    """What ``guest_setup`` did. A plain class: a dataclass costs the agent's start ~10 ms
    under TCG, and the dataclasses module more."""

    def __init__(self) -> None:
        self.modules = 0
        self.lo_up = False
        self.ports: list[str] = []
        self.shared = False
        self.subreaper = False
        self.errors: list[str] = []
        # Seconds each step took: where a boot's setup time goes (logged by the agent).
        self.seconds: dict[str, float] = {}

    def timings(self) -> str:
        return ", ".join(f"{what} {secs:.3f}" for what, secs in self.seconds.items())


def guest_setup(guest: GuestOS, *, modules_list: str = MODULES_LIST) -> SetupReport:
    """The boot steps before the channel opens. None is fatal: each failure is logged."""
    report = SetupReport()

    def step(what: str, fn: Callable[[], None]) -> bool:
        started = time.monotonic()
        try:
            fn()
        except Exception as exc:
            log.warning("setup: %s failed: %s", what, exc)
            report.errors.append(f"{what}: {exc}")
            return False
        finally:
            report.seconds[what] = time.monotonic() - started
        return True

    def modules() -> None:
        report.modules = load_listed_modules(guest, modules_list)

    def ports() -> None:
        report.ports = link_virtio_ports(guest)

    def shared() -> None:
        report.shared = mount_shared(guest)

    step("modules", modules)
    report.lo_up = step("lo up", lambda: guest.set_link_up("lo"))
    step("virtio ports", ports)
    step("shared fs", shared)
    report.subreaper = step("child subreaper", guest.set_child_subreaper)
    return report


# -- the rpcs -------------------------------------------------------------------


def _module_path(guest: GuestOS, name: str, listing: str = MODULES_LIST) -> str:
    """Find ``name``'s .ko: first in the boot list, then under /lib/modules/<release>."""
    wanted = name.replace("-", "_")

    def matches(path: str) -> bool:
        base = os.path.basename(path).split(".ko")[0]
        return base.replace("-", "_") == wanted

    try:
        for line in guest.read_text(listing).splitlines():
            if line.strip() and matches(line.strip()):
                return line.strip()
    except OSError:
        pass
    root = f"/lib/modules/{guest.kernel_release()}"
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            if f.endswith(".ko") and matches(f):
                return os.path.join(dirpath, f)
    raise InvalidArgument(f"kernel module {name!r} not found")


DestroyCallback = Callable[[], Awaitable[None]]


class SandboxService:
    """CreateSandbox, DestroySandbox, GetGuestDetails, OnlineCPUMem, ReseedRandomDev
    and SetGuestDateTime."""

    def __init__(
        self,
        guest: GuestOS,
        *,
        init_daemon: bool = False,
        on_destroy: DestroyCallback | None = None,
        resolv_conf: str = "/etc/resolv.conf",
        sys_root: str = "/sys",
        mount_wait: float = MOUNT_WAIT,
    ) -> None:
        self._guest = guest
        self._init_daemon = init_daemon
        self._on_destroy = on_destroy
        self._resolv_conf = resolv_conf
        self._sys = sys_root
        self._mount_wait = mount_wait
        self._lock = asyncio.Lock()
        self.sandbox_id: str | None = None
        self.mounted: list[str] = []

    async def CreateSandbox(self, ctx: CallContext, req: agent_pb2.CreateSandboxRequest) -> Empty:
        async with self._lock:
            if self.sandbox_id is not None:
                raise AlreadyExists(f"sandbox {self.sandbox_id} already created")
            if not req.sandbox_id:
                raise InvalidArgument("sandbox_id is empty")
            try:
                await self._create(req)
            except OSError as exc:
                raise Internal(f"create sandbox {req.sandbox_id}: {exc}") from exc
            self.sandbox_id = req.sandbox_id
        log.info("sandbox %s created", req.sandbox_id)
        return Empty()

    async def _create(self, req: agent_pb2.CreateSandboxRequest) -> None:
        if req.hostname:
            self._guest.set_hostname(req.hostname)
        if req.dns:
            self._guest.write_text(self._resolv_conf, _resolv_conf(req.dns))
        for module in req.kernel_modules:
            path = _module_path(self._guest, module.name)
            self._guest.load_module(path, " ".join(module.parameters))
        for storage in req.storages:
            if storage.driver not in STORAGE_HANDLERS:
                raise InvalidArgument(f"unsupported storage driver {storage.driver!r}")
            if not storage.mount_point or not storage.source:
                raise InvalidArgument("storage needs a source and a mount_point")
            if await self._mount(storage):
                self.mounted.append(storage.mount_point)

    async def _mount(self, storage: agent_pb2.Storage) -> bool:
        fstype = storage.fstype or "virtiofs"
        args = (self._guest, fstype, storage.source, storage.mount_point, storage.options)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._mount_wait
        while True:
            try:
                return mount_storage(*args)
            except OSError as exc:
                # In a VM cloned from a snapshot, the virtio-fs device is hot-plugged just
                # after the restore: its tag shows up a few hundred ms later.
                if fstype != "virtiofs" or exc.errno not in _MOUNT_NOT_YET:
                    raise
                if loop.time() >= deadline:
                    raise
            await asyncio.sleep(MOUNT_RETRY)

    async def DestroySandbox(self, ctx: CallContext, req: agent_pb2.DestroySandboxRequest) -> Empty:
        async with self._lock:
            if self.sandbox_id is None:
                raise FailedPrecondition("no sandbox to destroy")
            if self._on_destroy is not None:
                await self._on_destroy()
            for target in reversed(self.mounted):
                try:
                    self._guest.umount(target)
                except OSError as exc:
                    log.warning("umount %s: %s", target, exc)
            self.mounted.clear()
            log.info("sandbox %s destroyed", self.sandbox_id)
            self.sandbox_id = None
        return Empty()

    async def GetGuestDetails(
        self, ctx: CallContext, req: agent_pb2.GuestDetailsRequest
    ) -> agent_pb2.GuestDetailsResponse:
        resp = agent_pb2.GuestDetailsResponse(
            agent_details=agent_pb2.AgentDetails(
                version=AGENT_VERSION,
                init_daemon=self._init_daemon,
                supports_seccomp=False,
                device_handlers=DEVICE_HANDLERS,
                storage_handlers=STORAGE_HANDLERS,
            )
        )
        memory = f"{self._sys}/devices/system/memory"
        if req.mem_block_size:
            try:
                resp.mem_block_size_bytes = int(
                    self._guest.read_text(f"{memory}/block_size_bytes").strip(), 16
                )
            except (OSError, ValueError) as exc:
                log.info("memory block size: %s", exc)
        if req.mem_hotplug_probe:
            resp.support_mem_hotplug_probe = self._guest.exists(f"{memory}/probe")
        return resp

    async def OnlineCPUMem(self, ctx: CallContext, req: agent_pb2.OnlineCPUMemRequest) -> Empty:
        # Hotplugged CPUs and DIMMs show up in sysfs a little after the host
        # plugged them (an ACPI event): with ``wait``, poll for them, bounded.
        cpu_root = f"{self._sys}/devices/system/cpu"
        mem_root = f"{self._sys}/devices/system/memory"
        cpus = self._online_all(cpu_root, "cpu", req.nb_cpus or None)
        mems = 0 if req.cpu_only else self._online_all(mem_root, "memory", None)
        # A DIMM's blocks appear one by one: once some have, until a poll finds no more.
        found = mems
        async with move_on_after(ONLINE_WAIT if req.wait else 0):
            while cpus < req.nb_cpus or (not req.cpu_only and (mems == 0 or found)):
                await asyncio.sleep(0.05)
                cpus += self._online_all(cpu_root, "cpu", (req.nb_cpus - cpus) or None)
                if not req.cpu_only:
                    found = self._online_all(mem_root, "memory", None)
                    mems += found
        if cpus < req.nb_cpus:
            raise Internal(f"onlined {cpus} of {req.nb_cpus} cpus")
        log.info("onlined %d cpus and %d memory blocks", cpus, mems)
        return Empty()

    async def ReseedRandomDev(
        self, ctx: CallContext, req: agent_pb2.ReseedRandomDevRequest
    ) -> Empty:
        if not req.data or len(req.data) > MAX_ENTROPY:
            raise InvalidArgument(
                f"random data must be 1 to {MAX_ENTROPY} bytes, not {len(req.data)}"
            )
        try:
            self._guest.add_entropy(req.data)
        except OSError as exc:
            raise Internal(f"reseed the random device: {exc}") from exc
        self._guest.reseed_random()  # after the CRNG's reseed: os.urandom is fresh now
        log.info("random device reseeded with %d bytes", len(req.data))
        return Empty()

    async def SetGuestDateTime(
        self, ctx: CallContext, req: agent_pb2.SetGuestDateTimeRequest
    ) -> Empty:
        # The kernel keeps the time in nanoseconds, in 64 bits.
        if not 0 < req.Sec < 2**63 // 1_000_000_000 or not 0 <= req.Usec < 1_000_000:
            raise InvalidArgument(f"bad date and time: sec {req.Sec}, usec {req.Usec}")
        try:
            self._guest.set_realtime(req.Sec, req.Usec)
        except OSError as exc:
            raise Internal(f"set the guest's clock: {exc}") from exc
        log.info("guest clock set to %d.%06d", req.Sec, req.Usec)
        return Empty()

    def _online_all(self, root: str, prefix: str, limit: int | None) -> int:
        done = 0
        try:
            entries = self._guest.listdir(root)
        except OSError as exc:
            raise Internal(f"list {root}: {exc}") from exc
        for entry in entries:
            if limit is not None and done >= limit:
                break
            if not (entry.startswith(prefix) and entry[len(prefix) :].isdigit()):
                continue
            online = f"{root}/{entry}/online"
            try:
                if self._guest.read_text(online).strip() == "0":
                    self._guest.write_text(online, "1")
                    done += 1
            except OSError as exc:
                log.debug("%s: %s", online, exc)  # cpu0 has no online file; that is fine
        return done


def _resolv_conf(dns: Sequence[str]) -> str:
    """Kata sends whole resolv.conf lines ("nameserver 10.0.0.1"); bare addresses also work."""
    lines = []
    for entry in dns:
        entry = entry.strip()
        if not entry:
            continue
        keyword = entry.split()[0]
        if keyword in ("nameserver", "search", "options", "domain", "sortlist"):
            lines.append(entry)
        else:
            lines.append(f"nameserver {entry}")
    return "\n".join(lines) + "\n"
