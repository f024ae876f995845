"""The virtcontainers verbs against real VMs (QEMU under TCG here), with leak checks."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from shimv2 import errdefs
from shimv2.oci import spec_to_json
from shimv2.vc.api import VirtContainers
from shimv2.vc.config import Config, HypervisorConfig, RuntimeConfig
from shimv2.vc.container import ContainerConfig
from shimv2.vc.qemu_config import default_guest_dir
from shimv2.vc.sandbox import SandboxConfig
from tests.guest.rootfs import build_rootfs, make_spec
from tests.leaks import RecordingCgroups, cgroup_hierarchies, process_cgroups, vm_processes
from tests.mountinfo import mounts_in_every_namespace
from tests.vc.test_port_forward import client_in

pytestmark = pytest.mark.vm

GUEST_KERNEL = (default_guest_dir() / "kver").read_text().strip()


async def process_table_once_it_shows(
    vc: VirtContainers, s: str, cid: str, word: bytes, timeout: float = 10.0
) -> bytes:
    """The container's ps table, read again until ``word`` is in it: a process
    caught in execve has an empty command line for a moment (seen in CI)."""
    deadline = trio.current_time() + timeout
    table = await vc.process_list_container(s, cid, "table")
    while word not in table and trio.current_time() < deadline:
        await trio.sleep(0.1)  # polling the guest: there is no event to wait for
        table = await vc.process_list_container(s, cid, "table")
    return table


@pytest.fixture
def host_cgroups() -> RecordingCgroups:
    """The real host cgroups; what the test's sandboxes made is checked afterwards."""
    return RecordingCgroups()


@pytest.fixture
def state_dir(host_cgroups: RecordingCgroups) -> Any:
    # Short: VM socket paths live under it and must stay under 108 bytes.
    path = f"/run/kpy-{uuid.uuid4().hex[:8]}"
    yield path
    leaks = vm_processes(path) + vm_processes("kata-py-sb")
    for leak in leaks:  # assert below, but never leave them to the next test
        os.kill(int(leak.split(":")[0]), signal.SIGKILL)
    for state in Path(path).glob("sbs/*/state.json"):  # also a subprocess's sandboxes
        host_cgroups.made += json.loads(state.read_text()).get("cgroup_dirs", [])
    cgroups_left = host_cgroups.left()
    deadline = time.monotonic() + 5
    # Only what this test made, once the killed VMs are gone.
    while host_cgroups.remove_now(host_cgroups.made) and time.monotonic() < deadline:
        time.sleep(0.05)
    mounts = mounts_in_every_namespace(path)
    for m in reversed(mounts):
        subprocess.run(["umount", "-l", m], check=False)
    left = os.listdir(f"{path}/sbs") if os.path.exists(f"{path}/sbs") else []
    shutil.rmtree(path, ignore_errors=True)  # before asserting: never leave it behind
    assert leaks == []
    assert mounts == []
    assert left == []
    assert cgroups_left == []


@pytest.fixture(params=["auto", "serial"])
async def vc(
    state_dir: str, nursery: trio.Nursery, host_cgroups: RecordingCgroups, request: Any
) -> VirtContainers:
    """Every verb over both agent channels: auto (hybrid vsock here) and virtio-serial."""
    hypervisor = HypervisorConfig(agent_channel=request.param)
    config = Config(hypervisor=hypervisor, runtime=RuntimeConfig(state_dir=state_dir))
    return VirtContainers(nursery, config, cgroups=host_cgroups)


def container(tmp_path: Path, cid: str, args: list[str]) -> ContainerConfig:
    bundle = tmp_path / f"bundle-{cid}"
    build_rootfs(bundle / "rootfs")
    spec = spec_to_json(make_spec("rootfs", args))
    return ContainerConfig(id=cid, bundle=str(bundle), spec=spec)


