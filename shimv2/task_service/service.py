"""containerd's Task API (v2 and v3) on top of the virtcontainers API.

The handlers are thin: look the process up, check the verb against its state
(``process.TRANSITIONS``), call vc, record, publish. What they share lives in
``Task``/``Process`` objects; a process's lock serialises its own lifecycle
verbs only, and no lock is held while a handler waits for an exit, so Wait
never blocks another call.

Event order (runc's ``preStart`` and ``handleInitExit``, Kata's ``wait.go``):
- ``/tasks/create`` after vc created the container;
- ``/tasks/start`` and ``/tasks/exec-started`` once the start succeeded, and
  only then is the exit watcher started, so an exit never precedes its start;
- ``/tasks/exit`` once the process ended AND its stdout/stderr were copied to
  EOF; an init's exit waits for the exits of every started exec first;
- ``/tasks/delete`` after the task is gone.
Wait returns after the exit was published.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import trio
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.timestamp_pb2 import Timestamp

from shimv2.errdefs import (
    AlreadyExists,
    DeadlineExceeded,
    Error,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    Unimplemented,
)
from shimv2.pb.containerd.events import task_pb2 as events
from shimv2.pb.containerd.runtime.task.v2 import shim_pb2 as shim_v2
from shimv2.pb.containerd.runtime.task.v3 import shim_pb2 as shim_v3
from shimv2.pb.containerd.types import mount_pb2
from shimv2.pb.containerd.types.task import task_pb2
from shimv2.pb.kata import agent_pb2
from shimv2.task_service.process import Process, State, Verb
from shimv2.task_service.stdio import AgentStreams, ProcessIO, StdioConfig
from shimv2.ttrpc import CallContext, Method, Service
from shimv2.vc.container import ContainerConfig, ContainerStatus, guest_pids
from shimv2.vc.ids import check_id, container_id
from shimv2.vc.sandbox import SandboxConfig, SandboxStatus
from shimv2.vc.storage import RootfsMount

log = logging.getLogger(__name__)

VERSION = "kata-py"
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
VM_GONE_STATUS = 255
TEARDOWN_TIMEOUT = 30.0


# -- what the service needs from its collaborators (structural types) ----------------


class Publisher(Protocol):
    def publish(self, topic: str, event: Message) -> None: ...


class Shutdown(Protocol):
    def request(self) -> None: ...
    def requested(self) -> bool: ...


class ContainerHandle(AgentStreams, Protocol):
    """What the service uses of a vc ``Container``."""

    async def wait(self) -> int: ...
    async def wait_exec(self, exec_id: str) -> int: ...
    async def enter(self, exec_id: str, process: Mapping[str, Any]) -> None: ...
    async def signal_process(self, exec_id: str, signal: int) -> None: ...
    async def resize(self, exec_id: str, rows: int, columns: int) -> None: ...
    def delete_exec(self, exec_id: str) -> None: ...


class SandboxHandle(Protocol):
    on_oom: Callable[[str], None] | None

    def container(self, cid: str) -> ContainerHandle: ...


class VirtContainers(Protocol):
    """The verbs of ``shimv2.vc.api.VirtContainers`` the service calls."""

    async def create_sandbox(self, config: SandboxConfig) -> object: ...
    async def start_sandbox(self, sid: str) -> object: ...
    async def stop_sandbox(self, sid: str, force: bool = ...) -> object: ...
    async def delete_sandbox(self, sid: str) -> None: ...
    async def fetch_sandbox(self, sid: str) -> SandboxHandle: ...
    async def status_sandbox(self, sid: str) -> SandboxStatus: ...
    async def create_container(self, sid: str, config: ContainerConfig) -> ContainerStatus: ...
    async def start_container(self, sid: str, cid: str) -> ContainerStatus: ...
    async def stop_container(self, sid: str, cid: str) -> ContainerStatus: ...
    async def delete_container(self, sid: str, cid: str) -> ContainerStatus: ...
    async def kill_container(self, sid: str, cid: str, signal: int, all_: bool = ...) -> None: ...
    async def pause_container(self, sid: str, cid: str) -> None: ...
    async def resume_container(self, sid: str, cid: str) -> None: ...
    async def process_list_container(self, sid: str, cid: str, fmt: str = ...) -> bytes: ...
    async def update_container(self, sid: str, cid: str, resources: Mapping[str, Any]) -> None: ...
    async def stats_container(self, sid: str, cid: str) -> agent_pb2.StatsContainerResponse: ...


# -- tasks -----------------------------------------------------------------------------


@dataclass
class Task:
    """A container: its init, its execs, where it lives."""

    id: str
    sandbox_id: str
    bundle: str
    owns_sandbox: bool  # the pod's sandbox container, or a plain ``ctr run`` one
    rootfs: list[mount_pb2.Mount]
    init: Process
    execs: dict[str, Process] = field(default_factory=dict)
    exec_specs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        proc = self.execs.get(exec_id)
        if proc is None:
            raise NotFound(f"exec {exec_id} not found in task {self.id}")
        return proc


def _timestamp(when: datetime | None) -> Timestamp | None:
    if when is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def load_spec(bundle: str) -> dict[str, Any]:
    path = Path(bundle) / "config.json"
    try:
        spec = json.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise NotFound(f"bundle {bundle}: no config.json") from exc
    except (OSError, ValueError, RecursionError) as exc:  # deep nesting overflows the parser
        raise InvalidArgument(f"bundle {bundle}: unreadable config.json: {exc}") from exc
    if not isinstance(spec, dict):
        raise InvalidArgument(f"bundle {bundle}: config.json is not an object")
    return spec


def network_namespace(spec: Mapping[str, Any]) -> str:
    """The pod's network namespace path ("": a new one, unconnected).

    No network namespace in the spec means the host's (CRI's hostNetwork, ctr
    --net-host): a VM cannot join it, so such a pod is refused, as Kata does.
    """
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "network":
            return str(ns.get("path") or "")
    raise InvalidArgument(
        "host networking is not supported: a pod in a VM cannot share the host's network "
        "namespace (CRI hostNetwork, ctr --net-host)"
    )


def cgroups_path(spec: Mapping[str, Any]) -> str:
    """``linux.cgroupsPath``: the pod's cgroup for the sandbox (checked in ``shimv2.vc``)."""
    value = (spec.get("linux") or {}).get("cgroupsPath") or ""
    if not isinstance(value, str):
        raise InvalidArgument(f"linux.cgroupsPath is not a string: {value!r}"[:120])
    return value


