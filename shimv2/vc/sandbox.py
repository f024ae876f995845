"""A sandbox: one long-lived VM, the agent inside it, and its containers.

Creation is a sequence of steps, each with its undo on an exit stack, so a
failure at any step rolls back everything done so far. Background work (the
VM watcher, the agent connection, WaitProcess per process) runs in the nursery
the caller lends; nothing outlives it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import trio
from google.protobuf.empty_pb2 import Empty

from shimv2.errdefs import AlreadyExists, Error, FailedPrecondition, NotFound, Unavailable
from shimv2.guest_protocol import FORWARD_VSOCK_PORT
from shimv2.pb.kata import agent_pb2, types_pb2
from shimv2.vc import network, storage, template
from shimv2.vc.agent import AgentClient, connect_agent, open_stream
from shimv2.vc.cgroups import HostCgroups, sandbox_cgroup
from shimv2.vc.config import Config, apply_annotations
from shimv2.vc.container import Container, ContainerConfig, ContainerStatus
from shimv2.vc.factory import Factory
from shimv2.vc.hypervisor import AgentEndpoint
from shimv2.vc.ids import container_id, sandbox_id
from shimv2.vc.mountns import MountNamespace
from shimv2.vc.persist import ContainerState, SandboxState, Store
from shimv2.vc.port_forward import PortForward
from shimv2.vc.procs import ProcessIdentity
from shimv2.vc.qemu import Qemu
from shimv2.vc.qemu_config import SHARED_TAG
from shimv2.vc.ratelimit import Backoff, TokenBucket
from shimv2.vc.vsock import backend_argv_marker

log = logging.getLogger(__name__)

T = TypeVar("T")

# A late-device VM's vsock agent gets this long before its serial port is used.
LATE_VSOCK_PATIENCE = 10.0
AGENT_HOLD_TIMEOUT = 10.0  # pausing: the guest reads what the host sent before


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    id: str
    hostname: str = ""
    netns: str = ""
    annotations: Mapping[str, str] = field(default_factory=dict)
    containers: tuple[ContainerConfig, ...] = ()
    dns: tuple[str, ...] = ()
    # The sandbox container's linux.cgroupsPath: QEMU and virtiofsd run there.
    cgroups_path: str = ""


@dataclass(frozen=True, slots=True)
class SandboxStatus:
    id: str
    state: str
    qemu_pid: int
    containers: tuple[ContainerStatus, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)


class Sandbox:
    def __init__(
        self,
        store: Store,
        config: Config,
        state: SandboxState,
        nursery: trio.Nursery,
        *,
        cgroups: HostCgroups | None = None,
    ) -> None:
        self.store = store
        self.cgroups = cgroups or HostCgroups()
        self.config = config
        self.state = state
        self._nursery = nursery
        self.vm: Qemu | None = None
        self._agent: AgentClient | None = None
        self._agent_scope: trio.CancelScope | None = None
        self.containers: dict[str, Container] = {
            cid: Container(self, cs) for cid, cs in state.containers.items()
        }
        self.vm_gone = False
        self.vm_exited = trio.Event()
        self.taps: list[network.TapAttachment] = []
        self._releasing = False  # we are the ones stopping the VM
        # Where the pod's tree of mounts lives (``shimv2.vc.mountns``); a sandbox
        # rebuilt in another process has none, and works in its own namespace.
        self.mount_ns: MountNamespace | None = None
        self._port_forward: PortForward | None = None
        self._port_forward_scope = trio.CancelScope()
        # Called with a container id when the guest reports an OOM kill in it.
        self.on_oom: Callable[[str], None] | None = None

    @property
    def id(self) -> str:
        return self.state.id

    @property
    def agent(self) -> AgentClient:
        if self._agent is None or self._agent.closed:
            raise Unavailable(f"sandbox {self.id}: the agent is not connected")
        return self._agent

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        self._nursery.start_soon(fn, *args)

    def save(self, *, teardown: bool = False) -> None:
        """Persist the state. On ``teardown`` (what is being undone) a state that cannot
        be written (a full disk) is logged, not an error: undoing must not need space,
        and the last state written describes more than is left, which cleanup takes."""
        self.state.containers = {cid: c.state for cid, c in self.containers.items()}
        try:
            self.store.save(self.state)
        except Error as exc:
            if not teardown:
                raise
            log.error("sandbox %s: %s", self.id, exc)

    def status(self) -> SandboxStatus:
        return SandboxStatus(
            self.id,
            self.state.state,
            self.state.qemu_pid,
            tuple(c.status() for c in self.containers.values()),
        )

    def container(self, cid: str) -> Container:
        c = self.containers.get(container_id(cid))
        if c is None:
            raise NotFound(f"container {cid} not found in sandbox {self.id}")
        return c

    # -- creation ----------------------------------------------------------------

    async def boot(self, factory: Factory, annotations: Mapping[str, str]) -> None:
        """Start the VM and connect to its agent (the caller handles rollback)."""
        config = apply_annotations(self.config, annotations)
        self.mount_ns = await trio.to_thread.run_sync(MountNamespace.create)
        shared = await self.mount_ns.run(storage.prepare_shared, self.store.sandbox_dir(self.id))
        self.state.shared_dir = str(shared)
        self.state.vm_dir = str(self.store.vm_dir(self.id))
        qemu_config = dataclasses.replace(
            config.qemu(str(shared)), shared_dir_mount_ns=self.mount_ns.path
        )
        if self.state.netns:
            self.taps = await network.add_interfaces(self.state.netns)
            self.state.taps = [f"{t.index}:{t.endpoint.name}" for t in self.taps]
            self.save()  # recorded before anything can fail, for cleanup after a crash
            qemu_config = dataclasses.replace(qemu_config, nics=tuple(t.nic() for t in self.taps))
        qemu_config = dataclasses.replace(qemu_config, cgroup=self.make_cgroup())
        try:
            self.vm = await factory.get_vm(
                self.id, qemu_config, Path(self.state.vm_dir), self._nursery
            )
        finally:
            for t in self.taps:
                t.close()  # QEMU holds its own copies now
        if self.vm.config.shared_dir != qemu_config.shared_dir:
            await self.join_vm_share(self.vm)
        self._record_vm(self.vm)
        self.save()
        self.spawn(self.watch_vm)
        await self._connect_new_vm(self.vm, config.agent.dial_timeout)
        if self.vm.restored:
            await self._fix_up_clone()
        self.spawn(self.watch_oom)
        await self._configure_guest_network()
        await self._start_port_forward()

    async def join_vm_share(self, vm: Qemu) -> None:
        """Keep the pod's tree in the mount namespace of the VM's virtiofsd, which holds it:
        a cached VM's own share (the namespace made for the pod is let go), or the
        pod's after a shim restart."""
        virtiofsd = ProcessIdentity(vm.virtiofsd_pid or 0, vm.virtiofsd_start_time)
        fd = virtiofsd.open_mount_namespace()
        if fd is None:
            raise Unavailable(f"sandbox {self.id}: its virtiofsd is gone")
        ns = await trio.to_thread.run_sync(MountNamespace.join, fd)
        unused, self.mount_ns = self.mount_ns, ns
        self.state.shared_dir = vm.config.shared_dir or self.state.shared_dir
        if unused is not None:
            await trio.to_thread.run_sync(unused.close)  # what it has mounted goes with it

    async def _start_port_forward(self) -> None:
        """The pod's port-forward relay (``shimv2.vc.port_forward``): a pod network, over vsock."""
        vm = self.vm
        if not self.state.netns or vm is None or "vsock" not in self.state.agent_channel:
            return
        try:
            relay = await PortForward.start(self.state.netns)
        except (Error, OSError) as exc:  # the pod runs on without it
            log.warning("sandbox %s: no port-forward: %s", self.id, exc)
            return
        self._port_forward = relay
        endpoint = dataclasses.replace(vm.agent_endpoint(), vsock_port=FORWARD_VSOCK_PORT)

        async def serve() -> None:
            with self._port_forward_scope:
                await relay.serve(lambda: open_stream(endpoint), hold=self._agent_open)

        self.spawn(serve)

    async def _agent_open(self) -> None:
        """Return once the agent is not held: port-forward's bytes wait out a pause too."""
        if self._agent is not None:
            await self._agent.wait_open()

    async def _connect_new_vm(self, vm: Qemu, dial_timeout: float) -> None:
        """Connect to the agent; over a late-device VM's serial port if its vsock fails.

        A clone or a cached VM has its template's serial port beside its vsock
        device, and its agent listens on both. vhost-device-vsock 0.3.0 can wedge
        on a device plugged while the host is busy, and never answer a CONNECT
        again (seen once in a soak beside other VM work): rather than fail the pod,
        the serial port is used, and recorded so that a restarted shim uses it too.
        """
        serial = vm.serial_agent_endpoint()
        if serial is None or vm.channel == "serial":
            await self.connect_agent(dial_timeout, vm.agent_endpoint())
            return
        try:
            # The VM's own endpoint: it waits until a late vsock device has started.
            await self.connect_agent(min(dial_timeout, LATE_VSOCK_PATIENCE), vm.agent_endpoint())
        except Unavailable as exc:
            log.warning("sandbox %s: no agent over %s (%s); using the serial port",
                        self.id, vm.channel, exc)  # fmt: skip
            self.state.agent_channel = "serial"
            self.state.agent_socket = str(serial.unix_path)
            self.state.vsock_cid = 0
            self.save()
            await self.connect_agent(max(dial_timeout - LATE_VSOCK_PATIENCE, 1.0))

    async def _fix_up_clone(self) -> None:
        """A clone starts with its template's RNG state and clock: renew both first.

        Before anything runs in it: every clone of a template would otherwise
        draw the same "random" bytes, and see the time the template was saved.
        A cached VM's RNG was renewed by the cache's server, before its warm-up.
        """
        assert self.vm is not None
        if not self.vm.rng_renewed:
            await template.renew_rng(self.agent)
        await template.set_clock(self.agent)

    async def _configure_guest_network(self) -> None:
        """Give the guest the pod's addresses, routes and neighbours (matched by MAC)."""
        for t in self.taps:
            request = agent_pb2.UpdateInterfaceRequest(interface=t.endpoint.to_interface())
            await self.agent.call("UpdateInterface", request, types_pb2.Interface)
        routes = [r for t in self.taps for r in t.endpoint.to_routes()]
        if routes:
            request_routes = agent_pb2.UpdateRoutesRequest(routes=agent_pb2.Routes(Routes=routes))
            await self.agent.call("UpdateRoutes", request_routes, agent_pb2.Routes)
        neighbors = [n for t in self.taps for n in t.endpoint.to_neighbors()]
        if neighbors:
            arp = agent_pb2.AddARPNeighborsRequest(
                neighbors=agent_pb2.ARPNeighbors(ARPNeighbors=neighbors)
            )
            await self.agent.call("AddARPNeighbors", arp, Empty)

    def _record_vm(self, vm: Qemu) -> None:
        endpoint = vm.agent_endpoint()
        self.state.vm_dir = str(vm.run_dir)  # a cached VM's is its own
        self.state.vm_id = vm.vm_id if vm.vm_id != self.id else ""
        self.state.qemu_pid = vm.pid or 0
        self.state.virtiofsd_pid = vm.virtiofsd_pid or 0
        self.state.qemu_start_time = vm.start_time
        self.state.virtiofsd_start_time = vm.virtiofsd_start_time
        self.state.agent_socket = endpoint.unix_path or endpoint.hybrid_path or ""
        self.state.vsock_cid = endpoint.vsock_cid or 0
        self.state.agent_channel = vm.channel or ""
        self.state.vsock_backend_pid = vm.vsock_backend_pid or 0
        self.state.vsock_backend_start_time = vm.vsock_backend_start_time
        self.state.hypervisor = {"machine": vm.config.machine, "accelerator": vm.accelerator}
        if vm.restored and vm.config.memory_dir:  # a clone's RAM copy, removed with the pod
            self.state.hypervisor["memory_dir"] = vm.config.memory_dir

    def endpoint(self) -> AgentEndpoint:
        if self.state.vsock_cid:
            return AgentEndpoint(vsock_cid=self.state.vsock_cid)
        if self.state.agent_channel == "hybrid-vsock":
            return AgentEndpoint(hybrid_path=self.state.agent_socket)
        return AgentEndpoint(unix_path=self.state.agent_socket)

    async def connect_agent(
        self, dial_timeout: float, endpoint: AgentEndpoint | None = None
    ) -> None:
        """Over ``endpoint``, else the one recorded in the state (a shim restarted)."""
        await self._nursery.start(self._hold_agent, dial_timeout, endpoint or self.endpoint())

    async def _hold_agent(
        self,
        dial_timeout: float,
        endpoint: AgentEndpoint,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.CancelScope() as scope:
            self._agent_scope = scope
            async with connect_agent(
                endpoint,
                ready_timeout=dial_timeout,
                timeout=self.config.agent.request_timeout,
            ) as agent:
                self._agent = agent
                task_status.started()
                await agent.wait_closed()
                await self._agent_lost()
        self._agent = None

    async def _agent_lost(self) -> None:
        """The agent's connection broke while the VM runs (its channel, as a vsock
        backend, died): nothing can reach the guest any more, so the VM goes, and
        its tasks end as with any VM death (``watch_vm``)."""
        if self._releasing or self.vm_gone or self.vm is None:
            return
        log.error("sandbox %s: the agent's connection is lost; stopping the VM", self.id)
        await self.vm.shutdown()

    @property
    def agent_connected(self) -> bool:
        return self._agent is not None and not self._agent.closed

    async def watch_oom(self, *, rate: float = 5.0, burst: int = 10) -> None:
        """Relay the guest's OOM kills (GetOOMEvent blocks until one happens).

        The guest is hostile: an error status or a reply that does not decode
        is logged and asked again after a growing pause; at most ``rate`` events
        a second (after a ``burst``) reach ``on_oom``, the excess is dropped and
        counted. Ends when the VM or the agent connection is gone.
        """
        retry = Backoff(first=0.1, limit=10.0)
        bucket = TokenBucket(rate, burst)
        dropped = 0  # since ``since``, not logged yet: one line a minute at most
        since = 0.0
        warned = False
        try:
            while not self.vm_gone:
                agent = self._agent
                if agent is None or agent.closed:
                    return  # the agent or the VM is gone; nothing more will come
                try:
                    event = await agent.call(
                        "GetOOMEvent", agent_pb2.GetOOMEventRequest(), agent_pb2.OOMEvent
                    )
                except Error as exc:
                    if self.vm_gone or agent.closed:
                        return
                    delay = retry.next()
                    log.warning(
                        "sandbox %s: GetOOMEvent failed, asking again in %gs: %s: %s",
                        self.id, delay, type(exc).__name__, exc.message[:200],
                    )  # fmt: skip
                    with trio.move_on_after(delay):
                        await self.vm_exited.wait()
                    continue
                retry.reset()
                if dropped and trio.current_time() - since >= 60:
                    log.warning("sandbox %s: dropped %d OOM event(s)", self.id, dropped)
                    dropped = 0
                if not bucket.take():
                    if not warned:
                        warned = True
                        log.warning(
                            "sandbox %s: the guest reports OOM events faster than %g/s; "
                            "dropping the excess (counted)",
                            self.id, rate,
                        )  # fmt: skip
                    if not dropped:
                        since = trio.current_time()
                    dropped += 1
                    # Also pace the loop: an agent that answers at once must not spin us.
                    with trio.move_on_after(bucket.wait_time()):
                        await self.vm_exited.wait()
                    continue
                cid = event.container_id
                if cid in self.containers and self.on_oom is not None:
                    try:
                        self.on_oom(cid)
                    except Error as exc:  # a publisher closing at shutdown
                        log.warning("sandbox %s: OOM in %s not relayed: %s", self.id, cid, exc)
                else:
                    log.debug("sandbox %s: OOM event for unknown container %.80r", self.id, cid)
        finally:
            if dropped:
                log.warning("sandbox %s: dropped %d OOM event(s)", self.id, dropped)

    async def watch_vm(self) -> None:
        assert self.vm is not None
        status = await self.vm.wait_exited()
        self.vm_gone = True
        self.vm_exited.set()
        if not self._releasing:
            log.error("sandbox %s: VM exited (%d); every task exits with 255", self.id, status)
        for c in self.containers.values():
            c.vm_lost()
        if self._agent_scope is not None:
            self._agent_scope.cancel()

    async def create_in_guest(self, config: SandboxConfig) -> None:
        request = agent_pb2.CreateSandboxRequest(
            hostname=config.hostname or self.id[:63],
            dns=list(config.dns),
            sandbox_id=self.id,
        )
        if self.vm is not None and self.vm.restored and self.state.shared_dir:
            # A cold guest mounts the share at boot; a clone's arrives by hotplug.
            request.storages.append(
                agent_pb2.Storage(
                    driver="virtio-fs", source=SHARED_TAG, fstype="virtiofs",
                    mount_point=storage.GUEST_SHARED,
                )
            )  # fmt: skip
        await self.agent.call("CreateSandbox", request, Empty)

    # -- containers --------------------------------------------------------------

    async def create_container(self, config: ContainerConfig) -> Container:
        cid = container_id(config.id)
        if cid in self.containers:
            raise AlreadyExists(f"container {cid} already exists in sandbox {self.id}")
        if self.state.state not in ("creating", "ready", "running"):
            raise FailedPrecondition(f"sandbox {self.id} is {self.state.state}")
        cs = ContainerState(
            id=cid, bundle=config.bundle, state="creating", annotations=dict(config.annotations)
        )
        container = Container(self, cs)
        self.containers[cid] = container
        self.save()
        try:
            await container.create(config)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.unmount_storage(container)
                del self.containers[cid]
                self.save(teardown=True)
            raise
        cs.state = "created"
        self.save()
        return container

    async def mount_storage(
        self, container: Container, config: ContainerConfig
    ) -> dict[int, storage.SharedBind]:
        """The rootfs and the spec's bind sources under the shared dir.

        Returns how the guest names each shared bind mount, by its index in
        the spec's mounts.
        """
        root = config.spec.get("root") or {}
        root_path = str(root.get("path", "rootfs")) if isinstance(root, dict) else ""
        top, record = self._top(), container.state.mounts
        try:
            target = await self._in_mount_ns(
                storage.mount_rootfs, top, container.id, config.rootfs, config.bundle, root_path,
                record, host=self._host_view(),
            )  # fmt: skip
            container.state.rootfs = str(target)
            return await self._in_mount_ns(
                storage.share_bind_mounts, top, container.id, config.spec.get("mounts") or [],
                record, host=self._host_view(),
            )  # fmt: skip
        finally:
            self.save()  # the mount points are on disk before anyone needs to undo them

    async def _in_mount_ns(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """A blocking ``storage`` call, in the pod's mount namespace when it has one."""
        ns = self.mount_ns
        if ns is None:
            return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))
        return await ns.run(fn, *args, **kwargs)

    def _top(self) -> Path:
        """Where the pod's tree is (``storage``): a cached VM's own, or the sandbox's."""
        if self.state.shared_dir:
            return Path(self.state.shared_dir).parent
        return self.store.sandbox_dir(self.id)

    def _host_view(self) -> storage.HostView:
        return contextlib.nullcontext if self.mount_ns is None else self.mount_ns.host

    async def unmount_storage(self, container: Container) -> None:
        top = self._top()
        left = await self._in_mount_ns(storage.unmount_all, top, container.state.mounts)
        if left:
            raise FailedPrecondition(f"container {container.id}: still mounted: {left}")
        container.state.mounts.clear()
        await self._in_mount_ns(storage.remove_container_dir, top, container.id)

    async def release_mount_ns(self) -> None:
        """Detach the shared views in the pod's namespace, then let go of it."""
        ns, self.mount_ns = self.mount_ns, None
        if ns is not None:
            try:
                await ns.run(storage.release_shared, self._top())
            finally:
                await trio.to_thread.run_sync(ns.close)

    async def delete_container(self, cid: str) -> ContainerStatus:
        container = self.container(cid)
        async with container.lock:
            await container.delete()
            del self.containers[container.id]
            self.save(teardown=True)
        return container.status()

    # -- sandbox verbs -----------------------------------------------------------

    async def start(self) -> None:
        if self.state.state != "ready":
            raise FailedPrecondition(f"cannot start sandbox {self.id} in state {self.state.state}")
        for c in self.containers.values():
            if c.state.state == "created":
                await c.start()
        self.state.state = "running"
        self.save()

    async def pause(self) -> None:
        if self.state.state != "running":
            raise FailedPrecondition(f"cannot pause sandbox {self.id} in state {self.state.state}")
        vm = self.running_vm()
        await self.agent.hold(AGENT_HOLD_TIMEOUT)
        try:
            await vm.qmp.execute("stop")
        except BaseException:
            self.agent.release()
            raise
        self.state.state = "paused"
        self.save()

    async def resume(self) -> None:
        if self.state.state != "paused":
            raise FailedPrecondition(f"cannot resume sandbox {self.id} in state {self.state.state}")
        await self.running_vm().resume()
        self.state.state = "running"
        self.save()
        if self._agent is not None:
            self._agent.release()

    def running_vm(self) -> Qemu:
        if self.vm is None or self.vm_gone:
            raise Unavailable(f"sandbox {self.id}: the VM is not running")
        return self.vm

    async def stop(self, force: bool = False) -> None:
        """Stop every container, tell the agent, power the VM off."""
        if self.state.state == "stopped":
            return
        if self.state.state == "paused":
            await self.resume()
        errors: list[Exception] = []
        if not self.vm_gone:
            for c in list(self.containers.values()):
                try:
                    await c.stop()
                except Exception as exc:
                    if not force:
                        raise
                    errors.append(exc)
            with contextlib.suppress(Exception), trio.move_on_after(5):
                await self.agent.call("DestroySandbox", agent_pb2.DestroySandboxRequest(), Empty)
        await self.release_vm()
        for c in self.containers.values():
            c.vm_lost()
        self.state.state = "stopped"
        self.save(teardown=True)
        if errors:
            log.warning("sandbox %s: forced stop despite %s", self.id, errors)

    async def release_vm(self) -> None:
        self._releasing = True
        if self._agent_scope is not None:
            self._agent_scope.cancel()
        if self.vm is not None:
            await self.vm.shutdown()
        else:
            await kill_recorded(self.state)
        await self.release_network()
        await self.release_cgroup()

    def make_cgroup(self) -> tuple[str, ...]:
        """Create the sandbox's host cgroup; the cgroup.procs files QEMU and virtiofsd join."""
        path = self.state.cgroup_path or sandbox_cgroup("", self.id)
        self.state.cgroup_path = path
        self.state.cgroup_dirs = self.cgroups.create(path)
        self.save()  # recorded before QEMU runs there, for cleanup after a crash
        return self.cgroups.procs_files(path)

    async def release_cgroup(self) -> None:
        """Remove the cgroup directories we made, once QEMU and virtiofsd are gone."""
        if self.state.cgroup_dirs:
            self.state.cgroup_dirs = await self.cgroups.remove(self.state.cgroup_dirs)
            if self.state.cgroup_dirs:
                log.error("sandbox %s: cgroups still in use: %s", self.id, self.state.cgroup_dirs)

    async def attach_endpoint(self, name: str) -> network.TapAttachment:
        """Attach a tap to the netns link ``name`` that has none yet (for hotplug)."""
        if not self.state.netns:
            raise FailedPrecondition(f"sandbox {self.id} has no network namespace")
        if any(t.endpoint.name == name for t in self.taps):
            raise AlreadyExists(f"interface {name} is already in sandbox {self.id}")
        endpoints = await trio.to_thread.run_sync(network.scan, self.state.netns)
        endpoint = next((e for e in endpoints if e.name == name), None)
        if endpoint is None:
            raise NotFound(f"no interface {name} with an address in {self.state.netns}")
        index = max((t.index for t in self.taps), default=-1) + 1
        tap = await trio.to_thread.run_sync(network.attach, self.state.netns, endpoint, index)
        self.taps.append(tap)
        self.state.taps.append(f"{tap.index}:{endpoint.name}")
        self.save()
        return tap

    def tap_for(self, name: str) -> network.TapAttachment:
        tap = next((t for t in self.taps if t.endpoint.name == name), None)
        if tap is None:
            raise NotFound(f"interface {name} is not in sandbox {self.id}")
        return tap

    async def detach_endpoint(self, tap: network.TapAttachment) -> None:
        await trio.to_thread.run_sync(network.detach, self.state.netns, tap)
        self.taps.remove(tap)
        self.state.taps.remove(f"{tap.index}:{tap.endpoint.name}")
        self.save(teardown=True)

    async def release_network(self) -> None:
        """Remove the port-forward relay, the taps and the tc filters; from the state if need be."""
        relay, self._port_forward = self._port_forward, None
        if relay is not None:
            self._port_forward_scope.cancel()
            await relay.stop()
        if not self.state.netns or not self.state.taps:
            return
        if self.taps:
            await network.remove_interfaces(self.state.netns, self.taps)
        else:
            for entry in self.state.taps:
                index, _, veth = entry.partition(":")
                await trio.to_thread.run_sync(network.cleanup, self.state.netns, int(index), veth)
        self.taps = []
        self.state.taps = []

    async def delete(self) -> None:
        if self.state.state != "stopped":
            raise FailedPrecondition(f"cannot delete sandbox {self.id} in state {self.state.state}")
        await self.release_cgroup()
        if self.state.cgroup_dirs:
            raise FailedPrecondition(f"sandbox {self.id}: cgroups still in use")
        for cid in list(self.containers):
            c = self.containers[cid]
            await self.unmount_storage(c)
            del self.containers[cid]
        await self.release_mount_ns()
        self.store.remove(self.id, self.state.vm_id)
        memory_dir = self.state.hypervisor.get("memory_dir")
        if isinstance(memory_dir, str) and memory_dir:  # our own record, of our own copy
            shutil.rmtree(memory_dir, ignore_errors=True)