async def read_all(vc: VirtContainers, sid: str, cid: str, exec_id: str = "") -> bytes:
    c = (await vc.fetch_sandbox(sid)).container(cid)
    out = b""
    while chunk := await c.read_stdout(exec_id):
        out += chunk
    return out


def sid() -> str:
    return f"sb{uuid.uuid4().hex[:8]}"


async def test_sandbox_and_container_verbs(vc: VirtContainers, tmp_path: Path) -> None:
    s = sid()
    cfg = SandboxConfig(
        id=s, containers=(container(tmp_path, "main", ["sh", "-c", "echo hi; sleep 1000"]),)
    )
    sandbox = await vc.run_sandbox(cfg)
    assert (await vc.status_sandbox(s)).state == "running"
    assert [x.id for x in await vc.list_sandbox()] == [s]
    assert (await vc.status_container(s, "main")).state == "running"
    c = sandbox.container("main")
    assert await c.read_stdout("", 3) == b"hi\n"

    # exec, its output and exit status
    await vc.enter_container(
        s, "main", "e1", {"args": ["uname", "-r"], "cwd": "/", "user": {"uid": 0, "gid": 0}}
    )
    assert (await read_all(vc, s, "main", "e1")).decode().strip() == GUEST_KERNEL
    assert await c.wait_exec("e1") == 0

    # The guest loads a module a container needs on demand (critest's brctl specs).
    caps = ["CAP_NET_ADMIN"]
    bridge = {
        "args": ["sh", "-c", "brctl addbr kpybr0 && ip -o link show kpybr0"],
        "cwd": "/",
        "user": {"uid": 0, "gid": 0},
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
    }
    await vc.enter_container(s, "main", "e2", bridge)
    out = await read_all(vc, s, "main", "e2")
    assert await c.wait_exec("e2") == 0, out
    assert b"kpybr0" in out

    assert b"sleep" in await process_table_once_it_shows(vc, s, "main", b"sleep")
    stats = await vc.stats_container(s, "main")
    assert stats.cgroup_stats.memory_stats.usage.usage > 0
    await vc.update_container(s, "main", {"pids": {"limit": 100}})
    await vc.pause_container(s, "main")
    assert (await vc.status_container(s, "main")).state == "paused"
    with pytest.raises(errdefs.FailedPrecondition):
        await vc.pause_container(s, "main")
    await vc.resume_container(s, "main")

    # a second container joins the sandbox
    second = container(tmp_path, "side", ["sh", "-c", "exit 7"])
    await vc.create_container(s, second)
    await vc.start_container(s, "side")
    assert await sandbox.container("side").wait() == 7
    assert (await vc.status_container(s, "side")).exit_status == 7
    with pytest.raises(errdefs.FailedPrecondition):
        await vc.delete_container(s, "main")  # still running
    await vc.delete_container(s, "side")

    await vc.kill_container(s, "main", signal.SIGKILL)
    with trio.fail_after(20):
        assert await c.wait() == 137
    assert (await vc.status_container(s, "main")).state == "stopped"
    await vc.delete_container(s, "main")

    with pytest.raises(errdefs.FailedPrecondition):
        await vc.delete_sandbox(s)  # not stopped
    await vc.stop_sandbox(s)
    await vc.delete_sandbox(s)
    assert await vc.list_sandbox() == []


async def test_empty_and_bad_ids(vc: VirtContainers) -> None:
    with pytest.raises(errdefs.InvalidArgument, match="need sandbox id"):
        await vc.create_sandbox(SandboxConfig(id=""))
    with pytest.raises(errdefs.InvalidArgument, match="need container id"):
        await vc.status_container("x", "")
    with pytest.raises(errdefs.InvalidArgument, match="invalid sandbox id"):
        await vc.fetch_sandbox("../etc")
    with pytest.raises(errdefs.NotFound):
        await vc.fetch_sandbox("nosuch")
    assert await vc.list_sandbox() == []  # no storage directory: an empty list


