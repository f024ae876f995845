"""A container of a sandbox: its state machine and its verbs through the agent.

Each container has its own lock, held for state changes only, never across a
blocking agent call such as WaitProcess. Exits are observed by one task per
process (WaitProcess), which updates the state so that StatusContainer sees a
process that died.

The guest is hostile: what its agent answers (exit statuses, byte counts,
process lists) is checked before the host uses it, and an answer out of
range is an ``Internal`` error or, for an exit status, the VM-gone status.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal as signals
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from google.protobuf.empty_pb2 import Empty

from shimv2.errdefs import AlreadyExists, Error, FailedPrecondition, Internal, NotFound
from shimv2.oci import message_from_json, spec_from_json
from shimv2.pb.kata import agent_pb2, oci_pb2
from shimv2.vc.ids import check_id, container_id
from shimv2.vc.persist import ContainerState
from shimv2.vc.storage import RootfsMount, guest_rootfs

if TYPE_CHECKING:
    from shimv2.vc.sandbox import Sandbox

log = logging.getLogger(__name__)

# Exit status reported when the VM (and so every process in it) is gone.
VM_GONE_STATUS = 255
PID_MAX = 1 << 22  # the kernel's PID_MAX_LIMIT: no pid is larger
MAX_PIDS = 65536  # in one container's process list


@dataclass(frozen=True, slots=True)
class ContainerConfig:
    id: str
    bundle: str
    spec: Mapping[str, Any]  # the OCI runtime spec (config.json)
    rootfs: tuple[RootfsMount, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ContainerStatus:
    id: str
    state: str
    pid: int
    exit_status: int | None
    annotations: Mapping[str, str]


class ProcessExit:
    """Where waiters learn that a process (init or exec) ended."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.status: int | None = None

    def set(self, status: int) -> None:
        if not self.event.is_set():
            self.status = status
            self.event.set()

    async def wait(self) -> int:
        await self.event.wait()
        assert self.status is not None
        return self.status


