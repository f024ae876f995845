"""Kata's VM cache (``vm_cache_number``): VMs started ahead, handed to shims.

A server (``kata-py factory init`` with ``vm_cache_number`` > 0, in the
foreground) keeps that many VMs running, each cloned from the template (or
booted cold without one) with no pod yet, its agent already answering. A shim's
``CacheFactory`` asks it over ``vm_cache_endpoint`` for one that matches the
pod's configuration. The server lets go of the VM (QMP and its console serve one
client) and replies with what identifies its processes; the shim adopts them
(``Qemu.adopt``: pid, start time and exact ``-name``), makes the VM the pod's
(``Qemu.join_pod``: its cgroup and NICs) and acknowledges. A VM not
acknowledged is killed by the server. A miss, an absent server or any failure
falls back to the next factory, logged, never an error.

A cached VM has its virtio-fs already, served by its own virtiofsd from a share
of its own (``share_top``) in a mount namespace that only that virtiofsd holds;
the shim joins the namespace (``Sandbox.join_vm_share``) and mounts the pod's
tree there. It runs while it waits, warmed by one throwaway container.

Only root may ask or answer (``SO_PEERCRED``), and each side bounds what it
reads. The shim trusts the reply's ids no further than they are checked: the
VM's run directory and RAM copy are derived from its id, never taken as paths.

A cached VM keeps its own id (``cache-…``) for life: its run directory and
``-name``. A pod records it (``SandboxState.vm_id``) for recovery and cleanup.
The server is the VMs' parent and reaps them, handed out or not; they outlive it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from google.protobuf.empty_pb2 import Empty

from shimv2.errdefs import Error, InvalidArgument, PermissionDenied, Unavailable
from shimv2.pb.kata import agent_pb2, oci_pb2
from shimv2.ttrpc import peer_credentials
from shimv2.vc import storage
from shimv2.vc.agent import AgentClient, connect_agent
from shimv2.vc.factory import Factory
from shimv2.vc.ids import check_id
from shimv2.vc.mountns import MountNamespace
from shimv2.vc.qemu import Qemu
from shimv2.vc.qemu_config import QemuConfig, resolve_channel
from shimv2.vc.ratelimit import Backoff
from shimv2.vc.template import clones_dir, renew_rng, template_key

log = logging.getLogger(__name__)

MAX_LINE = 4096  # a request or a reply: one JSON object on one line
ASK_TIMEOUT = 10.0  # the shim's wait for the server's reply
ACK_TIMEOUT = 30.0  # the server's wait for the shim to have adopted the VM
READ_TIMEOUT = 5.0  # the server's wait for a request
# Replacements start this long after the last VM was handed out: pods started
# together then do not share the CPUs with the cache's own starts.
REFILL_DELAY = 2.0
CHANNELS = ("serial", "vsock", "hybrid-vsock")
WARM_UP_ID = "kata-py-warm-up"
SHARE = "share"
ID_PREFIX = "cache-"


def cache_key(config: QemuConfig) -> str:
    """What a cached VM must share with the pod: its template's key and agent channel.

    The template key covers the guest's files, size and devices; the channel is
    a device a cached VM already has.
    """
    channel = resolve_channel(config.agent_channel, config.vsock_backend)
    return f"{template_key(config)}-{channel}"


def cache_vm_config(config: QemuConfig) -> QemuConfig:
    """A VM for no pod yet: no NICs or cgroup; root ports for them later.

    Its share is its own (``share_top``), given when it is started.
    """
    return dataclasses.replace(config, shared_dir=None, nics=(), cgroup=(), late_devices=True)


def share_top(run_dir: Path) -> Path:
    """Where a cached VM's share lives (``storage.prepare_shared``): the pod's tree then."""
    return run_dir / SHARE


@dataclasses.dataclass(frozen=True, slots=True)
class CachedVm:
    """A cached VM as the server hands it over: what identifies its processes."""

    id: str
    pid: int
    start_time: int
    channel: str
    vsock_cid: int = 0
    vsock_backend_pid: int = 0
    vsock_backend_start_time: int = 0
    accelerator: str = ""
    restored: bool = False  # a template's clone: its RAM copy is clones/<id>
    rng_renewed: bool = False  # its RNG reseeded by the server (``template.renew_rng``)
    # Its share's virtiofsd, whose mount namespace holds the tree (``share_top``).
    virtiofsd_pid: int = 0
    virtiofsd_start_time: int = 0

    @classmethod
    def of(cls, vm: Qemu) -> CachedVm:
        return cls(
            id=vm.vm_id,
            pid=vm.pid or 0,
            start_time=vm.start_time,
            channel=vm.channel or "serial",
            vsock_cid=vm.agent_endpoint().vsock_cid or 0,
            vsock_backend_pid=vm.vsock_backend_pid or 0,
            vsock_backend_start_time=vm.vsock_backend_start_time,
            accelerator=vm.accelerator or "",
            restored=vm.restored,
            rng_renewed=vm.rng_renewed,
            virtiofsd_pid=vm.virtiofsd_pid or 0,
            virtiofsd_start_time=vm.virtiofsd_start_time,
        )

    @classmethod
    def from_dict(cls, raw: object) -> CachedVm:
        """Checked field by field: InvalidArgument on anything unexpected."""
        if not isinstance(raw, dict) or set(raw) - {f.name for f in dataclasses.fields(cls)}:
            raise InvalidArgument(f"vm cache: a malformed VM record: {str(raw)[:200]}")
        try:
            vm = cls(**raw)
        except TypeError as exc:
            raise InvalidArgument(f"vm cache: a malformed VM record: {exc}") from None
        ints = (vm.pid, vm.start_time, vm.vsock_cid, vm.vsock_backend_pid,
                vm.vsock_backend_start_time, vm.virtiofsd_pid,
                vm.virtiofsd_start_time)  # fmt: skip
        if (
            not isinstance(vm.id, str)
            or not vm.id.startswith(ID_PREFIX)
            or not all(type(n) is int and 0 <= n < 1 << 63 for n in ints)
            or vm.pid <= 1
            or vm.start_time <= 0
            or (vm.virtiofsd_pid != 0 and (vm.virtiofsd_pid <= 1 or vm.virtiofsd_start_time <= 0))
            or vm.channel not in CHANNELS
            or not isinstance(vm.accelerator, str)
            or len(vm.accelerator) > 16
            or not isinstance(vm.restored, bool)
            or not isinstance(vm.rng_renewed, bool)
        ):
            raise InvalidArgument(f"vm cache: a malformed VM record: {str(raw)[:200]}")
        check_id(vm.id, "cached VM id")
        return vm


# -- the wire: one JSON object per line, bounded, between root processes --------------


def peer_is_root(stream: trio.SocketStream) -> bool:
    creds = peer_credentials(stream.socket)
    return creds is not None and creds.uid == 0


async def read_message(stream: trio.SocketStream) -> dict[str, Any]:
    """One line of JSON, at most ``MAX_LINE`` bytes; InvalidArgument otherwise."""
    buf = b""
    while b"\n" not in buf:
        chunk = await stream.receive_some(MAX_LINE + 1 - len(buf))
        if not chunk:
            raise Unavailable("vm cache: the connection closed mid-message")
        buf += chunk
        if len(buf) > MAX_LINE and b"\n" not in buf:
            raise InvalidArgument(f"vm cache: a message over {MAX_LINE} bytes")
    line, _, rest = buf.partition(b"\n")
    if rest:
        raise InvalidArgument("vm cache: more than one message at once")
    try:
        message = json.loads(line)
    except ValueError:
        raise InvalidArgument(f"vm cache: not JSON: {line[:80]!r}") from None
    if not isinstance(message, dict):
        raise InvalidArgument(f"vm cache: not a JSON object: {line[:80]!r}")
    return message


async def send_message(stream: trio.SocketStream, message: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(message).encode() + b"\n")


async def ask(
    endpoint: str | Path, request: dict[str, Any]
) -> tuple[trio.SocketStream, dict[str, Any]]:
    """Send ``request`` to the server; the open stream and its reply."""
    with trio.fail_after(ASK_TIMEOUT):
        stream = await trio.open_unix_socket(str(endpoint))
        try:
            if not peer_is_root(stream):
                raise PermissionDenied(f"vm cache: {endpoint} is not served by root")
            await send_message(stream, request)
            reply = await read_message(stream)
        except BaseException:
            await stream.aclose()
            raise
    if "error" in reply:
        await stream.aclose()
        raise Unavailable(f"vm cache: {str(reply['error'])[:200]}")
    return stream, reply


async def warm_up(agent: AgentClient) -> None:
    """Run one container in the VM, on the guest's own read-only root.

    Under TCG a VM translates code the first time it runs it: a pod's first
    container costs its VM about twice what its second does (crun, the
    kernel's namespace and mount paths, the agent's own). A cached VM pays that
    here, before any pod waits for it. The container is gone when this returns.
    """
    # Its root is its own bundle directory (the agent's, writable), where the
    # runtime makes what the mounts need: the guest's static busybox is all it runs.
    spec = oci_pb2.Spec(
        Version="1.0.2",
        Process=oci_pb2.Process(Args=["/busybox", "true"], Cwd="/", Env=["PATH=/"]),
        Root=oci_pb2.Root(Path=".", Readonly=False),
        Hostname=WARM_UP_ID,
        Mounts=[
            oci_pb2.Mount(destination="/proc", type="proc", source="proc"),
            oci_pb2.Mount(destination="/dev", type="tmpfs", source="tmpfs",
                          options=["nosuid", "mode=755", "size=64k"]),
            oci_pb2.Mount(destination="/busybox", type="bind", source="/bin/busybox",
                          options=["bind", "ro"]),
        ],
    )  # fmt: skip
    spec.Linux.Namespaces.extend(
        oci_pb2.LinuxNamespace(Type=t) for t in ("pid", "ipc", "uts", "mount", "network")
    )
    request = agent_pb2.CreateContainerRequest(
        container_id=WARM_UP_ID, exec_id=WARM_UP_ID, OCI=spec
    )
    await agent.call("CreateContainer", request, Empty)
    try:
        start = agent_pb2.StartContainerRequest(container_id=WARM_UP_ID)
        await agent.call("StartContainer", start, Empty)
        wait = agent_pb2.WaitProcessRequest(container_id=WARM_UP_ID, exec_id="")
        await agent.call("WaitProcess", wait, agent_pb2.WaitProcessResponse)
    finally:
        remove = agent_pb2.RemoveContainerRequest(container_id=WARM_UP_ID, timeout=10)
        await agent.call("RemoveContainer", remove, Empty)


# -- the shim's side ------------------------------------------------------------------


class CacheFactory:
    """Take a cached VM for the pod; the next factory when there is none to take."""

    def __init__(
        self,
        endpoint: str | Path,
        vm_dir: Callable[[str], Path],
        template_path: str | Path,
        fallback: Factory,
    ) -> None:
        self.endpoint = Path(endpoint)
        self.vm_dir = vm_dir  # a VM's run directory from its id (``Store.vm_dir``)
        self.template_path = Path(template_path)
        self.fallback = fallback

    async def get_vm(
        self, vm_id: str, config: QemuConfig, run_dir: Path, nursery: trio.Nursery
    ) -> Qemu:
        try:
            vm = await self.take(config, nursery)
        except Exception as exc:  # any failure falls back, as documented
            log.warning(
                "vm %s: no VM from the cache (%s: %s); falling back", vm_id, type(exc).__name__, exc
            )
            vm = None
        if vm is None:
            return await self.fallback.get_vm(vm_id, config, run_dir, nursery)
        log.info("vm %s: took cached VM %s", vm_id, vm.vm_id)
        return vm

    async def take(self, config: QemuConfig, nursery: trio.Nursery) -> Qemu | None:
        """A cached VM made the pod's, or None when the server has none for ``config``."""
        if not self.endpoint.exists():
            return None
        stream, reply = await ask(self.endpoint, {"op": "get", "key": cache_key(config)})
        async with stream:
            if reply.get("vm") is None:
                log.info("vm cache: none taken (%s)", str(reply.get("reason"))[:200])
                return None
            record = CachedVm.from_dict(reply["vm"])
            vm = await self._adopt(record, config, nursery)
            try:
                await send_message(stream, {"ok": True})
            except BaseException:
                with trio.CancelScope(shield=True):
                    await vm.shutdown()
                raise
            return vm

    async def _adopt(self, record: CachedVm, config: QemuConfig, nursery: trio.Nursery) -> Qemu:
        memory = clones_dir(self.template_path) / record.id if record.restored else None
        run_dir = self.vm_dir(record.id)
        shared = config.shared_dir
        if record.virtiofsd_pid and shared is not None:
            shared = str(share_top(run_dir) / storage.SHARED)
        vm_config = dataclasses.replace(
            config,
            late_devices=True,
            memory_dir=str(memory) if memory else None,
            incoming=None,
            shared_dir=shared,
        )
        vm = await Qemu.adopt(
            record.id,
            vm_config,
            run_dir,
            record.pid,
            record.virtiofsd_pid,
            record.vsock_cid,
            nursery,
            start_time=record.start_time,
            virtiofsd_start_time=record.virtiofsd_start_time,
            channel=record.channel,
            vsock_backend_pid=record.vsock_backend_pid,
            vsock_backend_start_time=record.vsock_backend_start_time,
        )
        vm.accelerator = record.accelerator or None
        # Its clock is set by the pod, and its RNG too unless the server renewed it
        # (``Sandbox._fix_up_clone``): a clone's are its template's.
        vm.restored = True
        vm.rng_renewed = record.rng_renewed
        try:
            if (await vm.qmp.execute("query-status")).get("status") == "paused":
                await vm.resume()  # an older server's (it paused its VMs)
            await vm.join_pod(nursery)
        except BaseException:
            with trio.CancelScope(shield=True):
                await vm.shutdown()
            raise
        return vm