@pytest.mark.parametrize("step", ["network", "vm", "agent", "container-spec", "container-rootfs"])
async def test_rollback_leaves_nothing(
    vc: VirtContainers, tmp_path: Path, step: str, state_dir: str
) -> None:
    s = sid()
    cc = container(tmp_path, "c", ["true"])
    netns = ""
    if step == "network":
        netns = "/var/run/netns/kpy-does-not-exist"
        expected: type[Exception] = errdefs.NotFound
    elif step == "vm":
        hyp = dataclasses.replace(vc.config.hypervisor, kernel=str(tmp_path / "no-kernel"))
        vc.config = dataclasses.replace(vc.config, hypervisor=hyp)
        expected = errdefs.FailedPrecondition
    elif step == "agent":
        # The agent cannot answer within 0.5 s of launch under TCG.
        agent = dataclasses.replace(vc.config.agent, dial_timeout=0.5)
        vc.config = dataclasses.replace(vc.config, agent=agent)
        expected = errdefs.Unavailable
    elif step == "container-spec":
        spec = dict(cc.spec)
        spec["process"] = {**spec["process"], "args": []}
        cc = dataclasses.replace(cc, spec=spec)
        expected = errdefs.InvalidArgument
    else:
        shutil.rmtree(Path(cc.bundle) / "rootfs")
        expected = errdefs.InvalidArgument
    with pytest.raises(expected):
        await vc.create_sandbox(SandboxConfig(id=s, netns=netns, containers=(cc,)))
    assert vm_processes(state_dir) == []
    assert [h for h in cgroup_hierarchies() if (h / "kata-py" / s).exists()] == []
    assert not os.path.exists(f"{state_dir}/sbs/{s}")
    assert not os.path.exists(f"{state_dir}/vm/{s}")
    assert await vc.list_sandbox() == []


async def test_vm_death_ends_every_task_with_255(vc: VirtContainers, tmp_path: Path) -> None:
    s = sid()
    cfg = SandboxConfig(id=s, containers=(container(tmp_path, "c", ["sleep", "1000"]),))
    sandbox = await vc.run_sandbox(cfg)
    assert sandbox.vm is not None
    assert sandbox.vm.pid is not None
    os.kill(sandbox.vm.pid, signal.SIGKILL)
    with trio.fail_after(10):
        assert await sandbox.container("c").wait() == 255
    assert (await vc.status_container(s, "c")).state == "stopped"
    await vc.stop_sandbox(s)
    await vc.delete_sandbox(s)


async def test_two_sandboxes_side_by_side(vc: VirtContainers, tmp_path: Path) -> None:
    ids = [sid(), sid()]
    boxes = {}

    async def run(s: str) -> None:
        cfg = SandboxConfig(
            id=s, containers=(container(tmp_path, s, ["sh", "-c", f"echo {s}; sleep 1000"]),)
        )
        boxes[s] = await vc.run_sandbox(cfg)

    async with trio.open_nursery() as n:
        for s in ids:
            n.start_soon(run, s)
    assert boxes[ids[0]].state.qemu_pid != boxes[ids[1]].state.qemu_pid
    for s in ids:
        assert await boxes[s].container(s).read_stdout("", 64) == f"{s}\n".encode()
    assert sorted(x.id for x in await vc.list_sandbox()) == sorted(ids)
    for s in ids:
        await vc.stop_sandbox(s)
        await vc.delete_sandbox(s)


FETCH_SCRIPT = """
import sys, trio, os
from shimv2.vc.api import VirtContainers
from shimv2.vc.config import Config, RuntimeConfig
from shimv2.vc.container import ContainerConfig
from shimv2.vc.sandbox import SandboxConfig
import json

async def main():
    state_dir, sid, bundle, spec = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    async with trio.open_nursery() as n:
        vc = VirtContainers(n, Config(runtime=RuntimeConfig(state_dir=state_dir)))
        cc = ContainerConfig(id="c", bundle=bundle, spec=spec)
        await vc.run_sandbox(SandboxConfig(id=sid, containers=(cc,)))
        print("RUNNING", flush=True)
        os._exit(0)  # the owner dies without cleaning up

trio.run(main)
"""