async def kill_recorded(state: SandboxState) -> None:
    """Kill the QEMU and virtiofsd a state records (when no live object owns them).

    Only the very processes that were started (``ProcessIdentity``): pid and
    start time, and QEMU's exact ``-name``. A state written before start
    times were recorded (0) relies on the exact argument alone; the pid may
    belong to another sandbox's VM by now.
    """
    legacy_socket = ("--socket-path", str(Path(state.vm_dir) / "vfs.sock"))
    vm_id = state.vm_id or state.id
    vm_dir = Path(state.vm_dir)
    backend = backend_argv_marker(vm_dir / "vhu.sock", vm_dir / "vsock.sock")  # Qemu's paths
    identities = (
        ProcessIdentity(state.vsock_backend_pid, state.vsock_backend_start_time, backend),
        ProcessIdentity(state.qemu_pid, state.qemu_start_time, ("-name", f"kata-py-{vm_id}")),
        ProcessIdentity(
            state.virtiofsd_pid,
            state.virtiofsd_start_time,
            None if state.virtiofsd_start_time or not state.vm_dir else legacy_socket,
        ),
    )
    for identity in identities:
        fd = identity.open_pidfd()
        if fd is None:
            continue  # gone, or not ours
        try:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            with trio.move_on_after(5):
                await trio.lowlevel.wait_readable(fd)  # readable once it has exited
        finally:
            os.close(fd)


def sandbox_state_for(config: SandboxConfig) -> SandboxState:
    sid = sandbox_id(config.id)
    return SandboxState(
        id=sid,
        state="creating",
        netns=config.netns,
        cgroup_path=sandbox_cgroup(config.cgroups_path, sid),  # checked before any use
    )
