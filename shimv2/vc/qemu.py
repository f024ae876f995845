"""QEMU: the Hypervisor implementation.

microvm with the uncompressed kernel (PVH) boots fastest under TCG (see the
VM recipe); q35 is there for what microvm lacks (PCI hotplug). The agent
channel is vsock (the kernel's, or hybrid through vhost-device-vsock) or a
virtio-serial port backed by a unix socket on the host (``shimv2.vc.vsock``).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from shimv2.errdefs import (
    Error,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from shimv2.guest_protocol import AGENT_PORT_NAME, AGENT_READY_LINE, DEBUG_CONSOLE_PORT
from shimv2.vc.accel import choose_accelerator
from shimv2.vc.console import ReadyMarker, RotatingLog, connect_console, relay_console
from shimv2.vc.hypervisor import AgentEndpoint
from shimv2.vc.procs import Adopted, Child, ProcessIdentity
from shimv2.vc.qemu_config import (
    ACCEL_CACHE,
    COMMAND_LINE_SIZE,
    FAST_PARAMS,
    HOTPLUG_PORTS,
    LATE_VSOCK_PORT,
    LOW_RAM_ALIGN_MIB,
    LOW_RAM_MAX_MIB,
    MEMORY_SLOTS,
    NO_MITIGATIONS,
    RESTORE_TIMEOUT,
    SECCOMP,
    SHARED_TAG,
    QemuConfig,
    host_tsc_khz,
    image_mib,
    resolve_channel,
)
from shimv2.vc.virtiofsd import start_virtiofsd
from shimv2.vc.vsock import (
    VSOCK_START_POLL,
    backend_argv_marker,
    listening,
    start_backend,
    vsock_start_grace,
)

if TYPE_CHECKING:
    # QMP brings asyncio and qemu.qmp: imported when a VM is started or adopted, not
    # by every reader of QemuConfig (the configuration, ``delete``).
    from shimv2.vc.qmp import Qmp

log = logging.getLogger(__name__)


def debug_console_socket(run_dir: Path) -> Path:
    """Where a VM's debug console port is served on the host (a socket QEMU listens on)."""
    return run_dir / "debug-console.sock"