async def test_fetch_from_another_process_after_the_owner_died(
    vc: VirtContainers, tmp_path: Path, state_dir: str
) -> None:
    import json

    s = sid()
    cc = container(tmp_path, "c", ["sh", "-c", "sleep 1000"])
    with trio.fail_after(120):
        proc = await trio.run_process(
            [sys.executable, "-c", FETCH_SCRIPT, state_dir, s, cc.bundle, json.dumps(cc.spec)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=str(Path(__file__).resolve().parents[2]),
        )
    assert b"RUNNING" in proc.stdout, proc.stderr.decode()[-2000:]
    assert [x.id for x in await vc.list_sandbox()] == [s]
    sandbox = await vc.fetch_sandbox(s)
    assert sandbox.vm is not None
    assert sandbox.vm.pid == sandbox.state.qemu_pid
    # The pod's tree is in reach again: the namespace its virtiofsd holds.
    assert sandbox.mount_ns is not None
    with open(sandbox.mount_ns.path.replace("/ns/mnt", "/mountinfo")) as f:
        assert sandbox.container("c").state.rootfs in [line.split()[4] for line in f]
    # The agent answers the new process on the same VM.
    assert b"sleep" in await process_table_once_it_shows(vc, s, "c", b"sleep")
    assert (await vc.status_container(s, "c")).state == "running"
    assert process_cgroups(sandbox.state.qemu_pid)["memory"] == f"/kata-py/{s}"
    await vc.stop_sandbox(s)
    await vc.delete_sandbox(s)
    # Made by the dead owner, removed by this process from the state alone.
    assert [h for h in cgroup_hierarchies() if (h / "kata-py" / s).exists()] == []


async def test_pause_and_resume_sandbox(vc: VirtContainers, tmp_path: Path) -> None:
    s = sid()
    cfg = SandboxConfig(id=s, containers=(container(tmp_path, "c", ["sleep", "1000"]),))
    sandbox = await vc.run_sandbox(cfg)
    await vc.pause_sandbox(s)
    assert sandbox.vm is not None
    assert (await sandbox.vm.qmp.execute("query-status"))["status"] == "paused"
    # A call made while paused waits for the resume and is then answered. Over
    # hybrid vsock it used to reach vhost-device-vsock while its rings were
    # stopped, which ends the backend's worker: no agent answered after resume.
    answered: list[bytes] = []
    done = trio.Event()

    async def list_processes() -> None:
        answered.append(await vc.process_list_container(s, "c"))
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(list_processes)
        await trio.sleep(1)
        assert answered == []
        await vc.resume_sandbox(s)
        assert (await sandbox.vm.qmp.execute("query-status"))["status"] == "running"
        with trio.fail_after(30):
            await done.wait()
    assert len(json.loads(answered[0])) == 1  # sleep's pid
    await vc.stop_sandbox(s)
    await vc.delete_sandbox(s)


@pytest.fixture
def pod_netns() -> Any:
    """A CNI-like pod network: netns with eth0 10.77.<n>.2/24, host end .1."""
    n = int(uuid.uuid4().hex[:2], 16) % 200 + 20
    name = f"kpy-sb-{uuid.uuid4().hex[:6]}"
    host_end = f"kh{uuid.uuid4().hex[:6]}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", name)
    try:
        ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", name)
        ip("addr", "add", f"10.77.{n}.1/24", "dev", host_end)
        ip("link", "set", host_end, "up")
        ns = ("netns", "exec", name, "ip")
        ip(*ns, "addr", "add", f"10.77.{n}.2/24", "dev", "eth0")
        ip(*ns, "link", "set", "eth0", "up")
        ip(*ns, "link", "set", "lo", "up")
        ip(*ns, "route", "add", "default", "via", f"10.77.{n}.1")
        yield f"/var/run/netns/{name}", f"10.77.{n}.2", name
    finally:
        subprocess.run(["ip", "link", "del", host_end], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


async def test_pod_network_reaches_the_guest(
    vc: VirtContainers, tmp_path: Path, pod_netns: tuple[str, str, str]
) -> None:
    netns, pod_ip, name = pod_netns
    s = sid()
    cfg = SandboxConfig(
        id=s, netns=netns, containers=(container(tmp_path, "c", ["sleep", "1000"]),)
    )
    await vc.run_sandbox(cfg)
    interfaces = await vc.list_interfaces(s)
    addresses = [a.address for i in interfaces for a in i.IPAddresses]
    assert pod_ip in addresses
    routes = await vc.list_routes(s)
    gateway = pod_ip.rsplit(".", 1)[0] + ".1"
    assert any(r.gateway == gateway for r in routes)
    # UpdateRoutes replaces the guest's routes: without the default route it is gone.
    kept = [r for r in routes if r.gateway != gateway]
    assert not any(r.gateway == gateway for r in await vc.update_routes(s, kept))
    assert not any(r.gateway == gateway for r in await vc.list_routes(s))
    await vc.update_routes(s, routes)
    assert any(r.gateway == gateway for r in await vc.list_routes(s))
    # The guest kernel answers ping through tap0_kata and the tc redirect.
    ping = await trio.run_process(
        ["busybox", "ping", "-c", "1", "-W", "10", pod_ip], capture_stdout=True, check=False
    )
    assert ping.returncode == 0, ping.stdout.decode()
    await vc.stop_sandbox(s)
    await vc.delete_sandbox(s)
    links = await trio.run_process(
        ["ip", "netns", "exec", name, "ip", "-o", "link"], capture_stdout=True
    )
    assert b"tap0_kata" not in links.stdout
    qdiscs = await trio.run_process(
        ["ip", "netns", "exec", name, "tc", "qdisc", "show", "dev", "eth0"], capture_stdout=True
    )
    assert b"ingress" not in qdiscs.stdout


async def test_add_device_hotplugs_a_disk_on_q35(vc: VirtContainers, tmp_path: Path) -> None:
    s = sid()
    cfg = SandboxConfig(id=s, containers=(container(tmp_path, "c", ["sleep", "1000"]),))
    await vc.run_sandbox(cfg)
    with pytest.raises(errdefs.FailedPrecondition, match="microvm"):
        await vc.add_device(s, str(tmp_path / "none.img"), "disk0")
    await vc.stop_sandbox(s)
    await vc.delete_sandbox(s)

    hyp = dataclasses.replace(vc.config.hypervisor, machine_type="q35")
    vc.config = dataclasses.replace(vc.config, hypervisor=hyp)
    s = sid()
    cfg = SandboxConfig(id=s, containers=(container(tmp_path, "d", ["sleep", "1000"]),))
    await vc.run_sandbox(cfg)
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (8 << 20))
    await vc.add_device(s, str(disk), "disk1")
    process = {"args": ["cat", "/proc/partitions"], "cwd": "/", "user": {"uid": 0, "gid": 0}}
    partitions = b""
    with trio.fail_after(20):
        while b"vda" not in partitions:
            await vc.enter_container(s, "d", f"p{uuid.uuid4().hex[:6]}", process)
            exec_ids = list((await vc.fetch_sandbox(s)).container("d").execs)
            partitions = await read_all(vc, s, "d", exec_ids[-1])
            await trio.sleep(0.2)
    assert b"8192 vda" in partitions
    await vc.stop_sandbox(s)
    await vc.delete_sandbox(s)


