"""The VM cache: VMs started ahead by a server, adopted by the shims that ask.

The unit tests check the records and the wire (both sides bound and check what
they read) and every way to a fallback; the VM tests run a real server with
real clones of a real template, and pods on them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from shimv2 import errdefs
from shimv2.vc import template
from shimv2.vc.api import VirtContainers, factory_for
from shimv2.vc.config import (
    Config,
    FactoryConfig,
    RuntimeConfig,
    parse_config,
)
from shimv2.vc.persist import Store
from shimv2.vc.qemu_config import QemuConfig
from shimv2.vc.qmp import Qmp
from shimv2.vc.sandbox import Sandbox, SandboxConfig
from shimv2.vc.template import TemplateFactory
from shimv2.vc.testing import RecordingFactory
from shimv2.vc.vm_cache import (
    MAX_LINE,
    CachedVm,
    CacheFactory,
    VmCache,
    ask,
    cache_key,
    read_message,
    share_top,
)
from tests.leaks import RecordingCgroups, vm_processes
from tests.mountinfo import mounts_in_every_namespace
from tests.vc.test_sandbox import container, host_cgroups, pod_netns, sid, state_dir
from tests.vc.test_template import (
    first_action,
    template_path,  # a template of this module's own
)

__all__ = ["host_cgroups", "pod_netns", "state_dir", "template_path"]  # fixtures, used by name

GOOD = {"id": "cache-0a1b2c", "pid": 4242, "start_time": 99, "channel": "serial"}


# -- unit: configuration, records, the wire -------------------------------------------


def test_the_cache_is_configured_with_katas_names() -> None:
    config = parse_config(
        '[factory]\nenable_template = true\ntemplate_path = "/dev/shm/t"\n'
        'vm_cache_number = 2\nvm_cache_endpoint = "/run/x/cache.sock"\n'
    )
    assert config.factory.vm_cache_number == 2
    factory = factory_for(config)
    assert isinstance(factory, CacheFactory)
    assert str(factory.endpoint) == "/run/x/cache.sock"
    assert isinstance(factory.fallback, TemplateFactory)  # a miss clones, then boots
    assert isinstance(factory_for(config, cache=False), TemplateFactory)  # the server's own
    assert parse_config("[factory]\nvm_cache_number = 0\n").factory.vm_cache_number == 0
    for bad in ("vm_cache_number = 65", "vm_cache_number = -1", 'vm_cache_endpoint = "c.sock"'):
        with pytest.raises(errdefs.InvalidArgument, match="vm_cache"):
            parse_config(f"[factory]\n{bad}\n")


def test_the_key_holds_the_templates_and_the_channel(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    base = QemuConfig(kernel=str(kernel), agent_channel="serial")
    key = cache_key(base)
    assert key.startswith(template.template_key(base))
    assert cache_key(dataclasses.replace(base, shared_dir="/x", cgroup=("/c",))) == key
    assert cache_key(dataclasses.replace(base, agent_channel="vsock")) != key
    assert cache_key(dataclasses.replace(base, memory_mib=1024)) != key


@pytest.mark.parametrize(
    "change",
    [
        {"id": "cache-../../etc"},  # a path, not an id
        {"id": "../cache-x"},
        {"id": "sb-someone-elses"},  # not a cached VM's
        {"id": 7},
        {"pid": 1},  # init
        {"pid": -5},
        {"pid": True},  # a bool is no pid
        {"pid": "4242"},
        {"start_time": 0},  # without it a pid names nothing for sure
        {"channel": "tcp"},
        {"restored": "yes"},
        {"rng_renewed": 1},
        {"accelerator": "x" * 100},
        {"vsock_cid": 1 << 64},
        {"virtiofsd_pid": -1},
        {"virtiofsd_pid": 4243},  # without its start time a pid names nothing for sure
        {"virtiofsd_pid": 1, "virtiofsd_start_time": 99},
        {"virtiofsd_start_time": "99"},
        {"extra": 1},
    ],
)
def test_a_malformed_record_is_refused(change: dict[str, Any]) -> None:
    assert CachedVm.from_dict(GOOD) == CachedVm(**GOOD)  # type: ignore[arg-type]
    with pytest.raises(errdefs.InvalidArgument, match=r"malformed|invalid"):
        CachedVm.from_dict({**GOOD, **change})
    with pytest.raises(errdefs.InvalidArgument):
        CachedVm.from_dict([GOOD])


def _pair() -> tuple[trio.SocketStream, socket.socket]:
    ours, theirs = socket.socketpair()
    return trio.SocketStream(trio.socket.from_stdlib_socket(ours)), theirs


@pytest.mark.parametrize(
    ("sent", "error"),
    [
        (b"x" * (MAX_LINE + 10), "over"),
        (b'{"op": "get"}\n{"op": "get"}\n', "more than one"),
        (b"not json\n", "not JSON"),
        (b"[1, 2]\n", "not a JSON object"),
    ],
)
async def test_the_wire_is_bounded_and_checked(sent: bytes, error: str) -> None:
    stream, peer = _pair()
    with peer:
        peer.sendall(sent)
        with pytest.raises(errdefs.InvalidArgument, match=error):
            await read_message(stream)
    await stream.aclose()


async def test_a_message_cut_short_is_an_error() -> None:
    stream, peer = _pair()
    peer.sendall(b'{"op": ')
    peer.close()
    with pytest.raises(errdefs.Unavailable, match="closed"):
        await read_message(stream)
    await stream.aclose()


@pytest.fixture
async def idle_server(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[VmCache]:
    """A server holding no VMs (``number`` 0): its protocol, without a VM."""
    cache = VmCache(
        QemuConfig(),
        RecordingFactory(),
        number=0,
        endpoint=tmp_path / "cache.sock",
        vm_dir=Store(tmp_path / "state").vm_dir,
    )
    await nursery.start(cache.serve)
    yield cache
    cache.quit()


async def test_the_server_answers_status_and_refuses_what_it_cannot_serve(
    idle_server: VmCache,
) -> None:
    endpoint = idle_server.endpoint
    assert (endpoint.stat().st_mode & 0o777) == 0o600  # root's only
    stream, status = await ask(endpoint, {"op": "status"})
    await stream.aclose()
    assert status == {
        "key": idle_server.key, "number": 0, "ready": [], "filling": 0, "handed_out": 0
    }  # fmt: skip
    stream, reply = await ask(endpoint, {"op": "get", "key": "another"})
    await stream.aclose()
    assert reply["vm"] is None
    assert "is for" in reply["reason"]
    stream, reply = await ask(endpoint, {"op": "get", "key": idle_server.key})
    await stream.aclose()
    assert reply == {"vm": None, "reason": "none ready yet"}
    with pytest.raises(errdefs.Unavailable, match="unknown op"):
        await ask(endpoint, {"op": "rm -rf"})
    raw = await trio.open_unix_socket(str(endpoint))
    async with raw:
        await raw.send_all(b"y" * (MAX_LINE + 1))
        reply = await read_message(raw)  # the server gives up on it, and says why
    assert f"over {MAX_LINE} bytes" in reply["error"]


async def test_no_server_or_no_vm_falls_back(
    idle_server: VmCache, tmp_path: Path, nursery: trio.Nursery
) -> None:
    for endpoint in (tmp_path / "absent.sock", idle_server.endpoint):
        fallback = RecordingFactory()
        factory = CacheFactory(endpoint, Store(tmp_path / "s").vm_dir, tmp_path, fallback)
        vm = await factory.get_vm("sbx", QemuConfig(), tmp_path / "vm", nursery)
        assert fallback.asked == ["sbx"]
        assert vm.vm_id == "sbx"
    # A server that sends garbage: a fallback too, and nothing adopted.
    bad = tmp_path / "bad.sock"
    listener = trio.socket.socket(socket.AF_UNIX)
    await listener.bind(str(bad))
    listener.listen(1)

    async def garbage() -> None:
        conn, _ = await listener.accept()
        with conn:
            await conn.recv(MAX_LINE)
            await conn.send(json.dumps({"vm": {**GOOD, "id": "cache-../x"}}).encode() + b"\n")
            assert await conn.recv(100) == b""  # no acknowledgement

    nursery.start_soon(garbage)
    fallback = RecordingFactory()
    factory = CacheFactory(bad, Store(tmp_path / "s").vm_dir, tmp_path, fallback)
    await factory.get_vm("sby", QemuConfig(), tmp_path / "vm", nursery)
    assert fallback.asked == ["sby"]
    listener.close()


# -- VMs: a real server, real clones, pods on them --------------------------------------


@dataclasses.dataclass
class Cached:
    server: VmCache
    config: Config


@pytest.fixture
async def cache(template_path: str, state_dir: str, tmp_path: Path) -> AsyncIterator[Cached]:
    factory = FactoryConfig(
        enable_template=True,
        template_path=template_path,
        vm_cache_number=1,
        vm_cache_endpoint=str(tmp_path / "cache.sock"),
    )
    config = Config(runtime=RuntimeConfig(state_dir=state_dir), factory=factory)
    server = VmCache(
        config.qemu(None),
        factory_for(config, cache=False),
        number=1,
        endpoint=factory.vm_cache_endpoint,
        vm_dir=Store(state_dir).vm_dir,
    )
    async with trio.open_nursery() as own:
        await own.start(server.serve)
        await _ready(server)
        yield Cached(server, config)
        server.quit()
    assert not Path(factory.vm_cache_endpoint).exists()
    clones = template.clones_dir(template_path)
    assert not clones.exists() or list(clones.iterdir()) == []  # every RAM copy is gone
    assert list((Path(state_dir) / "vm").iterdir()) == []
    assert vm_processes(state_dir) == []


async def _ready(server: VmCache, but: str = "") -> str:
    """The id of a VM ready in the cache (other than ``but``)."""
    for _ in range(2400):  # 120 s
        if server.ready and server.ready[0].vm.vm_id != but:
            return server.ready[0].vm.vm_id
        await trio.sleep(0.05)
    raise AssertionError(f"no VM ready in the cache in 120 s: {server.status()}")


async def _status(qmp_path: Path) -> str:
    """The run state of the VM whose QMP socket is at ``qmp_path``."""
    qmp = Qmp("test")
    await qmp.connect(str(qmp_path))
    try:
        return str((await qmp.execute("query-status"))["status"])
    finally:
        await qmp.aclose()


def _cgroup_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


@pytest.mark.vm
async def test_a_pod_takes_a_cached_vm_with_its_share_network_and_cgroup(
    cache: Cached,
    nursery: trio.Nursery,
    host_cgroups: RecordingCgroups,
    pod_netns: tuple[str, str, str],
    tmp_path: Path,
) -> None:
    netns, pod_ip, _ = pod_netns
    cached_id = await _ready(cache.server)
    assert await _status(cache.server.ready[0].vm.qmp_path) == "running"  # no cont to wait for
    cached_virtiofsd = cache.server.ready[0].vm.virtiofsd_pid  # its share is plugged already
    assert cached_virtiofsd is not None
    vc = VirtContainers(nursery, cache.config, cgroups=host_cgroups)
    s = sid()
    script = "test -x /bin/busybox && echo rootfs-ok; sleep 1000"
    cfg = SandboxConfig(
        id=s, netns=netns, containers=(container(tmp_path, "c", ["sh", "-c", script]),)
    )
    sandbox = await vc.run_sandbox(cfg)
    vm = sandbox.vm
    assert vm is not None
    assert vm.pid is not None
    assert vm.vm_id == cached_id  # the cached VM, not a clone made for the pod
    assert sandbox.state.vm_id == cached_id
    assert sandbox.state.vm_dir == str(Store(cache.config.runtime.state_dir).vm_dir(cached_id))
    assert vm.restored  # a template's clone: its RNG and clock renewed
    assert vm.rng_renewed  # the RNG by the server, before its warm-up container
    assert (await vm.qmp.execute("query-status"))["status"] == "running"
    assert sandbox.state.cgroup_path in _cgroup_of(vm.pid)  # moved into the pod's cgroup
    assert vm.virtiofsd_pid == cached_virtiofsd
    assert sandbox.state.cgroup_path in _cgroup_of(vm.virtiofsd_pid)
    c = sandbox.container("c")
    # The pod's tree is in the cached VM's share, in its virtiofsd's mount namespace.
    top = share_top(Path(sandbox.state.vm_dir))
    assert c.state.rootfs.startswith(f"{top}/")
    assert f"{top}/mounts/c/rootfs" in mounts_in_every_namespace(str(top))
    assert not mounts_in_every_namespace(str(Store(cache.config.runtime.state_dir).sbs))
    out = b""
    with trio.fail_after(60):
        while b"rootfs-ok" not in out:
            out += await c.read_stdout("")
    assert out.startswith(b"rootfs-ok")  # the container's root came over the pod's virtio-fs
    ping = await trio.run_process(
        ["busybox", "ping", "-c", "1", "-W", "10", pod_ip], capture_stdout=True, check=False
    )
    assert ping.returncode == 0, ping.stdout.decode()  # the pod's NIC, plugged late
    # The server starts the next one while the pod runs.
    assert await _ready(cache.server, but=cached_id) != cached_id
    assert cache.server.handed_out == 1
    await vc.stop_sandbox(s)
    await vc.delete_sandbox(s)
    assert not Path(sandbox.state.vm_dir).exists()
    assert mounts_in_every_namespace(str(top)) == []
    assert vm_processes(str(top)) == []  # its virtiofsd went with the pod
    assert not (template.clones_dir(cache.config.factory.template_path) / cached_id).exists()


@pytest.mark.vm
async def test_a_shim_restart_finds_its_cached_vm_again(
    cache: Cached, nursery: trio.Nursery, host_cgroups: RecordingCgroups, tmp_path: Path
) -> None:
    cached_id = await _ready(cache.server)
    s = sid()
    cfg = SandboxConfig(id=s, containers=(container(tmp_path, "c", ["sleep", "1000"]),))
    async with trio.open_nursery() as first_shim:
        vc = VirtContainers(first_shim, cache.config, cgroups=host_cgroups)
        sandbox = await vc.run_sandbox(cfg)
        assert sandbox.vm is not None
        assert sandbox.vm.vm_id == cached_id
        pid = sandbox.vm.pid
        await sandbox.vm.release()  # what a dead shim's closed sockets do: QMP is free
        first_shim.cancel_scope.cancel()  # the shim is gone; its VM runs on
    assert pid is not None
    assert os.path.exists(f"/proc/{pid}")
    again = VirtContainers(nursery, cache.config, cgroups=host_cgroups)
    found = await again.fetch_sandbox(s)
    assert found.vm is not None
    assert found.vm.vm_id == cached_id
    assert found.vm.pid == pid
    assert (await again.status_container(s, "c")).state == "running"
    # The pod's tree is in reach again: the namespace its virtiofsd holds.
    assert found.mount_ns is not None
    with open(found.mount_ns.path.replace("/ns/mnt", "/mountinfo")) as f:
        assert found.container("c").state.rootfs in [line.split()[4] for line in f]
    await again.stop_sandbox(s)
    await again.delete_sandbox(s)
    assert (
        not os.path.exists(f"/proc/{pid}/cmdline")
        or b"qemu" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    )


@pytest.mark.vm
async def test_a_vm_not_acknowledged_or_dead_in_the_cache_is_replaced(cache: Cached) -> None:
    server = cache.server
    first = await _ready(server)
    pid = server.ready[0].vm.pid
    # A shim that takes the record and dies before it adopts the VM.
    stream, reply = await ask(server.endpoint, {"op": "get", "key": server.key})
    assert reply["vm"]["id"] == first
    await stream.aclose()
    second = await _ready(server, but=first)
    assert pid is not None
    assert not os.path.exists(f"/proc/{pid}/cmdline")
    assert not (Path(cache.config.runtime.state_dir) / "vm" / first).exists()
    # A VM that dies while cached is cleaned up and replaced.
    victim = server.ready[0].vm.pid
    assert victim is not None
    os.kill(victim, 9)
    third = await _ready(server, but=second)
    assert not (Path(cache.config.runtime.state_dir) / "vm" / second).exists()
    assert not (template.clones_dir(cache.config.factory.template_path) / second).exists()
    # So is one whose virtiofsd dies: its share is gone, and its QEMU goes with it.
    victim = server.ready[0].vm.virtiofsd_pid
    qemu = server.ready[0].vm.pid
    assert victim is not None
    os.kill(victim, 9)
    await _ready(server, but=third)
    assert vm_processes(f"/vm/{third}/") == []
    assert qemu is not None
    assert not os.path.exists(f"/proc/{qemu}/cmdline")
    assert not (Path(cache.config.runtime.state_dir) / "vm" / third).exists()


@pytest.mark.vm
async def test_cached_vms_draw_their_own_randomness_and_keep_the_hosts_clock(
    cache: Cached, nursery: trio.Nursery, host_cgroups: RecordingCgroups, tmp_path: Path
) -> None:
    vc = VirtContainers(nursery, cache.config, cgroups=host_cgroups)
    taken: list[str] = []

    def check(sandbox: Sandbox) -> None:
        assert sandbox.vm is not None
        assert sandbox.vm.vm_id == taken[-1]  # each from the cache, clones of one template

    taken.append(await _ready(cache.server))
    one = await first_action(vc, tmp_path, "one", check)
    taken.append(await _ready(cache.server, but=taken[-1]))
    assert one != await first_action(vc, tmp_path, "two", check)