class Qemu:
    """One QEMU process (and its virtiofsd) for one sandbox."""

    def __init__(self, vm_id: str, config: QemuConfig, run_dir: Path) -> None:
        self.vm_id = vm_id
        self.config = config
        self.run_dir = run_dir
        self.accelerator: str | None = None
        self._qemu: Child | Adopted | None = None
        self._virtiofsd: Child | Adopted | None = None
        self._qmp: Qmp | None = None
        self._vsock_cid: int | None = None
        self._vsock_backend: Child | Adopted | None = None
        self.channel: str | None = None  # the agent channel, once started
        self._exited = trio.Event()
        self._exit_status: int | None = None
        self._stopping = False
        self._console_scope: trio.CancelScope | None = None
        self._console_done = trio.Event()
        self._agent_ready = ReadyMarker(AGENT_READY_LINE.encode())  # seen on the console
        self.restored = False  # booted from a template's state, not cold
        self.rng_renewed = False  # a clone's, since it was restored (``template.renew_rng``)
        self._released = False  # another process's now (``disown``)
        # The guest has started its vsock device (and the backend took it in): an
        # adopted VM's was, by whoever connected first. Dials need not wait then.
        self._vsock_started = False

    # -- paths -------------------------------------------------------------

    @property
    def qmp_path(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def agent_path(self) -> Path:
        return self.run_dir / "agent.sock"

    @property
    def virtiofs_path(self) -> Path:
        return self.run_dir / "vfs.sock"

    @property
    def vhost_vsock_path(self) -> Path:
        """hybrid-vsock: the vhost-user socket the backend serves to QEMU."""
        return self.run_dir / "vhu.sock"

    @property
    def hybrid_vsock_path(self) -> Path:
        """hybrid-vsock: where the host dials the guest (``CONNECT <port>``)."""
        return self.run_dir / "vsock.sock"

    @property
    def vsock_backend_pid(self) -> int | None:
        return self._vsock_backend.pid if self._vsock_backend is not None else None

    @property
    def vsock_backend_start_time(self) -> int:
        return self._vsock_backend.start_time if self._vsock_backend is not None else 0

    @property
    def console_path(self) -> Path:
        """The guest console's newest output (older output in ``console.log.1``)."""
        return self.run_dir / "console.log"

    @property
    def console_socket(self) -> Path:
        return self.run_dir / "console.sock"

    @property
    def debug_console_path(self) -> Path:
        return debug_console_socket(self.run_dir)

    @property
    def pid(self) -> int | None:
        return self._qemu.pid if self._qemu is not None else None

    @property
    def virtiofsd_pid(self) -> int | None:
        return self._virtiofsd.pid if self._virtiofsd is not None else None

    @property
    def start_time(self) -> int:
        """QEMU's start time (``procs.process_start_time``), recorded with its pid."""
        return self._qemu.start_time if self._qemu is not None else 0

    @property
    def virtiofsd_start_time(self) -> int:
        return self._virtiofsd.start_time if self._virtiofsd is not None else 0

    @property
    def qmp(self) -> Qmp:
        if self._qmp is None:
            raise Unavailable(f"vm {self.vm_id}: not running")
        return self._qmp

    def agent_endpoint(self) -> AgentEndpoint:
        hint = self._agent_ready.seen.wait
        if self._vsock_cid is not None:
            return AgentEndpoint(vsock_cid=self._vsock_cid, hint=hint)
        if self.channel == "hybrid-vsock":
            ready = None if self._vsock_started else self._vsock_device_started
            return AgentEndpoint(hybrid_path=str(self.hybrid_vsock_path), ready=ready, hint=hint)
        return AgentEndpoint(unix_path=str(self.agent_path))

    def serial_agent_endpoint(self) -> AgentEndpoint | None:
        """The agent's virtio-serial port, when this VM has one besides its channel: a
        late-device VM (a template's clone, a cached VM) keeps its template's."""
        if self.config.late_devices or self._channel() == "serial":
            return AgentEndpoint(unix_path=str(self.agent_path))
        return None

    async def _vsock_device_started(self) -> None:
        """Return once the guest's driver has started the vsock device.

        vhost-device-vsock 0.3.0 must not see a host connection between the
        guest memory table and ready rings: its ring code fails then, and any
        error ends vhost-user-backend's worker loop for good, so every later
        ``CONNECT`` goes unanswered (3 boots in 18 with dials every 5 ms, here).
        QEMU's ``vhost-started`` is set under the lock QMP runs under, after the
        start messages are sent; a grace covers the backend reading the last of
        them. The backend runs on CPUs as busy as QEMU's, so the grace grows with
        how slowly QEMU answered (one clone in 20 started at once still wedged
        with a fixed 0.1 s). A QEMU without ``x-query-virtio`` is not waited for.
        """
        qmp, path = self.qmp, None
        try:
            while True:
                if path is None:
                    devices = await qmp.execute("x-query-virtio")
                    names = ("vhost-vsock", "vhost-user-vsock")
                    path = next((d["path"] for d in devices if d.get("name") in names), None)
                if path is not None:
                    asked = trio.current_time()
                    status = await qmp.execute("x-query-virtio-status", {"path": path})
                    if status.get("vhost-started"):
                        await trio.sleep(vsock_start_grace(trio.current_time() - asked))
                        self._vsock_started = True
                        return
                await trio.sleep(VSOCK_START_POLL)
        except FailedPrecondition as exc:  # the command is missing (QEMU < 7.2)
            log.warning("vm %s: cannot tell when vsock is started: %s", self.vm_id, exc)

    async def resume(self) -> None:
        """Run the paused VM again; return once its agent channel may be dialled.

        ``cont`` restarts a vhost-user vsock device's rings, and the backend takes
        those messages in after QMP has answered: a host byte in between ends its
        worker (``_vsock_device_started``), so hybrid vsock gets its grace again.
        """
        await self.qmp.execute("cont")
        if self.channel == "hybrid-vsock":
            self._vsock_started = False
            await self._vsock_device_started()

    def _channel(self) -> str:
        """The agent channel; before ``start`` (a command line printed in a test),
        ``auto`` stands for serial."""
        configured = self.config.agent_channel
        return self.channel or ("serial" if configured == "auto" else configured)

    def _late_vsock(self) -> bool:
        """A vsock device plugged after the restore: a clone's (``shimv2.vc.template``)."""
        return self.config.late_devices and self._channel() != "serial"

    def _shared_ram(self) -> bool:
        """Guest RAM other processes map: virtiofsd, a vsock backend, a template's files."""
        cfg = self.config
        # late_devices: a template, a clone, or a cached VM that gets virtio-fs later.
        return (
            cfg.shared_dir is not None
            or bool(cfg.memory_dir)
            or cfg.late_devices
            or self._channel() == "hybrid-vsock"
        )

    # -- lifecycle ---------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        self.config.validate()
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self.accelerator, reason = await choose_accelerator(
                self.config.accelerator, self.config.binary, self.config.kernel, ACCEL_CACHE
            )
            log.info("vm %s: accelerator %s (%s)", self.vm_id, self.accelerator, reason)
            if self.config.shared_dir is not None:
                self._virtiofsd = await start_virtiofsd(
                    self.virtiofs_path,
                    Path(self.config.shared_dir),
                    self.run_dir / "virtiofsd.log",
                    binary=self.config.virtiofsd,
                    cgroup=self.config.cgroup,
                    mount_ns=self.config.shared_dir_mount_ns,
                )
            self.channel = resolve_channel(self.config.agent_channel, self.config.vsock_backend)
            if self.channel == "vsock":
                self._vsock_cid = random.randrange(3, 1 << 31)
            elif self.channel == "hybrid-vsock":
                self._vsock_backend = await start_backend(
                    self.vhost_vsock_path,
                    self.hybrid_vsock_path,
                    self.run_dir / "vsock.log",
                    binary=self.config.vsock_backend,
                    cgroup=self.config.cgroup,
                )
            with open(self.run_dir / "qemu.log", "ab") as qemu_log:
                self._qemu = await Child.spawn(
                    "qemu",
                    self.argv(),
                    stderr=qemu_log.fileno(),
                    pass_fds=tuple(n.fd for n in self.config.nics),
                    cgroup=self.config.cgroup,
                )
            nursery.start_soon(self._watch, self._qemu)
            for helper in (self._virtiofsd, self._vsock_backend):
                if helper is not None:
                    nursery.start_soon(self._watch_helper, helper)
            # Before QMP: the console listens before the guest runs, QMP only after.
            if not await nursery.start(self._relay_console):
                raise Unavailable(f"vm {self.vm_id}: QEMU did not start: {self._log_tail()}")
            from shimv2.vc.qmp import Qmp

            self._qmp = Qmp(self.vm_id)
            await self._connect_qmp()
            if self.config.incoming:
                await self._restore(self.config.incoming)
            if self.config.late_devices:
                await self._plug_late_devices()
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.shutdown()
            raise

    async def _connect_qmp(self) -> None:
        with trio.move_on_after(10):
            while not self._exited.is_set():
                # Listening, not only there: QEMU binds before it listens, and a
                # connect in between is refused (seen once under load).
                if listening(self.qmp_path):
                    assert self._qmp is not None
                    await self._qmp.connect(str(self.qmp_path))
                    return
                await trio.sleep(0.005)
        raise Unavailable(f"vm {self.vm_id}: QEMU did not start: {self._log_tail()}")

    async def _restore(self, state: str) -> None:
        """Load a template's device state (its RAM is already in ``memory_dir``), then run.

        ``x-ignore-shared``: the state holds no RAM, the shared files are it. The
        template was stopped before it was saved, so the clone loads paused. A
        state QEMU refuses makes it exit: that is Unavailable, with its reason.
        """
        try:
            await self._load(state)
        except Error:
            raise
        except Exception as exc:  # QMP gone: QEMU quit on a state it could not load
            with trio.move_on_after(1):
                await self._exited.wait()
            raise Unavailable(
                f"vm {self.vm_id}: restore failed ({exc!r}): {self._log_tail()}"
            ) from exc

    async def _load(self, state: str) -> None:
        qmp = self.qmp
        await qmp.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
        )
        fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await qmp.getfd("incoming", fd)
        finally:
            os.close(fd)
        await qmp.execute("migrate-incoming", {"uri": "fd:incoming"})
        with trio.move_on_after(RESTORE_TIMEOUT):
            while not self._exited.is_set():
                status = (await qmp.execute("query-status"))["status"]
                if status != "inmigrate":
                    break
                await trio.sleep(0.005)
            else:
                status = "exited"
            if status not in ("paused", "postmigrate", "running"):
                raise Unavailable(f"vm {self.vm_id}: restore failed ({status}): {self._log_tail()}")
            if status != "running":
                await qmp.execute("cont")
            self.restored = True
            return
        raise Unavailable(f"vm {self.vm_id}: restore took over {RESTORE_TIMEOUT:g}s")

    async def _plug_late_devices(self, *, with_vsock: bool = True, with_share: bool = True) -> None:
        """virtio-fs on the first root port, then the NICs; the guest's pciehp finds them."""
        qmp = self.qmp
        if with_share and self.config.shared_dir is not None:
            await qmp.execute(
                "device_add",
                {"driver": "vhost-user-fs-pci", "id": "vfs0", "bus": "rp0",
                 "chardev": "vfs", "tag": SHARED_TAG},
            )  # fmt: skip
        for i, nic in enumerate(self.config.nics, start=1):
            await qmp.execute("device_add", nic.device_add(f"rp{i}"))
        if with_vsock and self._late_vsock():
            # The template's agent listens on vsock already (``kernel_cmdline``);
            # the clone's CID is its own, given here.
            vsock: dict[str, object] = {"id": "vsock0", "bus": LATE_VSOCK_PORT}
            if self._channel() == "vsock":
                vsock |= {"driver": "vhost-vsock-pci", "guest-cid": self._vsock_cid}
            else:
                vsock |= {"driver": "vhost-user-vsock-pci", "chardev": "vsock"}
            await qmp.execute("device_add", vsock)

    async def release(self) -> None:
        """Let another process take this running VM over (``shimv2.vc.vm_cache``).

        QMP and the console each serve one client, so both are let go; the
        processes run on, and ``_watch`` still reaps them (they are our children).
        Until ``disown``, a helper's death still ends the VM.
        """
        if self._console_scope is not None:
            self._console_scope.cancel()
            with trio.move_on_after(1):
                await self._console_done.wait()
        if self._qmp is not None:
            await self._qmp.aclose()
            self._qmp = None

    def disown(self) -> None:
        """The VM is another process's now: a helper's death is its business."""
        self._released = True

    async def join_pod(self, nursery: trio.Nursery) -> None:
        """A VM started for no pod (a cached one, adopted) becomes this pod's.

        Its processes move into the pod's cgroup (what they hold already stays
        charged where it was), then it gets the pod's virtio-fs, with a
        virtiofsd of its own, and NICs, on the root ports a late-device VM has.
        A VM that came with its virtio-fs (and virtiofsd) keeps it.
        """
        cfg = self.config
        if not cfg.late_devices:
            raise FailedPrecondition(f"vm {self.vm_id}: only a late-device VM can join a pod")
        for procs in cfg.cgroup:
            for pid in (self.pid, self.vsock_backend_pid, self.virtiofsd_pid):
                if pid:
                    with open(procs, "w") as f:
                        f.write(str(pid))
        qmp = self.qmp
        new_share = cfg.shared_dir if self._virtiofsd is None else None
        if new_share is not None:
            self._virtiofsd = await start_virtiofsd(
                self.virtiofs_path,
                Path(new_share),
                self.run_dir / "virtiofsd.log",
                binary=cfg.virtiofsd,
                cgroup=cfg.cgroup,
                mount_ns=cfg.shared_dir_mount_ns,
            )
            nursery.start_soon(self._watch_helper, self._virtiofsd)
            path = {"type": "unix", "data": {"path": str(self.virtiofs_path)}}
            backend = {"type": "socket", "data": {"addr": path, "server": False}}
            await qmp.execute("chardev-add", {"id": "vfs", "backend": backend})
        for nic in cfg.nics:
            nic.validate()
            await qmp.getfd(nic.netdev_id, nic.fd)
            await qmp.execute(
                "netdev_add", {"type": "tap", "id": nic.netdev_id, "fd": nic.netdev_id}
            )
        await self._plug_late_devices(with_vsock=False, with_share=new_share is not None)

    @classmethod
    async def adopt(
        cls,
        vm_id: str,
        config: QemuConfig,
        run_dir: Path,
        pid: int,
        virtiofsd_pid: int,
        vsock_cid: int,
        nursery: trio.Nursery,
        *,
        start_time: int = 0,
        virtiofsd_start_time: int = 0,
        channel: str = "",
        vsock_backend_pid: int = 0,
        vsock_backend_start_time: int = 0,
    ) -> Qemu:
        """Take over a running VM started by another process (from persisted state).

        Only the very processes that were started: pid and start time, and
        QEMU's exact ``-name``; a state written before start times were
        recorded (0) relies on the exact argument alone.

        Errors: ``ProcessLookupError`` when a recorded pid is gone or another process.
        """
        vm = cls(vm_id, config, run_dir)
        vm._qemu = Adopted("qemu", ProcessIdentity(pid, start_time, ("-name", f"kata-py-{vm_id}")))
        vm.channel = channel or ("vsock" if vsock_cid else "serial")
        if vsock_backend_pid:
            marker = backend_argv_marker(vm.vhost_vsock_path, vm.hybrid_vsock_path)
            identity = ProcessIdentity(vsock_backend_pid, vsock_backend_start_time, marker)
            try:
                vm._vsock_backend = Adopted("vhost-device-vsock", identity)
            except ProcessLookupError:
                vm._qemu.close()
                raise
        if virtiofsd_pid:
            # Older virtiofsd command lines named their socket; newer ones pass an fd.
            legacy = None if virtiofsd_start_time else ("--socket-path", str(vm.virtiofs_path))
            identity = ProcessIdentity(virtiofsd_pid, virtiofsd_start_time, legacy)
            try:
                vm._virtiofsd = Adopted("virtiofsd", identity)
            except ProcessLookupError:
                vm._qemu.close()
                raise
        vm._vsock_cid = vsock_cid or None
        vm._vsock_started = True  # its previous owner reached the agent
        nursery.start_soon(vm._watch, vm._qemu)
        for helper in (vm._virtiofsd, vm._vsock_backend):
            if helper is not None:
                nursery.start_soon(vm._watch_helper, helper)
        from shimv2.vc.qmp import Qmp

        vm._qmp = Qmp(vm_id)
        try:
            with trio.fail_after(5):
                await vm._qmp.connect(str(vm.qmp_path))
        except BaseException:
            await vm._qmp.aclose()
            vm._qmp = None
            raise
        nursery.start_soon(vm._relay_console)  # the previous owner's relay died with it
        return vm

    async def _relay_console(
        self, *, task_status: trio.TaskStatus[bool] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep the guest console in console.log, capped (``shimv2.vc.console``)."""
        if self._stopping:
            task_status.started(False)
            return
        try:
            with trio.CancelScope() as self._console_scope:
                stream = await connect_console(self.console_socket, exited=self._exited)
                task_status.started(stream is not None)
                if stream is None:
                    log.warning("vm %s: no console socket; console not kept", self.vm_id)
                    return
                await relay_console(stream, RotatingLog(self.console_path), self._agent_ready)
        finally:
            self._console_done.set()

    async def _watch(self, qemu: Child | Adopted) -> None:
        status = await qemu.wait()
        self._exit_status = status
        self._exited.set()
        log.info("vm %s: QEMU exited with %d", self.vm_id, status)
        for helper in (self._virtiofsd, self._vsock_backend):
            if helper is not None:
                await helper.stop()

    async def _watch_helper(self, helper: Child | Adopted) -> None:
        """A VM whose virtiofsd died has lost its containers' root filesystems, and one
        whose vsock backend died has lost its agent: end it."""
        status = await helper.wait()
        if self._exited.is_set() or self._stopping or self._released:
            return
        log.error("vm %s: %s exited (%d); stopping the VM", self.vm_id, helper.name, status)
        if self._qemu is not None:
            await self._qemu.stop(grace=1.0)

    async def wait_exited(self) -> int:
        await self._exited.wait()
        assert self._exit_status is not None
        return self._exit_status

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    async def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        if self._qemu is not None and self._qemu.returncode is None and self._qmp is not None:
            with trio.move_on_after(min(2.0, timeout)):
                try:
                    await self._qmp.execute("quit")
                except Exception as exc:
                    log.debug("vm %s: quit: %s", self.vm_id, exc)
        if self._qmp is not None:
            await self._qmp.aclose()
            self._qmp = None
        if self._qemu is not None:
            await self._qemu.stop(grace=timeout)
        for helper in (self._virtiofsd, self._vsock_backend):
            if helper is not None:
                await helper.stop()
        if self._console_scope is not None:  # no console write after the rmtree
            self._console_scope.cancel()
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self._console_done.wait()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if (self.config.incoming or self.restored) and self.config.memory_dir:
            # A clone's RAM is its own copy of the template's (a template keeps its own).
            shutil.rmtree(self.config.memory_dir, ignore_errors=True)

    # -- command line ------------------------------------------------------

    def kernel_cmdline(self) -> str:
        channel = "serial" if self._channel() == "serial" else "vsock"
        if self.config.late_devices:
            # A template (or a clone, which boots nothing): the serial port for
            # the host building it, a vsock listener for clones that use vsock.
            channel = "serial+vsock"
        params = [*FAST_PARAMS, f"tsc_early_khz={host_tsc_khz()}", f"kata_py.channel={channel}"]
        if self.config.disable_mitigations:
            params += NO_MITIGATIONS
        if self.config.image and self.config.machine == "microvm":
            # The image's RAM range becomes legacy pmem (/dev/pmem0), not guest RAM.
            params.append(f"memmap={image_mib(self.config.image)}M!{self._low_ram_mib()}M")
        if self.config.late_devices:
            # microvm's ACPI grants the guest no PCIe hotplug (_OSC): take it.
            params.append("pcie_ports=native")
        cmdline = " ".join([*params, *self.config.kernel_params])
        if len(cmdline) >= COMMAND_LINE_SIZE:  # the guest would cut it silently
            raise InvalidArgument(
                f"vm {self.vm_id}: kernel command line over {COMMAND_LINE_SIZE - 1} bytes"
            )
        return cmdline

    def argv(self) -> list[str]:
        cfg = self.config
        microvm = cfg.machine == "microvm"
        accel = self.accelerator or "tcg"
        machine = "microvm" if microvm else "q35"
        argv = [
            cfg.binary, "-name", f"kata-py-{self.vm_id}",
            "-accel", f"tcg,tb-size={cfg.tcg_tb_size}" if accel == "tcg" else accel,
            "-cpu", "host" if accel == "kvm" else "max",
            *self._size_args(),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            # seccomp: no obsolete calls, set*id, fork/exec or scheduler changes.
            # Boot, virtio-fs, taps, memfd RAM, hotplug (memory, vCPUs, disks,
            # NICs) and the debug console all work under it (tests/vc).
            # Not -runas (tried as 65534:65534): QEMU 7.2 loads this filter
            # before it changes uid, so elevateprivileges=deny kills it at
            # setgid (SIGSYS); with =allow everything above works except disk
            # hotplug: blockdev-add opens the file by name after the uid change
            # (EACCES), so add_device must pass an fd (add-fd, /dev/fdset/N)
            # first, and each VM needs its own uid (one shared uid lets a QEMU
            # signal the others), allocated and recorded for cleanup.
            "-sandbox", SECCOMP,
            # A socket, not a file: the shim keeps the output within a cap.
            "-chardev", f"socket,id=console,path={self.console_socket},server=on,wait=off",
            "-serial", "chardev:console",
            "-kernel", cfg.kernel, "-initrd", cfg.initrd, "-append", self.kernel_cmdline(),
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip
        if cfg.image:
            image_args, machine_opts = self._image_args()
            argv += image_args
            machine += machine_opts
        elif microvm and cfg.late_devices:
            machine += ",pcie=on"
        if not (microvm and cfg.image) and self._shared_ram():
            # vhost-user-fs needs guest RAM the virtiofsd process can map (on
            # microvm with an image, _image_args made such RAM).
            argv += ["-object", self._ram_backend("mem", cfg.memory_mib)]
            machine += ",memory-backend=mem"
        if cfg.shared_dir is not None:
            argv += ["-chardev", f"socket,id=vfs,path={self.virtiofs_path}"]
            if not cfg.late_devices:
                argv += ["-device", f"{'vhost-user-fs-device' if microvm else 'vhost-user-fs-pci'},"
                         f"chardev=vfs,tag={SHARED_TAG}"]  # fmt: skip
        if not microvm or cfg.late_devices:
            # pcie.0 cannot hotplug; root ports can (one device each).
            for i in range(HOTPLUG_PORTS):
                argv += ["-device", f"pcie-root-port,id=rp{i},bus=pcie.0,chassis={i + 1}"]
        if microvm:
            # libvhost-user refuses legacy virtio devices.
            argv += ["-global", "virtio-mmio.force-legacy=false"]
        # KSM: QEMU marks guest RAM mergeable unless told not to.
        argv += ["-M", f"{machine},mem-merge={'on' if cfg.ksm else 'off'}"]
        # Devices whose driver fills its receive ring at once (serial ports, the NIC) go
        # on PCI when a microvm has a PCIe bus: QEMU 7.2's virtio-mmio offers every ring
        # at its 1024-entry maximum, and each virtio-serial port then holds 4 MiB of guest
        # kernel memory (PCI rings: 128-256). Not vsock, though its ring costs as much:
        # with vhost-device-vsock 0.3.0, a cold VM's vsock on PCI went unanswered once
        # when pods started at once, as late-plugged (PCI) ones have (``Sandbox.
        # _connect_new_vm``); on mmio it has not.
        pci_root = "pcie.0" if microvm and "pcie=on" in machine else ""
        serial = "virtio-serial-device" if microvm and not pci_root else "virtio-serial-pci"
        if pci_root:
            serial += f",bus={pci_root}"
        channel = self._channel()
        serial_port = channel == "serial" or cfg.late_devices  # clones have their template's
        if self._late_vsock():
            if channel == "hybrid-vsock":  # the backend is connected now, the device later
                argv += ["-chardev", f"socket,id=vsock,path={self.vhost_vsock_path}"]
        elif channel == "vsock":
            dev = "vhost-vsock-device" if microvm else "vhost-vsock-pci"
            argv += ["-device", f"{dev},guest-cid={self._vsock_cid or 3}"]
        elif channel == "hybrid-vsock":
            dev = "vhost-user-vsock-device" if microvm else "vhost-user-vsock-pci"
            argv += [
                "-chardev", f"socket,id=vsock,path={self.vhost_vsock_path}",
                "-device", f"{dev},chardev=vsock",
            ]  # fmt: skip
        if serial_port:
            argv += [
                "-device", f"{serial},id=vser0",
                "-chardev", f"socket,id=agent,path={self.agent_path},server=on,wait=off",
                "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT_NAME}",
            ]  # fmt: skip
        if cfg.debug_console:
            if not serial_port:
                argv += ["-device", f"{serial},id=vser0"]
            argv += [
                "-chardev", f"socket,id=dbgcon,path={self.debug_console_path},server=on,wait=off",
                "-device", f"virtserialport,bus=vser0.0,chardev=dbgcon,name={DEBUG_CONSOLE_PORT}",
            ]  # fmt: skip
        if cfg.free_page_reporting:
            dev = "virtio-balloon-device" if microvm else "virtio-balloon-pci"
            argv += ["-device", f"{dev},free-page-reporting=on"]
        for nic in cfg.nics:
            argv += nic.netdev_args()
            if not cfg.late_devices:  # else plugged after start (``_plug_late_devices``)
                argv += nic.device_args(cfg.machine, pci_root)
        if cfg.incoming:
            argv += ["-incoming", "defer"]  # loaded over QMP (``_restore``)
        return argv

    def _ram_backend(self, name: str, mib: int) -> str:
        """Guest RAM that other processes can map: a memfd, or a file of ``memory_dir``."""
        cfg = self.config
        if cfg.memory_dir:
            path = os.path.join(cfg.memory_dir, name).replace(",", ",,")
            return f"memory-backend-file,id={name},size={mib}M,mem-path={path},share=on"
        return f"memory-backend-memfd,id={name},size={mib}M,share=on"

    def _size_args(self) -> list[str]:
        cfg = self.config
        # The root image is RAM to QEMU: beside guest RAM on microvm, in the hotplug area on q35.
        image = image_mib(cfg.image) if cfg.image else 0
        if cfg.machine == "microvm":  # no hotplug: fixed size
            return ["-smp", str(cfg.vcpus), "-m", f"{cfg.memory_mib + image}M"]
        return [
            "-smp", f"{cfg.vcpus},maxcpus={max(cfg.vcpus, cfg.max_vcpus)}",
            "-m", f"{cfg.memory_mib}M,slots={MEMORY_SLOTS},"
            f"maxmem={max(cfg.memory_mib, cfg.max_memory_mib) + image}M",
        ]  # fmt: skip

    def _low_ram_mib(self) -> int:
        """microvm: the guest RAM below the image (the kernel loads at 16 MiB)."""
        low = min(self.config.memory_mib // 2, LOW_RAM_MAX_MIB)
        return low // LOW_RAM_ALIGN_MIB * LOW_RAM_ALIGN_MIB

    def _image_args(self) -> tuple[list[str], str]:
        """The root image as read-only persistent memory; and options for ``-M``.

        ``readonly=on``: guest writes to /dev/pmem0 never reach the file, and the
        mapping is the host page cache, shared by every VM. q35: a virtio-pmem
        device in the memory hotplug area. microvm has no such area (its
        virtio-pmem is never mapped): guest RAM is two NUMA nodes with the image
        as a third between them, at an address fixed by this command line, which
        ``memmap=…!…`` (``kernel_cmdline``) makes a legacy pmem range; the kernel
        registers that range only with a PCI bus, hence ``pcie=on``.
        """
        cfg = self.config
        size = image_mib(cfg.image)
        path = cfg.image.replace(",", ",,")  # QEMU's option syntax escapes a comma so
        image = f"memory-backend-file,id=rootimg,mem-path={path},size={size}M"
        image += ",share=on,readonly=on"
        if cfg.machine != "microvm":
            return ["-object", image, "-device", "virtio-pmem-pci,memdev=rootimg,id=rootpmem"], ""
        low = self._low_ram_mib()

        def ram(name: str, mib: int) -> str:
            # vhost-user-fs maps guest RAM (the image, read-only, is not sent).
            if self._shared_ram():
                return self._ram_backend(name, mib)
            return f"memory-backend-ram,id={name},size={mib}M"

        args = [
            "-object", ram("mem", low), "-numa", "node,memdev=mem",
            "-object", image, "-numa", "node,memdev=rootimg",
            "-object", ram("mem1", cfg.memory_mib - low), "-numa", "node,memdev=mem1",
        ]  # fmt: skip
        return args, ",pcie=on"

    async def hotplug_vcpus(self, total: int) -> int:
        """Plug vCPUs until ``total`` are present; returns how many were added."""
        if self.config.machine == "microvm":
            raise FailedPrecondition("machine microvm cannot hotplug vCPUs; use q35")
        slots = await self.qmp.execute("query-hotpluggable-cpus")
        present = [s for s in slots if "qom-path" in s]
        free = [s for s in slots if "qom-path" not in s]
        wanted = total - len(present)
        if wanted < 0:
            raise FailedPrecondition(f"vm {self.vm_id}: vCPUs can only grow ({len(present)} now)")
        if wanted > len(free):
            raise ResourceExhausted(f"vm {self.vm_id}: at most {len(slots)} vCPUs")
        for slot in free[:wanted]:
            props = slot["props"]
            ids = (props.get(k, 0) for k in ("socket-id", "core-id", "thread-id"))
            name = "cpu-" + "-".join(map(str, ids))
            await self.qmp.execute("device_add", {"driver": slot["type"], "id": name, **props})
        return wanted

    async def hotplug_memory(self, add_mib: int) -> None:
        """Add one DIMM of ``add_mib`` MiB, shared like the rest of guest RAM."""
        if self.config.machine == "microvm":
            raise FailedPrecondition("machine microvm cannot hotplug memory; use q35")
        if add_mib <= 0 or add_mib % 128:
            raise InvalidArgument("memory is added in multiples of 128 MiB")
        n = len(await self.qmp.execute("query-memory-devices"))
        await self.qmp.execute(
            "object-add",
            {"qom-type": "memory-backend-memfd", "id": f"hotmem{n}",
             "size": add_mib << 20, "share": True},
        )  # fmt: skip
        await self.qmp.execute(
            "device_add", {"driver": "pc-dimm", "id": f"dimm{n}", "memdev": f"hotmem{n}"}
        )

    def _log_tail(self) -> str:
        try:
            return (self.run_dir / "qemu.log").read_text(errors="replace")[-800:].strip()
        except OSError:
            return "(no qemu.log)"