async def test_oom_in_the_guest_reaches_on_oom(vc: VirtContainers, tmp_path: Path) -> None:
    s = sid()
    hog = "exec /tmp/busybox head -c 60000000 /dev/zero > /tmp/fill"
    script = f"/bin/busybox cp /bin/busybox /tmp/busybox && exec /tmp/busybox sh -c '{hog}'"
    cc = container(tmp_path, "hog", ["sh", "-c", script])
    spec = dict(cc.spec)
    spec["mounts"] = [*spec["mounts"], {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}]
    spec["linux"] = {**spec["linux"], "resources": {"memory": {"limit": 16 << 20}}}
    sandbox = await vc.create_sandbox(
        SandboxConfig(id=s, containers=(dataclasses.replace(cc, spec=spec),))
    )
    seen: list[str] = []

    def on_oom(cid: str) -> None:
        seen.append(cid)

    sandbox.on_oom = on_oom
    await vc.start_sandbox(s)
    with trio.fail_after(60):
        assert await sandbox.container("hog").wait() == 137
    # already: the OOM kill is reported before the exit it caused (containerd's OOMKilled)
    assert seen == ["hog"]
    await vc.stop_sandbox(s)
    await vc.delete_sandbox(s)


async def test_resize_vm_grows_memory_on_q35(vc: VirtContainers, tmp_path: Path) -> None:
    hyp = dataclasses.replace(vc.config.hypervisor, machine_type="q35")
    vc.config = dataclasses.replace(vc.config, hypervisor=hyp)
    s = sid()
    cfg = SandboxConfig(id=s, containers=(container(tmp_path, "c", ["sleep", "1000"]),))
    await vc.run_sandbox(cfg)

    async def guest(cmd: str) -> str:
        eid = f"x{uuid.uuid4().hex[:6]}"
        process = {"args": ["sh", "-c", cmd], "cwd": "/", "user": {"uid": 0, "gid": 0}}
        await vc.enter_container(s, "c", eid, process)
        return (await read_all(vc, s, "c", eid)).decode()

    mem_before = int((await guest("grep MemTotal /proc/meminfo")).split()[1])
    await vc.resize_vm(s, add_memory_mib=256)
    mem_after = int((await guest("grep MemTotal /proc/meminfo")).split()[1])
    assert mem_after - mem_before == 256 * 1024
    with pytest.raises(errdefs.InvalidArgument, match="multiples of 128"):
        await vc.resize_vm(s, add_memory_mib=100)

    await vc.stop_sandbox(s)
    await vc.delete_sandbox(s)