# -- the server -----------------------------------------------------------------------


@dataclasses.dataclass
class _Cached:
    vm: Qemu
    handed_out: bool = False


class VmCache:
    """Keep ``number`` VMs for ``config`` running; hand them to the shims that ask."""

    def __init__(
        self,
        config: QemuConfig,
        factory: Factory,
        *,
        number: int,
        endpoint: str | Path,
        vm_dir: Callable[[str], Path],
        dial_timeout: float = 120.0,
        new_id: Callable[[], str] = lambda: ID_PREFIX + secrets.token_hex(6),
    ) -> None:
        self.config = cache_vm_config(config)
        self.key = cache_key(config)
        self.factory = factory
        self.number = number
        self.endpoint = Path(endpoint)
        self.vm_dir = vm_dir
        self.dial_timeout = dial_timeout
        self.new_id = new_id
        self.ready: list[_Cached] = []
        self.filling = 0
        self.handed_out = 0
        self._last_handout = -REFILL_DELAY
        self._wake = trio.Event()
        self._quit = trio.Event()

    def status(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "number": self.number,
            "ready": [c.vm.vm_id for c in self.ready],
            "filling": self.filling,
            "handed_out": self.handed_out,
        }

    def quit(self) -> None:
        self._quit.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until ``quit`` (or a cancel): the VMs left in the cache are stopped then."""
        listener = await self._listen()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_filled, nursery)
                nursery.start_soon(trio.serve_listeners, self._handle, [listener])
                task_status.started()
                await self._quit.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()  # shims asking now are refused, and fall back
                for cached in self.ready:
                    await cached.vm.shutdown()
                self.ready.clear()
                with contextlib.suppress(OSError):  # last: ``factory destroy`` waits for it
                    self.endpoint.unlink()

    async def _listen(self) -> trio.SocketListener:
        self.endpoint.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(OSError):
            self.endpoint.unlink()  # a dead server's
        old = os.umask(0o177)  # root only, from the first moment
        try:
            await sock.bind(str(self.endpoint))
        finally:
            os.umask(old)
        sock.listen(16)
        return trio.SocketListener(sock)

    async def _keep_filled(self, nursery: trio.Nursery) -> None:
        """One VM at a time (each start is CPU-bound), until ``number`` are ready."""
        backoff = Backoff(first=1.0, limit=60.0)
        while True:
            while len(self.ready) >= self.number:
                await self._wake.wait()
                self._wake = trio.Event()
            await trio.sleep_until(self._last_handout + REFILL_DELAY)
            if len(self.ready) >= self.number:
                continue
            self.filling = 1
            try:
                cached = await self._start_one(nursery)
            except Exception as exc:  # whatever it was, the server lives on and retries
                pause = backoff.next()
                log.error("vm cache: a VM failed to start (%s: %s); again in %.0fs",
                          type(exc).__name__, exc, pause)  # fmt: skip
                await trio.sleep(pause)
                continue
            finally:
                self.filling = 0
            backoff.reset()
            self.ready.append(cached)
            nursery.start_soon(self._watch, cached)
            log.info("vm cache: %s ready (%d of %d)", cached.vm.vm_id, len(self.ready), self.number)

    async def _start_one(self, nursery: trio.Nursery) -> _Cached:
        vm_id = self.new_id()
        run_dir = self.vm_dir(vm_id)
        # The share is plugged now, not by the pod: a guest's PCIe hotplug of
        # virtio-fs is about 0.3 s of the pod's start under TCG. Its tree lives in
        # a mount namespace of its own, kept by its virtiofsd, which the shim joins.
        top = share_top(run_dir)
        await trio.to_thread.run_sync(lambda: top.mkdir(mode=0o700, parents=True))
        ns = await trio.to_thread.run_sync(MountNamespace.create)
        try:
            shared = await ns.run(storage.prepare_shared, top)
            config = dataclasses.replace(
                self.config, shared_dir=str(shared), shared_dir_mount_ns=ns.path
            )
            vm = await self.factory.get_vm(vm_id, config, run_dir, nursery)
        finally:
            await trio.to_thread.run_sync(ns.close)
        try:
            # Over the serial port where there is one, while the guest starts its
            # vsock device (which the pod's agent connection then uses at once).
            endpoint = vm.serial_agent_endpoint() or vm.agent_endpoint()
            async with connect_agent(endpoint, ready_timeout=self.dial_timeout) as agent:
                if vm.restored:  # before anything runs in it, the warm-up included
                    await renew_rng(agent)
                    vm.rng_renewed = True
                await warm_up(agent)
            if (ready := vm.agent_endpoint().ready) is not None:
                await ready()
            # Running while it waits, as Kata's runtime-rs keeps its cache: an idle
            # guest takes 1-2 % of a CPU under TCG, but a paused one costs the pod
            # ``cont`` and the restart of its vsock device (about 0.13 s here).
            await vm.release()
        except BaseException:
            with trio.CancelScope(shield=True):
                await vm.shutdown()
            raise
        return _Cached(vm)

    async def _watch(self, cached: _Cached) -> None:
        """A VM that dies in the cache is cleaned up and replaced."""
        await cached.vm.wait_exited()
        if cached.handed_out or cached not in self.ready:
            return
        self.ready.remove(cached)
        log.warning("vm cache: %s exited while cached; replacing it", cached.vm.vm_id)
        await cached.vm.shutdown()
        self._wake.set()

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                if not peer_is_root(stream):
                    raise PermissionDenied("only root may use the VM cache")
                with trio.fail_after(READ_TIMEOUT):
                    request = await read_message(stream)
                op = request.get("op")
                if op == "get":
                    await self._hand_out(stream, request)
                elif op == "status":
                    await send_message(stream, self.status())
                elif op == "quit":
                    await send_message(stream, {"ok": True})
                    self.quit()
                else:
                    raise InvalidArgument(f"vm cache: unknown op {str(op)[:40]!r}")
            except Exception as exc:  # one connection's failure, never the server's
                log.warning("vm cache: a request failed: %s: %s", type(exc).__name__, exc)
                with contextlib.suppress(OSError, trio.BrokenResourceError):
                    await send_message(stream, {"error": str(exc)[:400]})

    async def _hand_out(self, stream: trio.SocketStream, request: dict[str, Any]) -> None:
        if request.get("key") != self.key:
            await send_message(stream, {"vm": None, "reason": f"this cache is for {self.key}"})
            return
        if not self.ready:
            await send_message(stream, {"vm": None, "reason": "none ready yet"})
            return
        cached = self.ready.pop(0)
        cached.handed_out = True
        cached.vm.disown()
        self.handed_out += 1
        self._last_handout = trio.current_time()
        self._wake.set()
        record = CachedVm.of(cached.vm)
        acked = False
        try:
            await send_message(stream, {"vm": dataclasses.asdict(record)})
            with trio.move_on_after(ACK_TIMEOUT):
                acked = (await read_message(stream)).get("ok") is True
        except (Error, OSError, trio.BrokenResourceError) as exc:
            log.warning("vm cache: %s was not taken: %s", record.id, exc)
        finally:
            if not acked:  # the shim let it go, or died: it is nobody's
                log.warning("vm cache: %s was not acknowledged; stopping it", record.id)
                with trio.CancelScope(shield=True):
                    await cached.vm.shutdown()
        if acked:
            log.info("vm cache: %s handed out", record.id)
