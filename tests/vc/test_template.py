"""VM templates: pods cloned from one saved VM, each with its own identity.

The unit tests check keys, command lines and the fallbacks; the VM tests build
one real template (about 10 s under TCG) and clone pods from it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import trio

from shimv2 import errdefs
from shimv2.guest_protocol import AGENT_PORT_NAME
from shimv2.oci import spec_to_json
from shimv2.vc import template
from shimv2.vc.api import VirtContainers, factory_for
from shimv2.vc.config import (
    Config,
    FactoryConfig,
    HypervisorConfig,
    RuntimeConfig,
    parse_config,
)
from shimv2.vc.container import ContainerConfig
from shimv2.vc.factory import DirectFactory
from shimv2.vc.qemu import Qemu
from shimv2.vc.qemu_config import Nic, QemuConfig, default_backend, resolve_channel
from shimv2.vc.sandbox import LATE_VSOCK_PATIENCE, Sandbox, SandboxConfig
from shimv2.vc.template import TemplateFactory, template_key
from shimv2.vc.testing import RecordingFactory
from tests.guest.rootfs import build_rootfs, make_spec
from tests.leaks import RecordingCgroups
from tests.vc.test_sandbox import container, host_cgroups, pod_netns, sid, state_dir

__all__ = ["host_cgroups", "pod_netns", "state_dir"]  # fixtures, used by name


def _qemu(tmp_path: Path, **changes: object) -> Qemu:
    config = dataclasses.replace(QemuConfig(shared_dir=str(tmp_path)), **changes)  # type: ignore[arg-type]
    return Qemu("t1", config, tmp_path / "vm")


# -- unit: keys, command lines, configuration ---------------------------------------


def test_the_key_follows_what_the_guest_is_booted_from_and_with(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    base = QemuConfig(kernel=str(kernel))
    key = template_key(base)
    # Per-pod parts do not matter: every pod of a configuration shares the template.
    pod = dataclasses.replace(
        base, shared_dir="/x", nics=(Nic("n0", 3, "02:00:00:00:00:01"),), cgroup=("/c",)
    )
    assert template_key(pod) == key
    for change in (
        {"memory_mib": 512}, {"vcpus": 2}, {"debug_console": True},
        {"kernel_params": ("kata_py.runtime=runc",)}, {"machine": "q35"}, {"tcg_tb_size": 32},
    ):  # fmt: skip
        assert template_key(dataclasses.replace(base, **change)) != key, change
    # Templates and clones talk to the agent over virtio-serial, whatever the pod asks.
    assert template_key(dataclasses.replace(base, agent_channel="vsock")) == key
    kernel.write_bytes(b"rebuilt")  # a new guest kernel: a new template
    assert template_key(base) != key


def test_late_devices_and_a_restore_on_the_command_line(tmp_path: Path) -> None:
    cold = " ".join(_qemu(tmp_path).argv())
    assert "vhost-user-fs-device" in cold
    assert "pcie-root-port" not in cold
    assert "-incoming" not in cold
    assert "pcie_ports=native" not in cold
    memory = tmp_path / "ram"
    clone = _qemu(
        tmp_path,
        late_devices=True,
        memory_dir=str(memory),
        incoming=str(tmp_path / "state"),
        nics=(Nic("n0", 5, "02:00:00:00:00:01"),),
    )
    argv = clone.argv()
    line = " ".join(argv)
    assert "vhost-user-fs" not in line  # plugged after the restore
    assert "tap,id=n0,fd=5" in line  # the tap is there, its NIC is plugged late
    assert "virtio-net" not in line
    assert f"socket,id=vfs,path={clone.virtiofs_path}" in line  # its chardev is there
    assert line.count("pcie-root-port") == 4
    assert "pcie_ports=native" in line
    assert argv[argv.index("-incoming") + 1] == "defer"
    for name in ("mem", "mem1"):  # RAM is the clone's own files, shared with virtiofsd
        assert f"id={name},size=" in line
        assert f"mem-path={memory}/{name},share=on" in line
    assert "memory-backend-memfd" not in line
    with pytest.raises(errdefs.InvalidArgument):
        dataclasses.replace(clone.config, late_devices=False).validate()
    too_many = (Nic("n", 5, "02:00:00:00:00:01"),) * 4
    with pytest.raises(errdefs.InvalidArgument):
        dataclasses.replace(clone.config, nics=too_many).validate()


@pytest.mark.parametrize("channel", ["serial", "hybrid-vsock", "vsock"])
def test_a_clone_has_its_templates_serial_port_and_gets_vsock_late(
    tmp_path: Path, channel: str
) -> None:
    template_vm = _qemu(tmp_path, **dataclasses.asdict(template.template_config(QemuConfig())))
    assert "kata_py.channel=serial+vsock" in template_vm.kernel_cmdline()
    clone = _qemu(
        tmp_path,
        late_devices=True,
        memory_dir=str(tmp_path / "ram"),
        incoming=str(tmp_path / "state"),
        agent_channel=channel,
    )
    line = " ".join(clone.argv())
    # The device set is the template's: its agent port, no vsock device (plugged late).
    assert f"chardev=agent,name={AGENT_PORT_NAME}" in line
    assert "vsock-device" not in line
    assert "vsock-pci" not in line
    assert ("socket,id=vsock" in line) == (channel == "hybrid-vsock")  # the backend's chardev
    nics = (Nic("n", 5, "02:00:00:00:00:01"),) * 3
    if channel == "serial":
        dataclasses.replace(clone.config, nics=nics).validate()
    else:  # the last root port is the vsock device's
        with pytest.raises(errdefs.InvalidArgument, match="at most 2 NICs"):
            dataclasses.replace(clone.config, nics=nics).validate()


def test_a_pods_nics_are_on_its_command_line_and_a_clones_are_plugged(tmp_path: Path) -> None:
    nic = Nic("n0", 5, "02:00:00:00:00:01")
    cold = _qemu(tmp_path, nics=(nic,)).argv()
    line = " ".join(cold)
    assert (
        "-netdev tap,id=n0,fd=5 -device virtio-net-pci,netdev=n0,mac=02:00:00:00:00:01,romfile=,"
        "bus=pcie.0" in line
    )  # the root image gives microvm a PCIe bus
    mmio = " ".join(_qemu(tmp_path, nics=(nic,), image="").argv())
    assert "-device virtio-net-device,netdev=n0,mac=02:00:00:00:00:01" in mmio
    q35 = " ".join(_qemu(tmp_path, nics=(nic,), machine="q35").argv())
    assert "virtio-net-pci,netdev=n0,mac=02:00:00:00:00:01,romfile=" in q35


def test_templates_must_live_on_tmpfs(tmp_path: Path) -> None:
    with pytest.raises(errdefs.InvalidArgument, match="not on a tmpfs"):
        trio.run(template.build_template, QemuConfig(), "/var/tmp/kpy-not-tmpfs/template")
    assert not os.path.exists("/var/tmp/kpy-not-tmpfs")
    config = parse_config('[factory]\nenable_template = true\ntemplate_path = "/dev/shm/t"\n')
    assert config.factory == FactoryConfig(enable_template=True, template_path="/dev/shm/t")
    assert isinstance(factory_for(config), TemplateFactory)
    assert isinstance(factory_for(Config()), DirectFactory)


async def test_no_template_means_a_cold_boot_not_an_error(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cold = RecordingFactory()
    factory = TemplateFactory(Path("/dev/shm") / f"kpy-{uuid.uuid4().hex[:8]}" / "t", cold)
    vm = await factory.get_vm("sbx", QemuConfig(), tmp_path, nursery)
    assert cold.asked == ["sbx"]
    assert not vm.restored


# -- VMs: a real template and its clones ----------------------------------------------


@pytest.fixture(scope="module")
def template_path() -> Iterator[str]:
    root = Path("/dev/shm") / f"kpy-tpl-{uuid.uuid4().hex[:8]}"
    path = root / "template"
    try:
        trio.run(template.build_template, Config().qemu(None), path)
        yield str(path)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def vc_from_template(
    template_path: str,
    state_dir: str,
    nursery: trio.Nursery,
    host_cgroups: RecordingCgroups,
    request: pytest.FixtureRequest,
) -> AsyncIterator[VirtContainers]:
    """Pods cloned from the module's template; the agent channel by indirect parameter."""
    factory = FactoryConfig(enable_template=True, template_path=template_path)
    config = Config(
        hypervisor=HypervisorConfig(agent_channel=getattr(request, "param", "auto")),
        runtime=RuntimeConfig(state_dir=state_dir),
        factory=factory,
    )
    yield VirtContainers(nursery, config, cgroups=host_cgroups)
    clones = template.clones_dir(template_path)
    assert not clones.exists() or list(clones.iterdir()) == []  # every clone's RAM is gone