async def test_nic_hotplug_add_and_remove_on_q35(
    vc: VirtContainers, tmp_path: Path, pod_netns: tuple[str, str, str]
) -> None:
    netns, _, name = pod_netns
    hyp = dataclasses.replace(vc.config.hypervisor, machine_type="q35")
    vc.config = dataclasses.replace(vc.config, hypervisor=hyp)
    s = sid()
    cfg = SandboxConfig(
        id=s, netns=netns, containers=(container(tmp_path, "c", ["sleep", "1000"]),)
    )
    await vc.run_sandbox(cfg)
    # CNI adds a second interface to the running pod.
    n = int(uuid.uuid4().hex[:2], 16) % 200 + 20
    host_end = f"kx{uuid.uuid4().hex[:6]}"

    async def ip(*args: str) -> None:
        await trio.run_process(["ip", *args], capture_stdout=True)

    await ip("link", "add", host_end, "type", "veth", "peer", "name", "eth1", "netns", name)
    try:
        await ip("addr", "add", f"10.78.{n}.1/24", "dev", host_end)
        await ip("link", "set", host_end, "up")
        await ip("netns", "exec", name, "ip", "addr", "add", f"10.78.{n}.2/24", "dev", "eth1")
        await ip("netns", "exec", name, "ip", "link", "set", "eth1", "up")
        added = await vc.add_interface(s, "eth1")
        assert f"10.78.{n}.2" in [a.address for a in added.IPAddresses]
        ping = ["busybox", "ping", "-c", "1", "-W", "10", f"10.78.{n}.2"]
        assert (await trio.run_process(ping, check=False, capture_stdout=True)).returncode == 0
        with pytest.raises(errdefs.AlreadyExists):
            await vc.add_interface(s, "eth1")
        await vc.remove_interface(s, "eth1")
        addresses = [a.address for i in await vc.list_interfaces(s) for a in i.IPAddresses]
        assert f"10.78.{n}.2" not in addresses
        links = await trio.run_process(
            ["ip", "netns", "exec", name, "ip", "-o", "link"], capture_stdout=True
        )
        assert b"tap1_kata" not in links.stdout
        assert b"tap0_kata" in links.stdout
    finally:
        await trio.run_process(["ip", "link", "del", host_end], check=False)
    await vc.stop_sandbox(s)
    await vc.delete_sandbox(s)


