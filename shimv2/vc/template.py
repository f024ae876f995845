"""VM templating: pods start as clones of one booted VM (Kata's ``enable_template``).

A template is a VM booted once until its agent answers, then stopped and
saved: its RAM as files on a tmpfs, its device state beside them without the
RAM (``x-ignore-shared``). A clone loads that state in ~0.02 s instead of
booting the kernel and starting the agent (seconds under TCG).

Unlike Kata's, our clones keep virtio-fs. virtiofsd maps guest RAM itself, so a
clone cannot map the template's RAM privately (copy-on-write): virtiofsd would
see, and write into, the template. Each clone gets its own sparse copy of the
RAM files instead, only the pages the template touched (~100 MiB, ~0.1 s on
tmpfs), mapped shared. The copy is made inside the pod's cgroup, which pays for
it. vhost-user-fs cannot be migrated (QEMU 7.2), nor can a NIC be in the
template, nor a vsock device (its CID is in the saved state), so templates and
clones have PCIe root ports, and all three are plugged after the restore
(``Qemu._plug_late_devices``).

Templates are keyed by what the guest was booted from and with (``template_key``);
a clone of a template that is missing, stale or broken falls back to a cold boot,
logged, never an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import trio
from google.protobuf.empty_pb2 import Empty

from shimv2.errdefs import Error, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from shimv2.pb.kata import agent_pb2
from shimv2.vc.agent import AgentClient, connect_agent
from shimv2.vc.factory import DirectFactory, Factory
from shimv2.vc.procs import Child
from shimv2.vc.qemu import Qemu
from shimv2.vc.qemu_config import QemuConfig

log = logging.getLogger(__name__)

# Bumped when what a template holds changes (2: agent on vsock too; 3: serial on PCI;
# 4: a guest without tracefs).
FORMAT = 4
RAM_FILES = ("mem", "mem1")  # what ``Qemu`` names guest RAM backends
STATE_FILE = "state"
META_FILE = "template.json"
TMPFS_MAGIC = "tmpfs"
# After the agent answered, the host leaves; the agent notices and waits for the
# next host (a clone's shim). Saving in between would freeze it mid-way.
SETTLE_SECONDS = 1.0
CLONE_SEED_BYTES = 64
SAVE_TIMEOUT = 60.0


# -- what every clone renews before anything runs in it -------------------------------


async def renew_rng(agent: AgentClient) -> None:
    """Reseed the guest's RNG (the kernel's and the agent's) from the host's.

    Every clone of a template starts with the template's RNG state: before
    anything runs in it, or its "random" bytes are every other clone's.
    """
    seed = agent_pb2.ReseedRandomDevRequest(data=os.urandom(CLONE_SEED_BYTES))
    await agent.call("ReseedRandomDev", seed, Empty)


async def set_clock(agent: AgentClient) -> None:
    """Set the guest's wall clock from the host's: a clone wakes at its template's time."""
    now = time.time_ns() // 1000
    clock = agent_pb2.SetGuestDateTimeRequest(Sec=now // 1_000_000, Usec=now % 1_000_000)
    await agent.call("SetGuestDateTime", clock, Empty)


def template_config(config: QemuConfig) -> QemuConfig:
    """A pod's VM without what belongs to the pod: what a template boots."""
    return dataclasses.replace(
        config,
        shared_dir=None,
        cgroup=(),
        memory_dir=None,
        incoming=None,
        late_devices=True,
        nics=(),
        # The template's builder talks over virtio-serial. A vsock device would keep
        # its guest CID in the saved state, giving every clone the template's: a
        # clone that uses vsock gets its own device after the restore, and the
        # template's agent listens on vsock for it (``Qemu.kernel_cmdline``).
        agent_channel="serial",
    )


def _file_identity(path: str) -> str:
    real = os.path.realpath(path)
    st = os.stat(real)
    return f"{real}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def template_key(config: QemuConfig) -> str:
    """What a clone must share with its template: binaries, guest files, size, devices.

    Files by identity (path, size, mtime, inode), not content: this runs at
    every pod start, and a rebuilt file gets a new inode or mtime.
    """
    base = template_config(config)
    binary = shutil.which(base.binary)
    if binary is None:
        raise FailedPrecondition(f"hypervisor binary not found: {base.binary}")
    files = [binary, base.kernel, base.initrd, *([base.image] if base.image else [])]
    try:
        parts = [_file_identity(p) for p in files]
    except OSError as exc:
        raise FailedPrecondition(f"template: {exc}") from exc
    settings = (
        FORMAT, base.machine, base.accelerator, base.vcpus, base.memory_mib, base.max_vcpus,
        base.max_memory_mib, base.tcg_tb_size, base.ksm, base.free_page_reporting,
        base.kernel_params, base.disable_mitigations, base.agent_channel, base.debug_console,
    )  # fmt: skip
    digest = hashlib.sha256(repr((parts, settings)).encode())
    return digest.hexdigest()[:20]


def _fs_type(path: Path) -> str:
    """The filesystem type of the mount holding ``path`` (longest mount point prefix)."""
    target = os.path.realpath(path)
    best, fstype = "", ""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        point = left.split()[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, right.split()[0]
    return fstype


def _require_tmpfs(path: Path) -> None:
    """Guest RAM on a disk would be written back to it: refuse anything but tmpfs."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if _fs_type(probe) != TMPFS_MAGIC:
        raise InvalidArgument(f"factory.template_path {path} is not on a tmpfs (e.g. /dev/shm)")


def clones_dir(template_path: str | Path) -> Path:
    """Where clones keep their RAM: beside the templates, on the same tmpfs."""
    return Path(template_path).parent / "clones"


# -- building, listing, removing --------------------------------------------------


async def build_template(
    config: QemuConfig, template_path: str | Path, *, dial_timeout: float = 120.0
) -> Path:
    """Boot a VM for ``config`` and save it as a template; its directory.

    Idempotent: an existing template for the same key is kept.
    """
    root = Path(template_path)
    _require_tmpfs(root)
    key = template_key(config)
    final = root / key
    if (final / META_FILE).is_file():
        return final
    building = root / f".{key}.building"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(mode=0o700, parents=True)
    base = dataclasses.replace(template_config(config), memory_dir=str(building))
    vm = Qemu(f"template-{key[:12]}", base, building / "run")
    started = time.monotonic()
    try:
        async with trio.open_nursery() as nursery:
            try:
                await vm.start(nursery)
                async with connect_agent(vm.agent_endpoint(), ready_timeout=dial_timeout):
                    booted = time.monotonic() - started
                await trio.sleep(SETTLE_SECONDS)
                await _save(vm, building / STATE_FILE)
            finally:
                with trio.CancelScope(shield=True):
                    await vm.shutdown()
                nursery.cancel_scope.cancel()
        meta = {
            "format": FORMAT,
            "key": key,
            "created": time.time(),
            "boot_seconds": round(booted, 3),
            "accelerator": vm.accelerator,
            "vcpus": base.vcpus,
            "memory_mib": base.memory_mib,
            "machine": base.machine,
            "image": base.image,
            "kernel": base.kernel,
        }
        (building / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        building.rename(final)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    log.info("template %s built in %.1fs", key, time.monotonic() - started)
    return final


async def _save(vm: Qemu, state: Path) -> None:
    """Stop the VM for good and write its device state; RAM stays in the files."""
    qmp = vm.qmp
    await qmp.execute("stop")
    await qmp.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
    )
    fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        await qmp.getfd("template", fd)  # not exec: QEMU's seccomp forbids spawning
    finally:
        os.close(fd)
    await qmp.execute("migrate", {"uri": "fd:template"})
    with trio.move_on_after(SAVE_TIMEOUT):
        while True:
            info = await qmp.execute("query-migrate")
            if info.get("status") == "completed":
                return
            if info.get("status") in ("failed", "cancelled"):
                raise Unavailable(f"template save failed: {info.get('error-desc', info)}")
            await trio.sleep(0.01)
    raise Unavailable(f"template save took over {SAVE_TIMEOUT:g}s")


def list_templates(template_path: str | Path) -> list[dict[str, object]]:
    """The templates under ``template_path``, with their size on the tmpfs."""
    root = Path(template_path)
    found: list[dict[str, object]] = []
    if not root.is_dir():
        return found
    for entry in sorted(root.iterdir()):
        meta_path = entry / META_FILE
        if entry.name.startswith(".") or not meta_path.is_file():
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {"key": entry.name, "error": "unreadable template.json"}
        used = sum(f.stat().st_blocks * 512 for f in entry.iterdir() if f.is_file())
        found.append({**meta, "path": str(entry), "resident_mib": round(used / (1 << 20), 1)})
    return found


def destroy_templates(template_path: str | Path) -> int:
    """Remove every template (and half-built one); how many were there."""
    root = Path(template_path)
    if not root.is_dir():
        return 0
    count = 0
    for entry in root.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
            count += not entry.name.startswith(".")
    return count


# -- cloning ---------------------------------------------------------------------


class TemplateFactory:
    """Clone the template for the pod's configuration; boot cold when there is none."""

    def __init__(self, template_path: str | Path, fallback: Factory | None = None) -> None:
        self.template_path = Path(template_path)
        self.fallback = fallback or DirectFactory()

    async def get_vm(
        self, vm_id: str, config: QemuConfig, run_dir: Path, nursery: trio.Nursery
    ) -> Qemu:
        try:
            clone = await self.clone_config(vm_id, config)
        except (Error, OSError) as exc:
            log.warning("vm %s: no template to clone (%s); booting cold", vm_id, exc)
            return await self.fallback.get_vm(vm_id, config, run_dir, nursery)
        vm = Qemu(vm_id, clone, run_dir)
        try:
            await vm.start(nursery)  # on failure it stopped everything and removed the copy
        except (Error, OSError) as exc:
            log.warning("vm %s: restore from template failed (%s); booting cold", vm_id, exc)
            return await self.fallback.get_vm(vm_id, config, run_dir, nursery)
        log.info("vm %s: cloned from template %s", vm_id, Path(clone.incoming or "").parent.name)
        return vm

    async def clone_config(self, vm_id: str, config: QemuConfig) -> QemuConfig:
        """The clone's configuration, once its copy of the template's RAM is made."""
        key = template_key(config)
        template = self.template_path / key
        if not (template / META_FILE).is_file():
            raise NotFound(f"no template {key} in {self.template_path} (kata-py factory init)")
        memory = clones_dir(self.template_path) / vm_id
        shutil.rmtree(memory, ignore_errors=True)
        memory.mkdir(mode=0o700, parents=True)
        try:
            await _copy_ram(template, memory, config.cgroup)
        except BaseException:
            shutil.rmtree(memory, ignore_errors=True)
            raise
        return dataclasses.replace(
            config,
            memory_dir=str(memory),
            incoming=str(template / STATE_FILE),
            late_devices=True,
        )


async def _copy_ram(template: Path, memory: Path, cgroup: tuple[str, ...]) -> None:
    """A sparse copy of the template's RAM files, made in (and charged to) the pod's cgroup."""
    files = [str(template / f) for f in RAM_FILES if (template / f).exists()]
    if not files:
        raise NotFound(f"template {template.name} has no RAM files")
    argv = ["cp", "--sparse=always", *files, str(memory)]
    child = await Child.spawn("cp", argv, cgroup=cgroup)
    status = await child.wait()
    if status != 0:
        raise Unavailable(f"copying template {template.name}'s RAM failed with status {status}")