class Container:
    def __init__(self, sandbox: Sandbox, state: ContainerState) -> None:
        self.sandbox = sandbox
        self.state = state
        self.lock = trio.Lock()
        self.init_exit = ProcessExit()
        self.execs: dict[str, ProcessExit] = {}
        if state.exit_status is not None:
            self.init_exit.set(state.exit_status)

    @property
    def id(self) -> str:
        return self.state.id

    def status(self) -> ContainerStatus:
        s = self.state
        return ContainerStatus(s.id, s.state, s.pid, s.exit_status, dict(s.annotations))

    def _require(self, *states: str, verb: str) -> None:
        if self.state.state not in states:
            raise FailedPrecondition(
                f"cannot {verb} container {self.id} in state {self.state.state}"
            )

    # -- lifecycle -----------------------------------------------------------

    async def create(self, config: ContainerConfig) -> None:
        """Mount its storage (recorded first) and create the container in the guest."""
        spec = guest_spec(config.spec, self.id)
        for index, bind in (await self.sandbox.mount_storage(self, config)).items():
            mount = spec.Mounts[index]
            mount.source = bind.source
            if bind.ro_on_host_only:
                kept = [o for o in mount.options if o != "ro"]
                del mount.options[:]
                mount.options.extend(kept)
        request = agent_pb2.CreateContainerRequest(
            container_id=self.id,
            exec_id=self.id,
            OCI=spec,
            sandbox_pidns=joins_pod_pid_namespace(config.spec),
        )
        await self.sandbox.agent.call("CreateContainer", request, Empty)

    async def start(self) -> None:
        async with self.lock:
            self._require("created", verb="start")
            self.state.state = "starting"
        try:
            await self.sandbox.agent.call(
                "StartContainer", agent_pb2.StartContainerRequest(container_id=self.id), Empty
            )
        except BaseException:
            self.state.state = "created"
            raise
        self.state.state = "running"
        self.sandbox.save()
        self.sandbox.spawn(self.watch_init)

    async def watch_init(self) -> None:
        request = agent_pb2.WaitProcessRequest(container_id=self.id, exec_id="")
        try:
            reply = await self.sandbox.agent.call(
                "WaitProcess", request, agent_pb2.WaitProcessResponse
            )
        except Error as exc:
            log.warning("container %s: wait failed: %s", self.id, _short(exc))
            self.vm_lost()
            return
        self.mark_exited(guest_status(reply.status, f"container {self.id}"))

    def vm_lost(self) -> None:
        """The VM (or the way to it) is gone: every process ends with 255."""
        self.mark_exited(VM_GONE_STATUS)
        # No WaitProcess will ever answer for the execs.
        for ex in self.execs.values():
            ex.set(VM_GONE_STATUS)

    def mark_exited(self, status: int) -> None:
        """Record the init's exit; execs report their own through their watchers."""
        if self.state.state in ("created", "running", "paused", "starting"):
            self.state.state = "stopped"
            self.state.exit_status = status
            try:
                self.sandbox.save()
            except Error as exc:
                # An exit must reach containerd whatever the disk does: the next
                # save that succeeds writes it too.
                log.error("container %s: exit %d not saved: %s", self.id, status, exc)
        self.init_exit.set(status if self.state.exit_status is None else self.state.exit_status)

    async def wait(self) -> int:
        return await self.init_exit.wait()

    async def kill(self, signal: int, all_processes: bool = False) -> None:
        if self.state.state == "stopped":
            if signal == signals.SIGKILL or all_processes:
                return  # nothing left to kill
            raise FailedPrecondition(f"container {self.id} is stopped")
        self._require("running", "paused", "created", verb="kill")
        targets = [""]  # "" = the init process
        if all_processes:
            # Every process we started; the init's children share its pid
            # namespace and die with it on SIGKILL.
            targets += [eid for eid, ex in self.execs.items() if not ex.event.is_set()]
        for exec_id in targets:
            await self.signal_process(exec_id, signal)

    async def stop(self, timeout: float = 10.0) -> None:
        """Kill the init (SIGKILL) and wait for its exit, bounded."""
        if self.state.state == "stopped":
            return
        if self.state.state == "created":
            # Never started: no init to wait for; the agent removes it.
            self.mark_exited(VM_GONE_STATUS if self.sandbox.vm_gone else 137)
            return
        if self.state.state == "paused":
            await self.resume()
        await self.kill(signals.SIGKILL)
        with trio.move_on_after(timeout):
            await self.init_exit.wait()
        if not self.init_exit.event.is_set():
            raise FailedPrecondition(f"container {self.id} did not stop within {timeout:g}s")

    async def delete(self) -> None:
        self._require("stopped", verb="delete")
        # Without an agent (its channel died; the VM is on its way down, or the
        # sandbox was stopped first) there is nothing in the guest to remove,
        # and nothing left that could.
        sandbox = self.sandbox
        if sandbox.state.state != "stopped" and not sandbox.vm_gone and sandbox.agent_connected:
            request = agent_pb2.RemoveContainerRequest(container_id=self.id, timeout=10)
            # NotFound: the guest no longer knows it; nothing to remove.
            with contextlib.suppress(NotFound):
                await self.sandbox.agent.call("RemoveContainer", request, Empty)
        await self.sandbox.unmount_storage(self)

    async def pause(self) -> None:
        self._require("running", verb="pause")
        await self.sandbox.agent.call(
            "PauseContainer", agent_pb2.PauseContainerRequest(container_id=self.id), Empty
        )
        self.state.state = "paused"
        self.sandbox.save()

    async def resume(self) -> None:
        self._require("paused", verb="resume")
        await self.sandbox.agent.call(
            "ResumeContainer", agent_pb2.ResumeContainerRequest(container_id=self.id), Empty
        )
        self.state.state = "running"
        self.sandbox.save()

    # -- processes -------------------------------------------------------------

    async def enter(self, exec_id: str, process: Mapping[str, Any]) -> None:
        """Exec a process (runtime-spec ``process`` JSON) in the running container."""
        check_id(exec_id, "exec id")
        self._require("running", verb="exec in")
        if exec_id in self.execs:
            raise AlreadyExists(f"exec {exec_id} already exists in container {self.id}")
        proc = oci_pb2.Process()
        message_from_json(proc, dict(process), "process")
        request = agent_pb2.ExecProcessRequest(container_id=self.id, exec_id=exec_id, process=proc)
        self.execs[exec_id] = ProcessExit()
        try:
            await self.sandbox.agent.call("ExecProcess", request, Empty)
        except BaseException:
            del self.execs[exec_id]
            raise
        self.sandbox.spawn(self._watch_exec, exec_id, self.execs[exec_id])

    async def _watch_exec(self, exec_id: str, ex: ProcessExit) -> None:
        # ``ex``, not ``execs[exec_id]``: once deleted, the id may name a new exec.
        request = agent_pb2.WaitProcessRequest(container_id=self.id, exec_id=exec_id)
        try:
            reply = await self.sandbox.agent.call(
                "WaitProcess", request, agent_pb2.WaitProcessResponse
            )
            status = guest_status(reply.status, f"exec {exec_id} of container {self.id}")
        except Error as exc:
            log.warning("exec %s of container %s: wait failed: %s", exec_id, self.id, _short(exc))
            status = VM_GONE_STATUS
        ex.set(status)

    async def wait_exec(self, exec_id: str) -> int:
        ex = self.execs.get(exec_id)
        if ex is None:
            raise NotFound(f"exec {exec_id} not found in container {self.id}")
        return await ex.wait()

    def delete_exec(self, exec_id: str) -> None:
        """Forget an exec that ended (the Task API's Delete of an exec): its id is free again.

        An id the guest never ran is nothing to forget. Errors:
        ``FailedPrecondition`` while the exec runs.
        """
        ex = self.execs.get(exec_id)
        if ex is None:
            return
        if not ex.event.is_set():
            raise FailedPrecondition(f"exec {exec_id} of container {self.id} is still running")
        del self.execs[exec_id]

    async def signal_process(self, exec_id: str, signal: int) -> None:
        """Signal one process: ``exec_id`` "" is the init."""
        if exec_id:
            check_id(exec_id, "exec id")
        request = agent_pb2.SignalProcessRequest(
            container_id=self.id, exec_id=exec_id, signal=signal
        )
        await self.sandbox.agent.call("SignalProcess", request, Empty)

    # -- stdio (exec_id "" is the init) -------------------------------------------

    async def read_stdout(self, exec_id: str, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes`` of output; b"" at end of stream."""
        return await self._read("ReadStdout", exec_id, max_bytes)

    async def read_stderr(self, exec_id: str, max_bytes: int = 65536) -> bytes:
        return await self._read("ReadStderr", exec_id, max_bytes)

    async def _read(self, rpc: str, exec_id: str, max_bytes: int) -> bytes:
        request = agent_pb2.ReadStreamRequest(container_id=self.id, exec_id=exec_id, len=max_bytes)
        reply = await self.sandbox.agent.call(rpc, request, agent_pb2.ReadStreamResponse)
        if len(reply.data) > max_bytes:
            raise Internal(
                f"container {self.id}: {rpc} of {exec_id!r} returned {len(reply.data)} bytes, "
                f"asked for at most {max_bytes}"
            )
        return reply.data

    async def write_stdin(self, exec_id: str, data: bytes) -> int:
        request = agent_pb2.WriteStreamRequest(container_id=self.id, exec_id=exec_id, data=data)
        reply = await self.sandbox.agent.call("WriteStdin", request, agent_pb2.WriteStreamResponse)
        if reply.len > len(data):
            raise Internal(
                f"container {self.id}: the guest wrote {reply.len} bytes of {len(data)} "
                f"to the stdin of {exec_id!r}"
            )
        return reply.len

    async def close_stdin(self, exec_id: str) -> None:
        request = agent_pb2.CloseStdinRequest(container_id=self.id, exec_id=exec_id)
        await self.sandbox.agent.call("CloseStdin", request, Empty)

    async def resize(self, exec_id: str, rows: int, columns: int) -> None:
        request = agent_pb2.TtyWinResizeRequest(
            container_id=self.id, exec_id=exec_id, row=rows, column=columns
        )
        await self.sandbox.agent.call("TtyWinResize", request, Empty)

    async def process_list(self, fmt: str = "json", args: tuple[str, ...] = ()) -> bytes:
        self._require("running", "paused", verb="list processes of")
        request = agent_pb2.ListProcessesRequest(container_id=self.id, format=fmt, args=list(args))
        reply = await self.sandbox.agent.call(
            "ListProcesses", request, agent_pb2.ListProcessesResponse
        )
        return reply.process_list

    async def process_list_pids(self) -> list[int]:
        return guest_pids(await self.process_list("json"), self.id)

    async def update(self, resources: Mapping[str, Any]) -> None:
        self._require("created", "running", "paused", verb="update")
        res = oci_pb2.LinuxResources()
        message_from_json(res, dict(resources), "resources")
        request = agent_pb2.UpdateContainerRequest(container_id=self.id, resources=res)
        await self.sandbox.agent.call("UpdateContainer", request, Empty)

    async def stats(self) -> agent_pb2.StatsContainerResponse:
        self._require("created", "running", "paused", verb="get stats of")
        return await self.sandbox.agent.call(
            "StatsContainer",
            agent_pb2.StatsContainerRequest(container_id=self.id),
            agent_pb2.StatsContainerResponse,
        )


def _short(exc: Exception) -> str:
    """An error for a log line: its text may be the guest's, up to a ttrpc frame long."""
    return f"{type(exc).__name__}: {exc}"[:300]


def guest_status(status: int, what: str) -> int:
    """An exit status the guest reports, if it is one (0-255); else ``VM_GONE_STATUS``."""
    if 0 <= status <= 255:
        return status
    log.warning("%s: the guest reported exit status %d; using %d", what, status, VM_GONE_STATUS)
    return VM_GONE_STATUS


def guest_pids(raw: bytes, cid: str) -> list[int]:
    """The pids of a guest's JSON process list (``ListProcesses``), checked.

    Errors: ``Internal`` unless it is a list of at most ``MAX_PIDS`` pids, each
    an integer from 1 to ``PID_MAX``.
    """
    try:
        pids = json.loads(raw or b"[]")
    except (ValueError, RecursionError) as exc:  # deep nesting overflows the parser
        raise Internal(
            f"container {cid}: unreadable process list from the guest: {exc}"[:300]
        ) from None
    if not isinstance(pids, list) or len(pids) > MAX_PIDS:
        kind = f"{len(pids)} entries" if isinstance(pids, list) else type(pids).__name__
        raise Internal(
            f"container {cid}: process list from the guest is {kind}, "
            f"not a list of at most {MAX_PIDS} pids"
        )
    for pid in pids:
        if type(pid) is not int or not 1 <= pid <= PID_MAX:  # bool is an int subclass
            raise Internal(
                f"container {cid}: process list from the guest holds {pid!r:.40}, not a pid"
            )
    return pids


def joins_pod_pid_namespace(spec: Mapping[str, Any]) -> bool:
    """A CRI app container that shares its pod's PID namespace (shareProcessNamespace).

    The host spec names the pause container's namespace by a host path, which
    ``guest_spec`` drops; the agent joins the guest's pause container instead.
    """
    annotations = spec.get("annotations") or {}
    if annotations.get("io.kubernetes.cri.container-type") != "container":
        return False
    namespaces = (spec.get("linux") or {}).get("namespaces") or []
    return any(ns.get("type") == "pid" and ns.get("path") for ns in namespaces)


def guest_spec(spec: Mapping[str, Any], cid: str) -> oci_pb2.Spec:
    """The OCI spec as the guest must see it: rootfs on the shared mount, no host hooks."""
    container_id(cid)
    adjusted = dict(spec)
    root = dict(adjusted.get("root") or {})
    root["path"] = guest_rootfs(cid)
    adjusted["root"] = root
    adjusted.pop("hooks", None)  # host hooks cannot run in the guest
    linux = dict(adjusted.get("linux") or {})
    # The pod's network namespace lives on the host; inside the VM the
    # container shares the guest's network (Kata drops the netns path too).
    # New dicts without the host's paths: the caller's spec is left as it was
    # (``joins_pod_pid_namespace`` reads those paths after this).
    linux["namespaces"] = [
        {k: v for k, v in ns.items() if k != "path"}
        for ns in linux.get("namespaces", [])
        if ns.get("type") != "network"
    ]
    adjusted["linux"] = linux
    return spec_from_json(adjusted)