def in_the_vms_uts(tmp_path: Path, cid: str, args: list[str]) -> ContainerConfig:
    """A container that sees the VM's hostname: no UTS namespace of its own."""
    bundle = tmp_path / f"bundle-{cid}"
    build_rootfs(bundle / "rootfs")
    spec = make_spec("rootfs", args)
    spec.Hostname = ""
    kept = [ns for ns in spec.Linux.Namespaces if ns.Type != "uts"]
    del spec.Linux.Namespaces[:]
    spec.Linux.Namespaces.extend(kept)
    return ContainerConfig(id=cid, bundle=str(bundle), spec=spec_to_json(spec))


FIRST_ACTION = "od -An -tx1 -N16 /dev/urandom | tr -d ' \\n'; echo; date +%s; hostname"


async def first_action(
    vc: VirtContainers, tmp_path: Path, name: str, check: Callable[[Sandbox], None]
) -> str:
    """Run a pod (hostname ``pod-<name>``) whose container's first action prints 16 bytes of
    ``/dev/urandom``, the time and the hostname; ``check`` its sandbox, check that the time
    is the host's and the hostname the pod's, and return the random bytes (hex)."""
    s = sid()
    before = time.time()
    cfg = SandboxConfig(
        id=s,
        hostname=f"pod-{name}",
        containers=(in_the_vms_uts(tmp_path, f"c{name}", ["sh", "-c", FIRST_ACTION]),),
    )
    sandbox = await vc.run_sandbox(cfg)
    check(sandbox)
    c = sandbox.container(f"c{name}")
    out = b""
    with trio.fail_after(60):
        while chunk := await c.read_stdout(""):
            out += chunk
        assert await c.wait() == 0
    after = time.time()
    lines = out.decode().split()
    assert len(lines) == 3, out
    assert before - 1 <= int(lines[1]) <= after + 1  # the host's time, not the template's
    assert lines[2] == f"pod-{name}"  # from the request, not the template
    await vc.stop_sandbox(s)
    await vc.delete_sandbox(s)
    assert len(lines[0]) == 32
    return lines[0]