def _json_any(value: bytes, what: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value or b"{}")
    except (ValueError, RecursionError) as exc:  # deep nesting overflows the parser
        raise InvalidArgument(f"{what} is not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise InvalidArgument(f"{what} is not a JSON object")
    return parsed


class TaskService:
    """The Task API; bind with ``services()``, run its background work with ``run()``."""

    def __init__(
        self,
        vc: VirtContainers,
        publisher: Publisher,
        shutdown: Shutdown,
        *,
        namespace: str,
        shim_id: str,
    ) -> None:
        self._vc = vc
        self._publisher = publisher
        self._shutdown = shutdown
        self._namespace = namespace
        self._shim_id = shim_id
        self._tasks: dict[str, Task] = {}
        self._creating: set[str] = set()
        self._orphaned: set[str] = set()  # sandboxes whose owning container was deleted
        # Deletes going on past their callers' deadlines: Shutdown waits for them.
        self._deleting = 0
        self._no_deletes = trio.Event()
        self._no_deletes.set()
        self._nursery: trio.Nursery | None = None

    # -- wiring --------------------------------------------------------------------

    def services(self) -> list[Service]:
        v2 = Service.from_descriptor(shim_v2.DESCRIPTOR.services_by_name["Task"], self)
        v3 = Service.from_descriptor(shim_v3.DESCRIPTOR.services_by_name["Task"], self)
        methods = {}
        for rpc in shim_v3.DESCRIPTOR.services_by_name["Task"].methods:
            if rpc.name in v3.methods:
                m = v3.methods[rpc.name]
                methods[rpc.name] = Method(
                    m.request_type, _responding(m.handler, GetMessageClass(rpc.output_type))
                )
        return [v2, Service(v3.name, methods)]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Exit watchers and IO copiers run here until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def _background(self) -> trio.Nursery:
        if self._nursery is None:
            raise Unavailable("task service is not running")
        return self._nursery

    def _task(self, cid: str) -> Task:
        task = self._tasks.get(cid)
        if task is None:
            raise NotFound(f"task {cid} not found")
        return task

    async def _container(self, task: Task) -> ContainerHandle:
        return (await self._vc.fetch_sandbox(task.sandbox_id)).container(task.id)

    async def _vm_pid(self, sid: str) -> int:
        return (await self._vc.status_sandbox(sid)).qemu_pid

    def _publish(self, topic: str, event: Message) -> None:
        self._publisher.publish(topic, event)

    def _publish_oom(self, cid: str) -> None:
        self._publish("/tasks/oom", events.TaskOOM(container_id=cid))

    # -- lifecycle -------------------------------------------------------------------

    async def Create(
        self, ctx: CallContext, req: shim_v2.CreateTaskRequest
    ) -> shim_v2.CreateTaskResponse:
        cid = container_id(req.id)
        if cid in self._tasks or cid in self._creating:
            raise AlreadyExists(f"task {cid} already exists")
        if req.checkpoint:
            raise Unimplemented("kata-py cannot restore a checkpoint")
        self._creating.add(cid)
        try:
            task = await self._create(req, cid)
            self._tasks[cid] = task
        finally:
            self._creating.discard(cid)
        io = events.TaskIO(
            stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal
        )
        self._publish(
            "/tasks/create",
            events.TaskCreate(
                container_id=cid, bundle=req.bundle, rootfs=task.rootfs, io=io, pid=task.init.pid
            ),
        )
        return shim_v2.CreateTaskResponse(pid=task.init.pid)

    async def _create(self, req: shim_v2.CreateTaskRequest, cid: str) -> Task:
        spec = load_spec(req.bundle)
        annotations = {str(k): str(v) for k, v in (spec.get("annotations") or {}).items()}
        rootfs = tuple(RootfsMount(m.type, m.source, tuple(m.options)) for m in req.rootfs)
        config = ContainerConfig(cid, req.bundle, spec, rootfs, annotations)
        stdio = StdioConfig(req.stdin, req.stdout, req.stderr, req.terminal)
        io = await ProcessIO.open(stdio, container_id=cid, namespace=self._namespace)
        try:
            if annotations.get(CONTAINER_TYPE) == "container":
                sid = annotations.get(SANDBOX_ID, "")
                if not sid:
                    raise InvalidArgument(f"container {cid}: annotation {SANDBOX_ID} missing")
                await self._vc.create_container(sid, config)
            else:
                sid = cid
                await self._vc.create_sandbox(
                    SandboxConfig(
                        id=cid,
                        hostname=str(spec.get("hostname") or ""),
                        netns=network_namespace(spec),
                        annotations=annotations,
                        containers=(config,),
                        cgroups_path=cgroups_path(spec),
                    )
                )
                (await self._vc.fetch_sandbox(sid)).on_oom = self._publish_oom
            pid = await self._vm_pid(sid)
        except BaseException:
            with trio.CancelScope(shield=True):
                await io.aclose()
            raise
        init = Process(cid, "", stdio, io, pid=pid)
        return Task(cid, sid, req.bundle, sid == cid, list(req.rootfs), init)

    async def Start(self, ctx: CallContext, req: shim_v2.StartRequest) -> shim_v2.StartResponse:
        task = self._task(req.id)
        proc = task.process(req.exec_id)
        nursery = self._background()
        async with proc.lock:
            proc.check(Verb.START)
            if proc.is_init:
                if task.owns_sandbox:
                    await self._vc.start_sandbox(task.sandbox_id)  # starts its container
                else:
                    await self._vc.start_container(task.sandbox_id, task.id)
                container = await self._container(task)
            else:
                task.init.check(Verb.EXEC)
                container = await self._container(task)
                await container.enter(proc.exec_id, task.exec_specs[proc.exec_id])
            proc.transition(Verb.START)
            proc.started = True
            proc.io.start(nursery, container, proc.exec_id)
            if proc.is_init:
                self._publish("/tasks/start", events.TaskStart(container_id=task.id, pid=proc.pid))
            else:
                self._publish(
                    "/tasks/exec-started",
                    events.TaskExecStarted(
                        container_id=task.id, exec_id=proc.exec_id, pid=proc.pid
                    ),
                )
            nursery.start_soon(self._watch, task, proc, container)
        return shim_v2.StartResponse(pid=proc.pid)

    async def _watch(self, task: Task, proc: Process, container: ContainerHandle) -> None:
        """Await the exit, the drain of its output (and for init, the execs' exits); publish."""
        try:
            if proc.is_init:
                status = await container.wait()
            else:
                status = await container.wait_exec(proc.exec_id)
        except Error as exc:
            log.warning("task %s/%s: wait failed: %s", task.id, proc.exec_id, exc)
            status = VM_GONE_STATUS
        proc.ended = True
        proc.io.stop_stdin()
        await proc.io.wait_outputs()
        if proc.is_init:
            for ex in list(task.execs.values()):
                async with ex.lock:  # a start in flight finishes (or fails) first
                    pass
                if ex.started:
                    await ex.exited.wait()
        proc.record_exit(status)
        self._publish(
            "/tasks/exit",
            events.TaskExit(
                container_id=task.id,
                id=proc.id,
                pid=proc.pid,
                exit_status=proc.exit_status,
                exited_at=_timestamp(proc.exited_at),
            ),
        )
        proc.exited.set()

    async def Exec(self, ctx: CallContext, req: shim_v2.ExecProcessRequest) -> Empty:
        task = self._task(req.id)
        exec_id = check_id(req.exec_id, "exec id")
        if exec_id in task.execs:
            raise AlreadyExists(f"exec {exec_id} already exists in task {task.id}")
        task.init.check(Verb.EXEC)
        process_spec = _json_any(req.spec.value, "exec spec")
        stdio = StdioConfig(req.stdin, req.stdout, req.stderr, req.terminal)
        if stdio.terminal:
            process_spec["terminal"] = True
        io = await ProcessIO.open(stdio, container_id=task.id, namespace=self._namespace)
        if exec_id in task.execs or self._tasks.get(task.id) is not task:
            await io.aclose()
            raise AlreadyExists(f"exec {exec_id} already exists in task {task.id}")
        task.execs[exec_id] = Process(task.id, exec_id, stdio, io, pid=task.init.pid)
        task.exec_specs[exec_id] = process_spec
        self._publish(
            "/tasks/exec-added", events.TaskExecAdded(container_id=task.id, exec_id=exec_id)
        )
        return Empty()

    async def Wait(self, ctx: CallContext, req: shim_v2.WaitRequest) -> shim_v2.WaitResponse:
        proc = self._task(req.id).process(req.exec_id)
        await proc.wait()
        return shim_v2.WaitResponse(
            exit_status=proc.exit_status, exited_at=_timestamp(proc.exited_at)
        )

    async def Kill(self, ctx: CallContext, req: shim_v2.KillRequest) -> Empty:
        task = self._task(req.id)
        proc = task.process(req.exec_id)
        if proc.ended or proc.state is State.STOPPED:
            if proc.is_init and (req.signal == signal.SIGKILL or req.all):
                return Empty()
            raise NotFound("process already finished")
        proc.check(Verb.KILL)
        if proc.is_init:
            await self._vc.kill_container(task.sandbox_id, task.id, req.signal, req.all)
        else:
            await (await self._container(task)).signal_process(proc.exec_id, req.signal)
        return Empty()

    async def Delete(self, ctx: CallContext, req: shim_v2.DeleteRequest) -> shim_v2.DeleteResponse:
        task = self._task(req.id)
        proc = task.process(req.exec_id)
        if proc.is_init:
            await self._delete_init(task)
        else:
            async with proc.lock:
                proc.check(Verb.DELETE)
                await proc.io.aclose()
                proc.transition(Verb.DELETE)
                task.execs.pop(proc.exec_id, None)
                task.exec_specs.pop(proc.exec_id, None)
                proc.exited.set()  # a Wait on an exec deleted before it started
                if proc.started:
                    await self._forget_exec(task, proc.exec_id)
        return shim_v2.DeleteResponse(
            pid=proc.pid, exit_status=proc.exit_status, exited_at=_timestamp(proc.exited_at)
        )

    async def _forget_exec(self, task: Task, exec_id: str) -> None:
        """vc forgets a deleted exec too: memory stays bounded, and the id can be reused."""
        try:
            (await self._container(task)).delete_exec(exec_id)
        except (NotFound, FailedPrecondition) as exc:  # its container or VM went first
            log.warning("task %s: exec %s: %s", task.id, exec_id, exc)

    async def _delete_init(self, task: Task) -> None:
        proc = task.init
        async with proc.lock:
            proc.check(Verb.DELETE)
            # Once begun, a delete runs to its end, bounded, whatever the caller's
            # deadline: cut short, it left a VM stopped but its sandbox (state, shim)
            # behind for good (20 pods stopping at once through containerd 1.6's 10 s).
            # containerd's retry then finds the task gone, and shuts the shim down.
            if self._deleting == 0:
                self._no_deletes = trio.Event()
            self._deleting += 1
            try:
                with trio.CancelScope(shield=True), trio.fail_after(TEARDOWN_TIMEOUT):
                    await self._delete_init_locked(task)
            except trio.TooSlowError:
                raise DeadlineExceeded(
                    f"task {task.id}: delete took over {TEARDOWN_TIMEOUT:g}s"
                ) from None
            finally:
                self._deleting -= 1
                if self._deleting == 0:
                    self._no_deletes.set()
        self._publish(
            "/tasks/delete",
            events.TaskDelete(
                container_id=task.id,
                pid=proc.pid,
                exit_status=proc.exit_status,
                exited_at=_timestamp(proc.exited_at),
            ),
        )

    async def _delete_init_locked(self, task: Task) -> None:
        """The delete itself, under the init's lock and shielded (``_delete_init``)."""
        proc = task.init
        if proc.state is State.CREATED:
            stopped = await self._vc.stop_container(task.sandbox_id, task.id)
            status = 137 if stopped.exit_status is None else stopped.exit_status
            proc.record_exit(status)
        if self._goes_with_its_sandbox(task):
            # The VM is powered off first: removing the container in the guest
            # (a crun delete, ~0.2 s under TCG) would change nothing. If that
            # stop fails, the reap below tries again and reports it.
            try:
                await self._vc.stop_sandbox(task.sandbox_id, True)
            except Error as exc:
                log.warning("task %s: stopping its sandbox first: %s", task.id, exc)
        await self._vc.delete_container(task.sandbox_id, task.id)
        for ex in list(task.execs.values()):
            await ex.io.aclose()
            ex.exited.set()
        await proc.io.aclose()
        proc.transition(Verb.DELETE)
        proc.exited.set()
        if self._tasks.get(task.id) is task:
            del self._tasks[task.id]
        if task.owns_sandbox:
            self._orphaned.add(task.sandbox_id)
        await self._reap_sandbox(task.sandbox_id)

    def _goes_with_its_sandbox(self, task: Task) -> bool:
        """Deleting ``task`` ends its sandbox: it is the sandbox's own, alone in it."""
        sid = task.sandbox_id
        if not task.owns_sandbox or sid in self._creating:
            return False
        return not any(t.sandbox_id == sid and t is not task for t in self._tasks.values())

    async def _reap_sandbox(self, sid: str) -> None:
        """Stop and delete a sandbox whose own container is gone, once it is empty."""
        if sid not in self._orphaned:
            return
        if any(t.sandbox_id == sid for t in self._tasks.values()) or sid in self._creating:
            return
        self._orphaned.discard(sid)  # first: one reaper, however many deletes race
        try:
            await self._vc.stop_sandbox(sid, True)
            await self._vc.delete_sandbox(sid)
        except BaseException:
            self._orphaned.add(sid)  # a teardown that failed is tried again at Shutdown
            raise

    # -- queries and controls ----------------------------------------------------------

    async def State(self, ctx: CallContext, req: shim_v2.StateRequest) -> shim_v2.StateResponse:
        task = self._task(req.id)
        proc = task.process(req.exec_id)
        return shim_v2.StateResponse(
            id=task.id,
            bundle=task.bundle,
            pid=proc.pid,
            status=proc.status,
            stdin=proc.stdio.stdin,
            stdout=proc.stdio.stdout,
            stderr=proc.stdio.stderr,
            terminal=proc.stdio.terminal,
            exit_status=proc.exit_status,
            exited_at=_timestamp(proc.exited_at),
            exec_id=proc.exec_id,
        )

    async def Pids(self, ctx: CallContext, req: shim_v2.PidsRequest) -> shim_v2.PidsResponse:
        task = self._task(req.id)
        try:
            raw = await self._vc.process_list_container(task.sandbox_id, task.id, "json")
        except Unimplemented:
            return shim_v2.PidsResponse(processes=[task_pb2.ProcessInfo(pid=task.init.pid)])
        infos = [task_pb2.ProcessInfo(pid=pid) for pid in guest_pids(raw, task.id)]
        return shim_v2.PidsResponse(processes=infos)

    async def Pause(self, ctx: CallContext, req: shim_v2.PauseRequest) -> Empty:
        task = self._task(req.id)
        async with task.init.lock:
            task.init.check(Verb.PAUSE)
            await self._vc.pause_container(task.sandbox_id, task.id)
            task.init.transition(Verb.PAUSE)
        self._publish("/tasks/paused", events.TaskPaused(container_id=task.id))
        return Empty()

    async def Resume(self, ctx: CallContext, req: shim_v2.ResumeRequest) -> Empty:
        task = self._task(req.id)
        async with task.init.lock:
            task.init.check(Verb.RESUME)
            await self._vc.resume_container(task.sandbox_id, task.id)
            task.init.transition(Verb.RESUME)
        self._publish("/tasks/resumed", events.TaskResumed(container_id=task.id))
        return Empty()

    async def ResizePty(self, ctx: CallContext, req: shim_v2.ResizePtyRequest) -> Empty:
        task = self._task(req.id)
        proc = task.process(req.exec_id)
        if proc.state not in (State.RUNNING, State.PAUSED):
            raise FailedPrecondition(
                f"cannot resize the pty of a process in {proc.state.value} state"
            )
        container = await self._container(task)
        await container.resize(proc.exec_id, rows=req.height, columns=req.width)
        return Empty()

    async def CloseIO(self, ctx: CallContext, req: shim_v2.CloseIORequest) -> Empty:
        proc = self._task(req.id).process(req.exec_id)
        if req.stdin:
            await proc.io.close_stdin()
        return Empty()

    async def Update(self, ctx: CallContext, req: shim_v2.UpdateTaskRequest) -> Empty:
        task = self._task(req.id)
        resources = _json_any(req.resources.value, "resources")
        await self._vc.update_container(task.sandbox_id, task.id, resources)
        return Empty()

    async def Stats(self, ctx: CallContext, req: shim_v2.StatsRequest) -> shim_v2.StatsResponse:
        task = self._task(req.id)
        stats = await self._vc.stats_container(task.sandbox_id, task.id)
        # The cgroups Metrics messages (~2 MiB) only in a shim that is asked for stats.
        from shimv2.task_service.stats import host_is_cgroup_v2, metrics_any

        return shim_v2.StatsResponse(stats=metrics_any(stats, cgroup_v2=host_is_cgroup_v2()))

    async def Connect(
        self, ctx: CallContext, req: shim_v2.ConnectRequest
    ) -> shim_v2.ConnectResponse:
        task = self._tasks.get(req.id)
        return shim_v2.ConnectResponse(
            shim_pid=os.getpid(), task_pid=task.init.pid if task else 0, version=VERSION
        )

    async def Checkpoint(self, ctx: CallContext, req: shim_v2.CheckpointTaskRequest) -> Empty:
        raise Unimplemented("checkpoint is not supported: kata-py cannot checkpoint a VM's task")

    async def Shutdown(self, ctx: CallContext, req: shim_v2.ShutdownRequest) -> Empty:
        # containerd's retry of a delete that outlived its deadline finds the task
        # gone and asks for this: the delete's own teardown finishes first.
        with trio.move_on_after(TEARDOWN_TIMEOUT):
            await self._no_deletes.wait()
        if self._tasks and not req.now:
            return Empty()
        if req.now or self._orphaned:  # orphaned: a sandbox whose teardown failed
            await self._teardown_all()
        self._shutdown.request()
        return Empty()

    async def _teardown_all(self) -> None:
        """Shutdown(now): take every sandbox this service knows down, best effort."""
        sids = {t.sandbox_id for t in self._tasks.values() if t.owns_sandbox} | self._orphaned
        with trio.move_on_after(TEARDOWN_TIMEOUT):
            for sid in sorted(sids):
                try:
                    await self._vc.stop_sandbox(sid, True)
                    await self._vc.delete_sandbox(sid)
                except Error as exc:
                    log.warning("shutdown: sandbox %s: %s", sid, exc)


def _responding(
    handler: Callable[[CallContext, Any], Awaitable[Message]], output: type[Message]
) -> Callable[[CallContext, Any], Awaitable[Message]]:
    """The same handler answering with ``output`` (v3's class for the same message)."""

    async def call(ctx: CallContext, request: Any) -> Message:
        response = await handler(ctx, request)
        if type(response) is output:
            return response
        return output.FromString(response.SerializeToString())

    return call