async def test_runc_is_selectable_in_the_guest(vc: VirtContainers, tmp_path: Path) -> None:
    agent = dataclasses.replace(vc.config.agent, oci_runtime="runc")
    vc.config = dataclasses.replace(vc.config, agent=agent)
    s = sid()
    cfg = SandboxConfig(
        id=s, containers=(container(tmp_path, "c", ["sh", "-c", "echo $0; exit 6"]),)
    )
    sandbox = await vc.run_sandbox(cfg)
    assert sandbox.vm is not None
    assert "kata_py.runtime=runc" in sandbox.vm.kernel_cmdline()
    with trio.fail_after(60):
        assert await sandbox.container("c").wait() == 6
    assert "runtime='runc'" in sandbox.vm.console_path.read_text()  # the agent's start line
    await vc.stop_sandbox(s)
    await vc.delete_sandbox(s)


async def test_bind_mounts_of_host_paths_reach_the_container(
    vc: VirtContainers, tmp_path: Path
) -> None:
    data, conf, hosts = tmp_path / "data", tmp_path / "conf", tmp_path / "hosts"
    data.mkdir()
    conf.mkdir()
    (conf / "setting").write_text("on\n")
    hosts.write_text("10.1.2.3 db\n")
    # A plain ro covers the top mount only: a tmpfs below it stays writable (as runc;
    # critest's non-recursive read-only spec). virtio-fs shows the guest one mount.
    (conf / "scratch").mkdir()
    await trio.run_process(["mount", "-t", "tmpfs", "scratch", conf / "scratch"])
    script = (
        "echo out > /data/written; cat /conf/setting /etc/hosts;"
        " touch /conf/x 2>&1 || echo read-only; echo in > /conf/scratch/y && echo sub-writable"
    )
    cfg = container(tmp_path, "c", ["sh", "-c", script])

    def bind(source: Path, dest: str, *options: str) -> dict[str, Any]:
        return {"destination": dest, "type": "bind", "source": str(source), "options": [*options]}

    binds = [
        bind(data, "/data", "rbind", "rw"),
        bind(conf, "/conf", "rbind", "ro"),
        bind(hosts, "/etc/hosts", "rbind", "ro"),
    ]
    cfg = dataclasses.replace(cfg, spec={**cfg.spec, "mounts": [*cfg.spec["mounts"], *binds]})
    s = sid()
    try:
        sandbox = await vc.run_sandbox(SandboxConfig(id=s, containers=(cfg,)))
        assert await read_all(vc, s, "c") == (
            b"on\n10.1.2.3 db\ntouch: /conf/x: Read-only file system\nread-only\nsub-writable\n"
        )
        with trio.fail_after(30):
            assert await sandbox.container("c").wait() == 0
        assert (data / "written").read_text() == "out\n"
        assert not (conf / "x").exists()
        assert (conf / "scratch" / "y").read_text() == "in\n"
        await vc.stop_sandbox(s)
        await vc.delete_sandbox(s)  # the state_dir fixture checks that no mount is left
    finally:
        await trio.run_process(["umount", conf / "scratch"])


def _status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _memory_charged(path: str) -> int:
    """What the cgroup ``path`` is charged for memory (v1 or v2)."""
    (h,) = [h for h in cgroup_hierarchies() if h.name in ("memory", "cgroup")]
    name = "memory.current" if h.name == "cgroup" else "memory.usage_in_bytes"
    return int((h / path.lstrip("/") / name).read_text())