@pytest.mark.vm
@pytest.mark.parametrize("vc_from_template", ["auto", "serial"], indirect=True)
async def test_clones_draw_their_own_randomness_and_keep_the_hosts_clock(
    vc_from_template: VirtContainers, tmp_path: Path
) -> None:
    vc = vc_from_template
    # auto is hybrid vsock here (scripts/setup builds its backend): plugged after the restore.
    wanted = resolve_channel(vc.config.hypervisor.agent_channel, default_backend())

    def check(sandbox: Sandbox) -> None:
        assert sandbox.vm is not None
        assert sandbox.vm.restored
        assert sandbox.vm.channel == wanted

    one = await first_action(vc, tmp_path, "one", check)
    assert one != await first_action(vc, tmp_path, "two", check)


@pytest.mark.vm
async def test_a_clone_gets_the_pod_network_after_the_restore(
    vc_from_template: VirtContainers, tmp_path: Path, pod_netns: tuple[str, str, str]
) -> None:
    netns, pod_ip, _ = pod_netns
    s = sid()
    cfg = SandboxConfig(
        id=s, netns=netns, containers=(container(tmp_path, "c", ["sleep", "1000"]),)
    )
    sandbox = await vc_from_template.run_sandbox(cfg)
    assert sandbox.vm is not None
    assert sandbox.vm.restored
    addresses = [
        a.address for i in await vc_from_template.list_interfaces(s) for a in i.IPAddresses
    ]
    assert pod_ip in addresses
    ping = await trio.run_process(
        ["busybox", "ping", "-c", "1", "-W", "10", pod_ip], capture_stdout=True, check=False
    )
    assert ping.returncode == 0, ping.stdout.decode()
    await vc_from_template.stop_sandbox(s)
    await vc_from_template.delete_sandbox(s)


