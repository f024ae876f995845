"""The container half of the agent's ``grpc.AgentService``: containers, processes, stdio.

Serve with ``Service.from_descriptor(agent_pb2.DESCRIPTOR.services_by_name["AgentService"],
service)`` and start ``service.run`` first (``shimv2.aio.start``: it owns the child reaper,
the stdio pumps and the OOM watcher).

Each container's lifecycle verbs hold its own lock (never the service's) across
runtime calls; ``WaitProcess``, the stream rpcs and ``GetOOMEvent`` take no lock,
so a blocked call never delays another. The container states and the verbs each
allows are in ``_ALLOWED``.

Error handling: bad ids and absurd sizes are ``InvalidArgument``; unknown
containers and processes ``NotFound``; verbs the state forbids ``FailedPrecondition``;
a runtime refusal ``RuntimeFailed`` (a ``FailedPrecondition``). A failed create
leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import json
import logging
import os
import re
import shutil
import signal
import socket
from collections import deque
from collections.abc import Awaitable, Callable

from google.protobuf.empty_pb2 import Empty

from shimv2 import oci
from shimv2.aio import TASK_STATUS_IGNORED, Broadcast, TaskStatus, move_on_after, start
from shimv2.errdefs import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from shimv2.guest import cgroups
from shimv2.guest.process import Process
from shimv2.guest.runtime import Runtime, RuntimeFailed
from shimv2.guest.stdio import OutputBuffer, StdinWriter, receive_fd
from shimv2.pb.kata import agent_pb2, oci_pb2
from shimv2.ttrpc import CallContext

log = logging.getLogger(__name__)

CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
CRI_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,75}$")
MAX_READ = 1 << 20
MAX_CONTAINERS = 1024
MAX_EXECS = 256
MAX_FINISHED_EXECS = 1024
MAX_SIGNAL = 64
DEFAULT_REMOVE_TIMEOUT = 30.0
OOM_QUEUE = 64
OOM_HANDOVER = 1.0  # seconds an init's exit waits for the host to take its OOM event

# Runs the runtime verb that starts a process: (stdio fds, console socket, pid file).
_Launcher = Callable[[tuple[int, int, int], str | None, str], Awaitable[None]]


class State(enum.Enum):
    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


# What each verb needs the container to be in (Remove, Signal, Stats and the stream
# rpcs work in every state but CREATING).
_ALLOWED: dict[str, frozenset[State]] = {
    "start": frozenset({State.CREATED}),
    "exec": frozenset({State.RUNNING}),
    "pause": frozenset({State.RUNNING}),
    "resume": frozenset({State.PAUSED}),
    "update": frozenset({State.CREATED, State.RUNNING, State.PAUSED}),
}


def check_id(value: str, what: str) -> str:
    if not ID_PATTERN.match(value):
        raise InvalidArgument(f"invalid {what} {value[:100]!r}")
    return value


class Container:
    def __init__(self, cid: str, bundle: str) -> None:
        self.id = cid
        self.bundle = bundle
        self.cgroup = ""
        self.init: Process | None = None
        self.execs: dict[str, Process] = {}
        # Execs forgotten after WaitProcess: a late read of their output is EOF,
        # not NotFound (the host may read its last EOF after waiting). Bounded.
        self.finished_execs: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.lock = asyncio.Lock()
        self._state = State.CREATING
        self.oom_kills = 0
        self.poststart_hooks = False  # its spec has some: the runtime's own start runs them
        self.poststop_hooks = False  # and the runtime's own delete these

    @property
    def state(self) -> State:
        if self._state is not State.CREATING and self.init is not None and self.init.exited:
            return State.STOPPED
        return self._state

    @state.setter
    def state(self, value: State) -> None:
        self._state = value

    def require(self, verb: str) -> None:
        state = self.state
        if state not in _ALLOWED[verb]:
            raise FailedPrecondition(f"cannot {verb} container {self.id} in state {state.value}")

    def processes(self) -> list[Process]:
        return [*([self.init] if self.init is not None else []), *self.execs.values()]


class ContainerService:
    def __init__(
        self,
        runtime: Runtime,
        state_dir: str = "/run/kata-py/containers",
        *,
        cgroup_root: str = "/sys/fs/cgroup",
        cgroup_parent: str = "/kata-py",
        oom_poll_interval: float = 0.5,
        proc_sys: str = "/proc/sys",
    ) -> None:
        self.runtime = runtime
        self.state_dir = state_dir
        self._proc_sys = proc_sys
        self._cgroup_root = cgroup_root
        self._cgroup_parent = cgroup_parent
        self._oom_poll_interval = oom_poll_interval
        self._containers: dict[str, Container] = {}
        self._group: asyncio.TaskGroup | None = None
        self._console_seq = 0
        self._oom_events: deque[str] = deque(maxlen=OOM_QUEUE)
        self._oom_changed = Broadcast()
        self._oom_taken = Broadcast()

    # ---- lifetime -------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus = TASK_STATUS_IGNORED) -> None:
        """Run the reaper, the stdio pumps and the OOM watcher until cancelled."""
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        async with asyncio.TaskGroup() as group:
            if not self.runtime.reaper.running:  # else someone else runs it
                await start(group, self.runtime.reaper.run)
            group.create_task(self._watch_oom())
            self._group = group
            try:
                task_status.started()
                await asyncio.get_running_loop().create_future()  # until cancelled
            finally:
                self._group = None

    def _task_group(self) -> asyncio.TaskGroup:
        """Where the stdio pumps run: ``run``'s, so they end with it."""
        if self._group is None:
            raise FailedPrecondition("container service is not running")
        return self._group

    def _container(self, cid: str) -> Container:
        container = self._containers.get(check_id(cid, "container id"))
        if container is None:
            raise NotFound(f"container {cid} not found")
        if container.state is State.CREATING:
            raise FailedPrecondition(f"container {cid} is being created")
        return container

    def _process(self, cid: str, exec_id: str) -> tuple[Container, Process]:
        container = self._container(cid)
        if exec_id == "" or (exec_id == cid and cid not in container.execs):
            assert container.init is not None
            return container, container.init
        proc = container.execs.get(check_id(exec_id, "exec id"))
        if proc is None:
            raise NotFound(f"process {exec_id} not found in container {cid}")
        return container, proc

    # ---- create / start / remove ----------------------------------------------------------

    def _join_pod_namespaces(self, config: dict[str, object], sandbox_pidns: bool) -> None:
        """A CRI app container joins its pod's IPC and UTS namespaces (and PID, if asked).

        On a host, CRI points them at the pause container's; the host's paths
        mean nothing here, so the guest's pause container, found by the
        sandbox-id annotation, stands in. Pod sysctls (set on the pause
        container) and System V IPC are then shared as in a pod without a VM.
        """
        annotations = config.get("annotations") or {}
        assert isinstance(annotations, dict)
        if annotations.get(CRI_CONTAINER_TYPE) != "container":
            return
        sandbox = self._containers.get(str(annotations.get(CRI_SANDBOX_ID, "")))
        if sandbox is None or sandbox.init is None or sandbox.init.exited:
            log.warning("container of pod %s: no running sandbox container to join",
                        annotations.get(CRI_SANDBOX_ID))  # fmt: skip
            return
        shared = {"ipc", "uts", *(["pid"] if sandbox_pidns else [])}
        linux = config.get("linux")
        assert isinstance(linux, dict)
        for ns in linux.get("namespaces") or []:
            if ns.get("type") in shared:
                ns["path"] = f"/proc/{sandbox.init.pid}/ns/{ns['type']}"
        config.pop("hostname", None)  # a joined UTS namespace has the pod's; runtimes refuse it

    async def CreateContainer(
        self, ctx: CallContext, req: agent_pb2.CreateContainerRequest
    ) -> Empty:
        cid = check_id(req.container_id, "container id")
        spec = req.OCI
        if not req.HasField("OCI") or not spec.HasField("Process") or not spec.Process.Args:
            raise InvalidArgument("the OCI spec needs a process with args")
        if not spec.HasField("Root") or not spec.Root.Path:
            raise InvalidArgument("the OCI spec needs a root path")
        if cid in self._containers:
            raise AlreadyExists(f"container {cid} already exists")
        if len(self._containers) >= MAX_CONTAINERS:
            raise ResourceExhausted(f"more than {MAX_CONTAINERS} containers")
        group = self._task_group()
        container = Container(cid, os.path.join(self.state_dir, cid))
        self._containers[cid] = container
        async with container.lock:
            try:
                await self._create(container, spec, group, req.sandbox_pidns)
            except BaseException:
                # In a task of the service's, as trio's shielded scope did: a second cancel
                # of this call leaves it running, and its deadlines work (under 3.11, a
                # timeout in a task already being cancelled ends as a bare CancelledError).
                await asyncio.shield(group.create_task(self._destroy(container, force=True)))
                raise
        return Empty()

    async def _create(
        self,
        container: Container,
        spec: oci_pb2.Spec,
        group: asyncio.TaskGroup,
        sandbox_pidns: bool = False,
    ) -> None:
        bundle = container.bundle
        shutil.rmtree(bundle, ignore_errors=True)  # a leftover of an agent before us
        os.makedirs(bundle, mode=0o700)
        config = oci.spec_to_json(spec)
        config["ociVersion"] = oci.written_version(spec.Version)
        root = config["root"]
        root["path"] = os.path.normpath(os.path.join(bundle, root["path"]))
        linux = config.setdefault("linux", {})
        cgroups_path = linux.get("cgroupsPath", "")
        if not cgroups_path or cgroups.is_systemd_path(cgroups_path):
            cgroups_path = f"{self._cgroup_parent}/{container.id}"
        linux["cgroupsPath"] = cgroups_path
        container.cgroup = cgroups.cgroup_dir(self._cgroup_root, cgroups_path)
        for key, value in oci.take_shared_net_sysctls(config).items():
            _set_sysctl(self._proc_sys, key, value)
        self._join_pod_namespaces(config, sandbox_pidns)
        hooks = config.get("hooks")
        container.poststart_hooks = isinstance(hooks, dict) and bool(hooks.get("poststart"))
        container.poststop_hooks = isinstance(hooks, dict) and bool(hooks.get("poststop"))
        _write_json(os.path.join(bundle, "config.json"), config)
        container.init = await self._launch(
            container,
            "",
            spec.Process.Terminal,
            group,
            lambda stdio, console, pid_file: self.runtime.create(
                container.id,
                bundle,
                pid_file,
                log=os.path.join(bundle, "runtime.log"),
                stdio=stdio,
                console_socket=console,
            ),
        )
        container.state = State.CREATED

    async def StartContainer(self, ctx: CallContext, req: agent_pb2.StartContainerRequest) -> Empty:
        container = self._container(req.container_id)
        async with container.lock:
            container.require("start")
            await self.runtime.start(container.id, poststart_hooks=container.poststart_hooks)
            container.state = State.RUNNING
        return Empty()

    async def RemoveContainer(
        self, ctx: CallContext, req: agent_pb2.RemoveContainerRequest
    ) -> Empty:
        container = self._container(req.container_id)
        timeout = req.timeout or DEFAULT_REMOVE_TIMEOUT
        async with container.lock:
            if container.state is State.PAUSED:
                await self.runtime.resume(container.id)
                container.state = State.RUNNING
            # As Kata: a container still running is killed, not refused.
            self._kill_all(container)
            async with move_on_after(timeout) as scope:
                for proc in container.processes():
                    await proc.exit.wait()
            if scope.expired():
                raise DeadlineExceeded(f"container {container.id} did not exit within {timeout}s")
            await self._destroy(container, force=False)
        return Empty()

    def _kill_all(self, container: Container) -> None:
        for proc in container.processes():
            proc.signal(signal.SIGKILL)
        if container.cgroup:
            for pid in cgroups.read_procs(container.cgroup):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    async def _destroy(
        self, container: Container, *, force: bool, runtime_delete: bool = True
    ) -> None:
        """Delete the runtime's container, close every fd, remove the bundle and cgroup."""
        try:
            # Every process reaped (RemoveContainer waited) and no hooks to run: the
            # agent removes crun's container itself (checked last), as it starts one.
            if (
                runtime_delete
                and (container.init is not None or force)
                and (
                    force
                    or container.poststop_hooks
                    or not self.runtime.remove_stopped(container.id, container.cgroup)
                )
            ):
                try:
                    await self.runtime.delete(container.id, force=True)
                except RuntimeFailed:
                    if not force:
                        raise
        finally:
            for proc in container.processes():
                proc.close()
            shutil.rmtree(container.bundle, ignore_errors=True)
            if container.cgroup:
                with contextlib.suppress(OSError):
                    os.rmdir(container.cgroup)
            self._containers.pop(container.id, None)

    # ---- processes ------------------------------------------------------------------------

    async def ExecProcess(self, ctx: CallContext, req: agent_pb2.ExecProcessRequest) -> Empty:
        container = self._container(req.container_id)
        exec_id = check_id(req.exec_id, "exec id")
        if not req.HasField("process") or not req.process.Args:
            raise InvalidArgument("exec needs a process with args")
        group = self._task_group()
        async with container.lock:
            container.require("exec")
            if exec_id in container.execs:
                raise AlreadyExists(f"exec {exec_id} already exists in container {container.id}")
            if len(container.execs) >= MAX_EXECS:
                raise ResourceExhausted(f"more than {MAX_EXECS} execs in container {container.id}")
            process = oci.process_to_json(req.process)
            process.setdefault("cwd", "/")
            process_file = os.path.join(container.bundle, f"exec-{exec_id}.json")
            _write_json(process_file, process)
            try:
                container.execs[exec_id] = await self._launch(
                    container,
                    exec_id,
                    req.process.Terminal,
                    group,
                    lambda stdio, console, pid_file: self.runtime.exec(
                        container.id,
                        process_file,
                        pid_file,
                        log=os.path.join(container.bundle, f"exec-{exec_id}.log"),
                        stdio=stdio,
                        console_socket=console,
                    ),
                )
            finally:
                _unlink(process_file)
        return Empty()

    async def _launch(
        self,
        container: Container,
        exec_id: str,
        terminal: bool,
        group: asyncio.TaskGroup,
        run: _Launcher,
    ) -> Process:
        """Start a process with the runtime, with our pipes or a pty as its stdio."""
        pid_file = os.path.join(container.bundle, f"exec-{exec_id}.pid" if exec_id else "init.pid")
        if terminal:
            return await self._launch_tty(container, exec_id, group, run, pid_file)
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        ours = [stdin_w, stdout_r, stderr_r]
        try:
            await run((stdin_r, stdout_w, stderr_w), None, pid_file)
        except BaseException:
            _close(ours)
            raise
        finally:
            _close([stdin_r, stdout_w, stderr_w])
        try:
            pid = _read_pid(pid_file)
        except BaseException:
            _close(ours)
            raise
        proc = Process(
            exec_id,
            self.runtime.reaper.watch(pid),
            stdin=StdinWriter(stdin_w),
            stdout=OutputBuffer(),
            stderr=OutputBuffer(),
        )
        proc.start_pumps(group, stdout_r, stderr_r)
        return proc

    async def _launch_tty(
        self,
        container: Container,
        exec_id: str,
        group: asyncio.TaskGroup,
        run: _Launcher,
        pid_file: str,
    ) -> Process:
        console_dir = os.path.join(self.state_dir, ".console")
        os.makedirs(console_dir, mode=0o700, exist_ok=True)
        self._console_seq += 1
        path = os.path.join(console_dir, f"{self._console_seq}.sock")
        _unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            listener.setblocking(False)
            listener.bind(path)
            listener.listen(1)
            await run((null, null, null), path, pid_file)
            master = await receive_fd(listener)
        finally:
            os.close(null)
            listener.close()
            _unlink(path)
        try:
            pid = _read_pid(pid_file)
            writer_fd, resize_fd = os.dup(master), os.dup(master)
        except BaseException:
            os.close(master)
            raise
        proc = Process(
            exec_id,
            self.runtime.reaper.watch(pid),
            stdin=StdinWriter(writer_fd, eof_on_close=b"\x04"),
            stdout=OutputBuffer(),
            stderr=OutputBuffer.closed(),
            tty_fd=resize_fd,
        )
        proc.start_pumps(group, master, None)
        return proc

    async def SignalProcess(self, ctx: CallContext, req: agent_pb2.SignalProcessRequest) -> Empty:
        container, proc = self._process(req.container_id, req.exec_id)
        sig = req.signal
        if not 0 < sig <= MAX_SIGNAL:
            raise InvalidArgument(f"invalid signal {sig}")
        # As Kata: an init without a SIGTERM handler ignores SIGTERM (pid 1 of its pid
        # namespace), so it gets SIGKILL instead.
        if proc.init and sig == signal.SIGTERM and not proc.handles_signal(sig):
            sig = signal.SIGKILL
        proc.signal(sig)
        if proc.init and sig == signal.SIGKILL and container.cgroup:
            for pid in cgroups.read_procs(container.cgroup):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        return Empty()

    async def WaitProcess(
        self, ctx: CallContext, req: agent_pb2.WaitProcessRequest
    ) -> agent_pb2.WaitProcessResponse:
        container, proc = self._process(req.container_id, req.exec_id)
        status = await proc.wait()
        if proc.init:
            await self._hand_over_oom(container)
        proc.waited = True
        self._forget_if_done(container, proc)
        return agent_pb2.WaitProcessResponse(status=status)

    def _forget_if_done(self, container: Container, proc: Process) -> None:
        """Drop an exec once it was waited for and the host read all its output."""
        if proc.init or not proc.waited:
            return
        if proc.stdout.at_eof and proc.stderr.at_eof and container.execs.get(proc.exec_id) is proc:
            del container.execs[proc.exec_id]
            proc.close()
            container.finished_execs[proc.exec_id] = None
            while len(container.finished_execs) > MAX_FINISHED_EXECS:
                container.finished_execs.popitem(last=False)

    # ---- stdio ----------------------------------------------------------------------------

    async def WriteStdin(
        self, ctx: CallContext, req: agent_pb2.WriteStreamRequest
    ) -> agent_pb2.WriteStreamResponse:
        _, proc = self._process(req.container_id, req.exec_id)
        if proc.stdin is None:
            raise FailedPrecondition("process has no stdin")
        if not req.data:  # as Kata's runtime-rs: an empty write is end of input
            await proc.stdin.aclose()
            return agent_pb2.WriteStreamResponse(len=0)
        return agent_pb2.WriteStreamResponse(len=await proc.stdin.write(req.data))

    async def ReadStdout(
        self, ctx: CallContext, req: agent_pb2.ReadStreamRequest
    ) -> agent_pb2.ReadStreamResponse:
        return await self._read(req, stdout=True)

    async def ReadStderr(
        self, ctx: CallContext, req: agent_pb2.ReadStreamRequest
    ) -> agent_pb2.ReadStreamResponse:
        return await self._read(req, stdout=False)

    async def _read(
        self, req: agent_pb2.ReadStreamRequest, *, stdout: bool
    ) -> agent_pb2.ReadStreamResponse:
        if req.len == 0:
            raise InvalidArgument("read of 0 bytes")
        try:
            container, proc = self._process(req.container_id, req.exec_id)
        except NotFound:
            if req.exec_id in self._container(req.container_id).finished_execs:
                return agent_pb2.ReadStreamResponse(data=b"")
            raise
        buffer = proc.stdout if stdout else proc.stderr
        data = await buffer.read(min(req.len, MAX_READ))
        if not data:
            self._forget_if_done(container, proc)
        return agent_pb2.ReadStreamResponse(data=data)

    async def CloseStdin(self, ctx: CallContext, req: agent_pb2.CloseStdinRequest) -> Empty:
        _, proc = self._process(req.container_id, req.exec_id)
        if proc.stdin is not None:
            await proc.stdin.aclose()
        return Empty()

    async def TtyWinResize(self, ctx: CallContext, req: agent_pb2.TtyWinResizeRequest) -> Empty:
        _, proc = self._process(req.container_id, req.exec_id)
        if req.row > 0xFFFF or req.column > 0xFFFF:
            raise InvalidArgument(f"window size {req.row}x{req.column} out of range")
        proc.resize(req.row, req.column)
        return Empty()

    # ---- container-wide verbs -------------------------------------------------------------

    async def StatsContainer(
        self, ctx: CallContext, req: agent_pb2.StatsContainerRequest
    ) -> agent_pb2.StatsContainerResponse:
        container = self._container(req.container_id)
        return agent_pb2.StatsContainerResponse(cgroup_stats=cgroups.read_stats(container.cgroup))

    async def PauseContainer(self, ctx: CallContext, req: agent_pb2.PauseContainerRequest) -> Empty:
        container = self._container(req.container_id)
        async with container.lock:
            container.require("pause")
            await self.runtime.pause(container.id)
            container.state = State.PAUSED
        return Empty()

    async def ResumeContainer(
        self, ctx: CallContext, req: agent_pb2.ResumeContainerRequest
    ) -> Empty:
        container = self._container(req.container_id)
        async with container.lock:
            container.require("resume")
            await self.runtime.resume(container.id)
            container.state = State.RUNNING
        return Empty()

    async def UpdateContainer(
        self, ctx: CallContext, req: agent_pb2.UpdateContainerRequest
    ) -> Empty:
        container = self._container(req.container_id)
        if not req.HasField("resources"):
            return Empty()
        async with container.lock:
            container.require("update")
            path = os.path.join(container.bundle, "resources.json")
            _write_json(path, oci.resources_to_json(req.resources))
            try:
                await self.runtime.update(container.id, path)
            finally:
                _unlink(path)
        return Empty()

    async def ListProcesses(
        self, ctx: CallContext, req: agent_pb2.ListProcessesRequest
    ) -> agent_pb2.ListProcessesResponse:
        container = self._container(req.container_id)
        pids = cgroups.read_procs(container.cgroup)
        if not pids and container.state is not State.STOPPED:
            pids = await self.runtime.ps(container.id)
        if req.format == "json":
            listing = json.dumps(pids).encode()
        elif req.format in ("", "table"):
            lines = [f"{'PID':>7} CMD"] + [f"{pid:>7} {_cmdline(pid)}" for pid in pids]
            listing = ("\n".join(lines) + "\n").encode()
        else:
            raise InvalidArgument(f"unknown process list format {req.format[:32]!r}")
        return agent_pb2.ListProcessesResponse(process_list=listing)

    async def GetOOMEvent(
        self, ctx: CallContext, req: agent_pb2.GetOOMEventRequest
    ) -> agent_pb2.OOMEvent:
        while not self._oom_events:
            await self._oom_changed.wait()
        event = agent_pb2.OOMEvent(container_id=self._oom_events.popleft())
        self._oom_taken.notify_all()
        return event

    async def _watch_oom(self) -> None:
        while True:
            await asyncio.sleep(self._oom_poll_interval)
            for container in list(self._containers.values()):
                self._check_oom(container)

    def _check_oom(self, container: Container) -> bool:
        """Queue an OOM event if the container's cgroup counted a new OOM kill."""
        if not container.cgroup:
            return False
        kills = cgroups.oom_kills(container.cgroup)
        if kills <= container.oom_kills:
            return False
        container.oom_kills = kills
        self._oom_events.append(container.id)
        self._oom_changed.notify_all()
        return True

    async def _hand_over_oom(self, container: Container) -> None:
        """Before an init's exit goes out: its OOM kill, if any, goes out first.

        containerd reports a task as OOMKilled only when the OOM event came
        before the exit; the poller alone would often be late. Bounded, for a
        host that does not listen for OOM events.
        """
        if self._check_oom(container):
            async with move_on_after(OOM_HANDOVER):
                while container.id in self._oom_events:
                    await self._oom_taken.wait()

    async def remove_all(self, *, runtime_delete: bool = True) -> None:
        """Kill and remove every container (agent shutdown, tests).

        Without ``runtime_delete`` (DestroySandbox: the VM is powered off next)
        the runtime's own state is left to die with the guest's tmpfs: a
        ``crun delete`` per container costs ~0.2 s under TCG and changes nothing.
        """
        for container in list(self._containers.values()):
            if container.state is State.CREATING:
                continue
            self._kill_all(container)
            async with move_on_after(5):
                for proc in container.processes():
                    await proc.exit.wait()
            await self._destroy(container, force=True, runtime_delete=runtime_delete)

    async def destroy_all(self) -> None:
        """DestroySandbox: every container killed and forgotten, the VM's end is near."""
        await self.remove_all(runtime_delete=False)


# ---- helpers --------------------------------------------------------------------------------


def _set_sysctl(proc_sys: str, key: str, value: str) -> None:
    path = os.path.join(proc_sys, *key.split("."))
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise InvalidArgument(f"sysctl {key}={value!r}: {exc.strerror}") from exc


def _write_json(path: str, obj: object) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj))  # json.dump would take the pure-Python encoder


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _read_pid(path: str) -> int:
    try:
        with open(path, "rb") as f:
            text = f.read(32)
        pid = int(text.strip() or b"0")
    except (OSError, ValueError) as exc:
        raise Internal(f"unreadable pid file {path}: {exc}") from exc
    if pid <= 0:
        raise Internal(f"bad pid in {path}")
    return pid


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(4096)
    except OSError:
        return "?"
    args = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    if args:
        return args
    # No arguments (a zombie, or a process caught in execve): its name, as ps shows it.
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f"[{f.read(64).decode(errors='replace').strip()}]"
    except OSError:
        return "?"