async def test_qemu_and_virtiofsd_are_charged_to_the_pod_cgroup(
    vc: VirtContainers, tmp_path: Path, host_cgroups: RecordingCgroups
) -> None:
    s = sid()
    top = f"kpy-test-{uuid.uuid4().hex[:6]}"
    path = f"/{top}/pod/{s}"  # as CRI's pause container: the pod's cgroup, then the sandbox id
    cc = container(tmp_path, "c", ["sleep", "1000"])
    sandbox = await vc.run_sandbox(SandboxConfig(id=s, containers=(cc,), cgroups_path=path))
    vm = sandbox.vm
    assert vm is not None
    assert vm.pid is not None
    assert vm.virtiofsd_pid is not None
    hierarchies = cgroup_hierarchies()
    names = ["" if h.name == "cgroup" else h.name for h in hierarchies]  # "" = v2
    assert "memory" in names or names == [""]
    helpers = [vm.pid, vm.virtiofsd_pid]
    if vm.channel == "hybrid-vsock":  # auto, on this host
        assert vm.vsock_backend_pid is not None
        helpers.append(vm.vsock_backend_pid)
    for pid in helpers:
        joined = process_cgroups(pid)
        assert {n: joined[n] for n in names} == dict.fromkeys(names, path), pid
    # The exec left each its own command line, which pid identity checks read.
    qemu_argv = Path(f"/proc/{vm.pid}/cmdline").read_bytes().split(b"\0")
    assert qemu_argv[0] == vm.config.binary.encode()
    assert f"kata-py-{s}".encode() in qemu_argv
    virtiofsd_argv = Path(f"/proc/{vm.virtiofsd_pid}/cmdline").read_bytes().split(b"\0")
    assert virtiofsd_argv[0] == vm.config.virtiofsd.encode()
    # Charged from the first page: the guest's RAM (shared memfd) and QEMU's own
    # memory are all in the pod's cgroup, none left behind in the shim's.
    guest_ram = _status_bytes(vm.pid, "RssShmem")
    resident = guest_ram + _status_bytes(vm.pid, "RssAnon")
    assert guest_ram > 32 << 20
    assert _memory_charged(path) >= resident * 0.95
    recorded = vc.store.load(s)
    assert recorded.cgroup_path == path
    assert recorded.cgroup_dirs == host_cgroups.made
    assert len(recorded.cgroup_dirs) == 3 * len(hierarchies)  # top, pod, sandbox: all ours

    await vc.stop_sandbox(s)
    await vc.delete_sandbox(s)
    assert [h for h in hierarchies if (h / top).exists()] == []


async def test_port_forward_reaches_the_guests_loopback(
    vc: VirtContainers, tmp_path: Path, pod_netns: tuple[str, str, str]
) -> None:
    """As containerd forwards a port: a dial on 127.0.0.1 inside the pod's netns on the host."""
    netns, _, name = pod_netns
    s = sid()
    server = ["/bin/busybox", "nc", "-ll", "-p", "8080", "-e", "/bin/busybox", "echo", "hi"]
    cfg = SandboxConfig(id=s, netns=netns, containers=(container(tmp_path, "c", server),))
    await vc.run_sandbox(cfg)
    if vc.config.hypervisor.agent_channel == "serial":  # no vsock: no relay, nothing answers
        assert (await client_in(netns, 8080, "")).startswith("failed")
    else:
        got = ""
        with trio.fail_after(60):
            while got != "hi\n":  # the server may not listen yet
                got = await client_in(netns, 8080, "")
                await trio.sleep(0.2)
    await vc.stop_sandbox(s)
    await vc.delete_sandbox(s)
    rules = await trio.run_process(
        ["ip", "netns", "exec", name, "iptables", "-t", "nat", "-S", "OUTPUT"], capture_stdout=True
    )
    assert b"kata-py port-forward" not in rules.stdout