@pytest.mark.vm
async def test_a_broken_template_falls_back_to_a_cold_boot(
    template_path: str, state_dir: str, nursery: trio.Nursery, host_cgroups: RecordingCgroups,
    tmp_path: Path,
) -> None:  # fmt: skip
    broken_root = Path("/dev/shm") / f"kpy-broken-{uuid.uuid4().hex[:8]}"
    try:
        broken = broken_root / "template"
        key = template_key(Config().qemu(None))
        shutil.copytree(Path(template_path) / key, broken / key)
        (broken / key / template.STATE_FILE).write_bytes(b"QEVM garbage")
        factory = FactoryConfig(enable_template=True, template_path=str(broken))
        vc = VirtContainers(
            nursery,
            Config(runtime=RuntimeConfig(state_dir=state_dir), factory=factory),
            cgroups=host_cgroups,
        )
        s = sid()
        cfg = SandboxConfig(id=s, containers=(container(tmp_path, "c", ["true"]),))
        sandbox = await vc.run_sandbox(cfg)
        assert sandbox.vm is not None
        assert not sandbox.vm.restored
        with trio.fail_after(60):
            assert await sandbox.container("c").wait() == 0
        await vc.stop_sandbox(s)
        await vc.delete_sandbox(s)
        assert list(template.clones_dir(broken).iterdir()) == []  # the failed copy is gone
    finally:
        shutil.rmtree(broken_root, ignore_errors=True)


class WedgedVsockFactory:
    """Clones whose vsock backend stops answering once the device is started (SIGSTOP):
    how vhost-device-vsock 0.3.0 wedges, never answering a CONNECT again."""

    def __init__(self, template_path: str) -> None:
        self.inner = TemplateFactory(template_path)
        self.stopped: list[int] = []

    async def get_vm(
        self, vm_id: str, config: QemuConfig, run_dir: Path, nursery: trio.Nursery
    ) -> Qemu:
        vm = await self.inner.get_vm(vm_id, config, run_dir, nursery)
        ready = vm.agent_endpoint().ready
        assert ready is not None  # hybrid vsock
        await ready()  # the guest has started the device: QEMU no longer waits on it
        assert vm.vsock_backend_pid is not None
        os.kill(vm.vsock_backend_pid, signal.SIGSTOP)
        self.stopped.append(vm.vsock_backend_pid)
        return vm


@pytest.mark.vm
async def test_a_clone_whose_vsock_wedges_is_reached_over_its_serial_port(
    template_path: str, state_dir: str, nursery: trio.Nursery, host_cgroups: RecordingCgroups,
    tmp_path: Path,
) -> None:  # fmt: skip
    factory = WedgedVsockFactory(template_path)
    config = Config(
        hypervisor=HypervisorConfig(agent_channel="hybrid-vsock"),
        runtime=RuntimeConfig(state_dir=state_dir),
    )
    vc = VirtContainers(nursery, config, factory=factory, cgroups=host_cgroups)
    s = sid()
    cfg = SandboxConfig(id=s, containers=(container(tmp_path, "c", ["sh", "-c", "exit 7"]),))
    started = time.monotonic()
    sandbox = await vc.run_sandbox(cfg)
    assert factory.stopped  # the backend was wedged, and the pod started anyway
    assert time.monotonic() - started >= LATE_VSOCK_PATIENCE
    assert sandbox.state.agent_channel == "serial"  # recorded, for a restarted shim
    assert sandbox.state.agent_socket.endswith("/agent.sock")
    with trio.fail_after(60):
        assert await sandbox.container("c").wait() == 7
    for pid in factory.stopped:
        os.kill(pid, signal.SIGCONT)
    await vc.stop_sandbox(s)
    await vc.delete_sandbox(s)
