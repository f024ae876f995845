"""The virtcontainers API: Kata's verbs, as async methods of one object.

``VirtContainers`` holds what the verbs share (configuration, store, factory,
tracer) instead of module globals. Sandboxes created or fetched through it
stay live in it until deleted; a verb on an id that is not live fetches the
sandbox from its persisted state first (as another process would).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import trio
from google.protobuf.empty_pb2 import Empty

from shimv2.errdefs import Error, FailedPrecondition, NotFound, ResourceExhausted
from shimv2.pb.kata import agent_pb2, types_pb2
from shimv2.vc.cgroups import HostCgroups
from shimv2.vc.config import Config, load_config
from shimv2.vc.container import ContainerConfig, ContainerStatus
from shimv2.vc.factory import DirectFactory, Factory
from shimv2.vc.ids import container_id, sandbox_id
from shimv2.vc.persist import Store
from shimv2.vc.qemu import Qemu
from shimv2.vc.qemu_config import HOTPLUG_PORTS
from shimv2.vc.sandbox import (
    Sandbox,
    SandboxConfig,
    SandboxStatus,
    kill_recorded,
    sandbox_state_for,
)
from shimv2.vc.tracing import Tracer, default_tracer

log = logging.getLogger(__name__)


def factory_for(config: Config, *, cache: bool = True) -> Factory:
    """Where pods get their VMs: from the VM cache when there is one, else clones of a
    template when enabled, else a cold boot (each the fallback of the one before)."""
    factory: Factory = DirectFactory()
    if config.factory.enable_template:
        from shimv2.vc.template import TemplateFactory

        factory = TemplateFactory(config.factory.template_path)
    if cache and config.factory.vm_cache_number > 0:
        from shimv2.vc.vm_cache import CacheFactory

        store = Store(config.runtime.state_dir)
        factory = CacheFactory(
            config.factory.vm_cache_endpoint, store.vm_dir, config.factory.template_path, factory
        )
    return factory


class VirtContainers:
    def __init__(
        self,
        nursery: trio.Nursery,
        config: Config | None = None,
        *,
        store: Store | None = None,
        factory: Factory | None = None,
        tracer: Tracer | None = None,
        cgroups: HostCgroups | None = None,
    ) -> None:
        self.config = config or load_config()
        self.store = store or Store(self.config.runtime.state_dir)
        self.factory = factory or factory_for(self.config)
        self.tracer = tracer or default_tracer()
        self._nursery = nursery
        self._live: dict[str, Sandbox] = {}
        self.cgroups = cgroups or HostCgroups()

    @contextlib.asynccontextmanager
    async def _verb(self, name: str, **ids: str) -> AsyncIterator[None]:
        """Every public verb: ids checked before anything else, one span."""
        if "sandbox" in ids:
            sandbox_id(ids["sandbox"])
        if "container" in ids:
            container_id(ids["container"])
        with self.tracer.span(name, ids):
            yield

    # -- sandboxes -----------------------------------------------------------

    async def create_sandbox(self, config: SandboxConfig) -> Sandbox:
        """Create the VM, the sandbox in it and its containers; roll back on failure."""
        async with self._verb("CreateSandbox", sandbox=config.id):
            sid = sandbox_id(config.id)
            state = sandbox_state_for(config)  # its cgroup path checked before any mkdir
            self.store.create(sid)
            sandbox = Sandbox(self.store, self.config, state, self._nursery, cgroups=self.cgroups)
            async with contextlib.AsyncExitStack() as undo:
                undo.push_async_callback(self._forget, sandbox)
                self.store.save(state)
                undo.push_async_callback(sandbox.release_vm)
                await sandbox.boot(self.factory, config.annotations)
                await sandbox.create_in_guest(config)
                for cc in config.containers:
                    undo.push_async_callback(self._undo_container, sandbox, cc.id)
                    await sandbox.create_container(cc)
                state.state = "ready"
                sandbox.save()
                undo.pop_all()
            self._live[sid] = sandbox
            return sandbox

    async def _undo_container(self, sandbox: Sandbox, cid: str) -> None:
        c = sandbox.containers.get(cid)
        if c is not None:
            with contextlib.suppress(Exception):
                await sandbox.unmount_storage(c)

    async def _forget(self, sandbox: Sandbox) -> None:
        with trio.CancelScope(shield=True):
            for c in list(sandbox.containers.values()):
                with contextlib.suppress(Exception):
                    await sandbox.unmount_storage(c)
            with contextlib.suppress(Exception):
                await sandbox.release_mount_ns()
            self.store.remove(sandbox.id, sandbox.state.vm_id)
            self._live.pop(sandbox.id, None)

    async def run_sandbox(self, config: SandboxConfig) -> Sandbox:
        async with self._verb("RunSandbox", sandbox=config.id):
            sandbox = await self.create_sandbox(config)
            try:
                await sandbox.start()
            except BaseException:
                with trio.CancelScope(shield=True):
                    await sandbox.stop(force=True)
                    await self._delete(sandbox)
                raise
            return sandbox

    async def start_sandbox(self, sid: str) -> Sandbox:
        async with self._verb("StartSandbox", sandbox=sid):
            sandbox = await self.fetch_sandbox(sid)
            await sandbox.start()
            return sandbox

    async def stop_sandbox(self, sid: str, force: bool = False) -> Sandbox:
        async with self._verb("StopSandbox", sandbox=sid):
            sandbox = await self.fetch_sandbox(sid)
            await sandbox.stop(force=force)
            return sandbox

    async def delete_sandbox(self, sid: str) -> None:
        async with self._verb("DeleteSandbox", sandbox=sid):
            sandbox = await self.fetch_sandbox(sid)
            await self._delete(sandbox)

    async def _delete(self, sandbox: Sandbox) -> None:
        async with self.store.locked(sandbox.id, exclusive=True):
            await sandbox.delete()
        self._live.pop(sandbox.id, None)

    async def fetch_sandbox(self, sid: str) -> Sandbox:
        """The live sandbox, or one rebuilt from its persisted state (any process)."""
        async with self._verb("FetchSandbox", sandbox=sid):
            sid = sandbox_id(sid)
            live = self._live.get(sid)
            if live is not None:
                return live
            async with self.store.locked(sid, exclusive=False):
                state = self.store.load(sid)
            sandbox = Sandbox(self.store, self.config, state, self._nursery, cgroups=self.cgroups)
            if state.state not in ("stopped", "creating") and state.qemu_pid:
                await self._reattach(sandbox)
            self._live[sid] = sandbox
            return sandbox

    async def _reattach(self, sandbox: Sandbox) -> None:
        state = sandbox.state
        qemu_config = self.config.qemu(state.shared_dir or None)
        try:
            vm_id = state.vm_id or state.id  # a cached VM keeps its own id
            vm = await Qemu.adopt(
                vm_id,
                qemu_config,
                self.store.vm_dir(vm_id),
                state.qemu_pid,
                state.virtiofsd_pid,
                state.vsock_cid,
                self._nursery,
                start_time=state.qemu_start_time,
                virtiofsd_start_time=state.virtiofsd_start_time,
                channel=state.agent_channel,
                vsock_backend_pid=state.vsock_backend_pid,
                vsock_backend_start_time=state.vsock_backend_start_time,
            )
        except (OSError, trio.TooSlowError) as exc:
            log.warning("sandbox %s: VM is gone (%s)", state.id, exc)
            sandbox.vm_gone = True
            for c in sandbox.containers.values():
                c.vm_lost()
            return
        sandbox.vm = vm
        if vm.virtiofsd_pid:
            try:  # the previous owner's thread in it died with it
                await sandbox.join_vm_share(vm)
            except (Error, OSError) as exc:
                log.warning("sandbox %s: its mounts are out of reach: %s", state.id, exc)
        sandbox.spawn(sandbox.watch_vm)
        await sandbox.connect_agent(self.config.agent.dial_timeout)
        sandbox.spawn(sandbox.watch_oom)
        for c in sandbox.containers.values():
            if c.state.state in ("running", "paused"):
                sandbox.spawn(c.watch_init)  # the previous owner's watchers died with it

    async def status_sandbox(self, sid: str) -> SandboxStatus:
        async with self._verb("StatusSandbox", sandbox=sid):
            live = self._live.get(sandbox_id(sid))
            if live is not None:
                return live.status()
            state = self.store.load(sid)
            return SandboxStatus(
                state.id,
                state.state,
                state.qemu_pid,
                tuple(
                    ContainerStatus(c.id, c.state, c.pid, c.exit_status, dict(c.annotations))
                    for c in state.containers.values()
                ),
            )

    async def list_sandbox(self) -> list[SandboxStatus]:
        async with self._verb("ListSandbox"):
            out = []
            for sid in self.store.list():
                try:
                    out.append(await self.status_sandbox(sid))
                except NotFound:
                    continue  # deleted while we listed
            return out

    def holds_sandboxes(self) -> bool:
        """Whether any sandbox is live in this process (created or fetched, not yet gone)."""
        return bool(self._live)

    def vm_processes(self) -> list[tuple[str, str, int]]:
        """(sandbox id, "hypervisor" | "virtiofsd", pid) of the VMs this process runs."""
        out = []
        for sid, sandbox in self._live.items():
            vm = sandbox.vm
            if vm is None:
                continue
            for component, pid in (("hypervisor", vm.pid), ("virtiofsd", vm.virtiofsd_pid)):
                if pid is not None:
                    out.append((sid, component, pid))
        return out

    async def pause_sandbox(self, sid: str) -> None:
        async with self._verb("PauseSandbox", sandbox=sid):
            await (await self.fetch_sandbox(sid)).pause()

    async def resume_sandbox(self, sid: str) -> None:
        async with self._verb("ResumeSandbox", sandbox=sid):
            await (await self.fetch_sandbox(sid)).resume()

    async def cleanup_sandbox(self, sid: str) -> None:
        """Remove everything a sandbox left, from its state alone (after a crash)."""
        async with self._verb("CleanupSandbox", sandbox=sid):
            sid = sandbox_id(sid)
            live = self._live.pop(sid, None)
            if live is not None:
                await live.stop(force=True)
                await live.delete()
                return
            state = self.store.load(sid)
            await kill_recorded(state)
            sandbox = Sandbox(self.store, self.config, state, self._nursery, cgroups=self.cgroups)
            await sandbox.release_network()
            sandbox.vm_gone = True
            sandbox.state.state = "stopped"
            await sandbox.delete()

    # -- containers ------------------------------------------------------------

    async def create_container(self, sid: str, config: ContainerConfig) -> ContainerStatus:
        async with self._verb("CreateContainer", sandbox=sid, container=config.id):
            sandbox = await self.fetch_sandbox(sid)
            return (await sandbox.create_container(config)).status()

    async def start_container(self, sid: str, cid: str) -> ContainerStatus:
        async with self._verb("StartContainer", sandbox=sid, container=cid):
            c = (await self.fetch_sandbox(sid)).container(cid)
            await c.start()
            return c.status()

    async def stop_container(self, sid: str, cid: str) -> ContainerStatus:
        async with self._verb("StopContainer", sandbox=sid, container=cid):
            c = (await self.fetch_sandbox(sid)).container(cid)
            await c.stop()
            return c.status()

    async def delete_container(self, sid: str, cid: str) -> ContainerStatus:
        async with self._verb("DeleteContainer", sandbox=sid, container=cid):
            return await (await self.fetch_sandbox(sid)).delete_container(cid)

    async def enter_container(
        self, sid: str, cid: str, exec_id: str, process: Mapping[str, Any]
    ) -> None:
        async with self._verb("EnterContainer", sandbox=sid, container=cid):
            await (await self.fetch_sandbox(sid)).container(cid).enter(exec_id, process)

    async def status_container(self, sid: str, cid: str) -> ContainerStatus:
        async with self._verb("StatusContainer", sandbox=sid, container=cid):
            c = (await self.fetch_sandbox(sid)).container(cid)
            if c.state.state == "running":
                # A process that died is noticed by its watcher; give it a moment
                # to land if the exit is already on its way.
                await trio.lowlevel.checkpoint()
            return c.status()

    async def kill_container(self, sid: str, cid: str, signal: int, all_: bool = False) -> None:
        async with self._verb("KillContainer", sandbox=sid, container=cid):
            await (await self.fetch_sandbox(sid)).container(cid).kill(signal, all_)

    async def pause_container(self, sid: str, cid: str) -> None:
        async with self._verb("PauseContainer", sandbox=sid, container=cid):
            await (await self.fetch_sandbox(sid)).container(cid).pause()

    async def resume_container(self, sid: str, cid: str) -> None:
        async with self._verb("ResumeContainer", sandbox=sid, container=cid):
            await (await self.fetch_sandbox(sid)).container(cid).resume()

    async def process_list_container(self, sid: str, cid: str, fmt: str = "json") -> bytes:
        async with self._verb("ProcessListContainer", sandbox=sid, container=cid):
            return await (await self.fetch_sandbox(sid)).container(cid).process_list(fmt)

    async def update_container(self, sid: str, cid: str, resources: Mapping[str, Any]) -> None:
        async with self._verb("UpdateContainer", sandbox=sid, container=cid):
            await (await self.fetch_sandbox(sid)).container(cid).update(resources)

    async def stats_container(self, sid: str, cid: str) -> agent_pb2.StatsContainerResponse:
        async with self._verb("StatsContainer", sandbox=sid, container=cid):
            return await (await self.fetch_sandbox(sid)).container(cid).stats()

    # -- devices and network -------------------------------------------------------

    async def add_device(self, sid: str, path: str, device_id: str) -> None:
        """Hotplug a block device (a file or block special) into the VM."""
        async with self._verb("AddDevice", sandbox=sid, device=device_id):
            sandbox = await self.fetch_sandbox(sid)
            vm = sandbox.running_vm()
            if vm.config.machine == "microvm":
                raise FailedPrecondition("machine microvm cannot hotplug devices; use q35")
            container_id(device_id)  # same character set; it becomes a QEMU id
            await vm.qmp.execute(
                "blockdev-add",
                {"node-name": f"drive-{device_id}", "driver": "raw",
                 "file": {"driver": "file", "filename": path}},
            )  # fmt: skip
            port = await self._free_root_port(vm)
            await vm.qmp.execute(
                "device_add",
                {"driver": "virtio-blk-pci", "id": device_id, "drive": f"drive-{device_id}",
                 "bus": port},
            )  # fmt: skip

    async def _free_root_port(self, vm: Qemu) -> str:
        used = set()
        for dev in await vm.qmp.execute("qom-list", {"path": "/machine/peripheral"}):
            if dev["type"].startswith("child<") and not dev["name"].startswith("rp"):
                bus = await vm.qmp.execute(
                    "qom-get",
                    {"path": f"/machine/peripheral/{dev['name']}", "property": "parent_bus"},
                )
                used.add(str(bus).rsplit("/", 1)[-1].split(".")[0])
        for i in range(HOTPLUG_PORTS):
            if f"rp{i}" not in used:
                return f"rp{i}"
        raise ResourceExhausted(f"all {HOTPLUG_PORTS} hotplug ports are in use")

    async def resize_vm(self, sid: str, *, vcpus: int = 0, add_memory_mib: int = 0) -> None:
        """Grow the VM (q35): plug vCPUs up to ``vcpus`` and a DIMM, then online them."""
        async with self._verb("ResizeVM", sandbox=sid):
            sandbox = await self.fetch_sandbox(sid)
            vm = sandbox.running_vm()
            added = await vm.hotplug_vcpus(vcpus) if vcpus else 0
            if add_memory_mib:
                await vm.hotplug_memory(add_memory_mib)
            request = agent_pb2.OnlineCPUMemRequest(
                wait=True, nb_cpus=added, cpu_only=not add_memory_mib
            )
            await sandbox.agent.call("OnlineCPUMem", request, Empty)

    async def list_interfaces(self, sid: str) -> list[types_pb2.Interface]:
        async with self._verb("ListInterfaces", sandbox=sid):
            sandbox = await self.fetch_sandbox(sid)
            reply = await sandbox.agent.call(
                "ListInterfaces", agent_pb2.ListInterfacesRequest(), agent_pb2.Interfaces
            )
            return list(reply.Interfaces)

    async def add_interface(self, sid: str, name: str) -> types_pb2.Interface:
        """Hotplug the pod netns link ``name`` into the VM (q35) and configure it in the guest."""
        async with self._verb("AddInterface", sandbox=sid):
            sandbox = await self.fetch_sandbox(sid)
            vm = sandbox.running_vm()
            if vm.config.machine == "microvm":
                raise FailedPrecondition("machine microvm cannot hotplug NICs; use q35")
            tap = await sandbox.attach_endpoint(name)
            try:
                await vm.qmp.getfd(tap.tap, tap.fd)
                await vm.qmp.execute(
                    "netdev_add", {"type": "tap", "id": tap.netdev_id, "fd": tap.tap}
                )
                await vm.qmp.execute(
                    "device_add",
                    {"driver": "virtio-net-pci", "id": f"nic-{tap.netdev_id}",
                     "netdev": tap.netdev_id, "mac": tap.mac, "romfile": "",
                     "bus": await self._free_root_port(vm)},
                )  # fmt: skip
            finally:
                tap.close()  # QEMU has its own copy, or the attach is undone below
            interface = tap.endpoint.to_interface()
            with trio.fail_after(self.config.agent.request_timeout):
                while True:  # the guest sees the NIC a moment after the ACPI event
                    try:
                        request = agent_pb2.UpdateInterfaceRequest(interface=interface)
                        return await sandbox.agent.call(
                            "UpdateInterface", request, types_pb2.Interface
                        )
                    except NotFound:
                        await trio.sleep(0.1)

    async def remove_interface(self, sid: str, name: str) -> None:
        """Unplug a hotplugged NIC: guest addresses off, device and tap removed."""
        async with self._verb("RemoveInterface", sandbox=sid):
            sandbox = await self.fetch_sandbox(sid)
            vm = sandbox.running_vm()
            tap = sandbox.tap_for(name)
            down = tap.endpoint.to_interface()
            del down.IPAddresses[:]
            await sandbox.agent.call(
                "UpdateInterface",
                agent_pb2.UpdateInterfaceRequest(interface=down),
                types_pb2.Interface,
            )
            await vm.qmp.execute("device_del", {"id": f"nic-{tap.netdev_id}"})
            with trio.fail_after(30):  # the guest acknowledges the unplug (ACPI)
                while await self._device_present(vm, f"nic-{tap.netdev_id}"):  # noqa: ASYNC110 - the bridge polls; no QMP event stream yet
                    await trio.sleep(0.1)
            await vm.qmp.execute("netdev_del", {"id": tap.netdev_id})
            await sandbox.detach_endpoint(tap)

    async def _device_present(self, vm: Qemu, device: str) -> bool:
        found = await vm.qmp.execute("qom-list", {"path": "/machine/peripheral"})
        return any(d["name"] == device for d in found)

    async def update_routes(self, sid: str, routes: list[types_pb2.Route]) -> list[types_pb2.Route]:
        async with self._verb("UpdateRoutes", sandbox=sid):
            sandbox = await self.fetch_sandbox(sid)
            request = agent_pb2.UpdateRoutesRequest(routes=agent_pb2.Routes(Routes=routes))
            reply = await sandbox.agent.call("UpdateRoutes", request, agent_pb2.Routes)
            return list(reply.Routes)

    async def list_routes(self, sid: str) -> list[types_pb2.Route]:
        async with self._verb("ListRoutes", sandbox=sid):
            sandbox = await self.fetch_sandbox(sid)
            reply = await sandbox.agent.call(
                "ListRoutes", agent_pb2.ListRoutesRequest(), agent_pb2.Routes
            )
            return list(reply.Routes)
