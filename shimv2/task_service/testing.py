"""Fakes for the task service's unit tests (never used in production).

``FakeVirtContainers`` behaves like a VM's containers as the task service
sees them: each process runs a ``Program`` (output, then an exit code after a
delay, on a signal, or when its stdin closes), its output is read through the
same ``read_stdout``/``read_stderr`` calls with b"" at EOF, and every verb is
recorded in ``calls``.
"""

from __future__ import annotations

import json
import signal as signals
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio
from google.protobuf.message import Message

from shimv2.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from shimv2.pb.kata import agent_pb2
from shimv2.vc.container import ContainerConfig, ContainerStatus
from shimv2.vc.sandbox import SandboxConfig, SandboxStatus

FAKE_VM_PID = 4242
MAX_SIGNAL = 64  # the guest agent's bound (SIGRTMAX)


@dataclass(frozen=True)
class Program:
    """What a fake process does once started."""

    stdout: bytes = b""
    stderr: bytes = b""
    exit_code: int = 0
    # Seconds to run after writing its output; None: until signalled.
    run_for: float | None = 0.0
    # Copy stdin to stdout until stdin closes, then exit.
    echo: bool = False


class _Stream:
    """One output stream: a buffer, read in chunks, b"" once closed and empty."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._closed = False
        self._changed = trio.Event()

    def write(self, data: bytes) -> None:
        self._data += data
        self._wake()

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def read(self, n: int) -> bytes:
        while not self._data and not self._closed:
            await self._changed.wait()
        out = bytes(self._data[:n])
        del self._data[:n]
        return out


class FakeProcess:
    def __init__(self, program: Program) -> None:
        self.program = program
        self.stdout = _Stream()
        self.stderr = _Stream()
        self.stdin_data = bytearray()
        self.stdin_closed = trio.Event()
        self.exit_status: int | None = None
        self.exited = trio.Event()
        self.signals: list[int] = []
        self._stop = trio.Event()
        self._stop_status = 0
        self._stdin_changed = trio.Event()

    async def run(self) -> None:
        p = self.program
        self.stdout.write(p.stdout)
        self.stderr.write(p.stderr)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._until_stopped, nursery.cancel_scope)
            if p.echo:
                await self._echo()
            elif p.run_for is None:
                await trio.sleep_forever()
            else:
                await trio.sleep(p.run_for)
            nursery.cancel_scope.cancel()
        self.exit(self._stop_status if self._stop.is_set() else p.exit_code)

    async def _until_stopped(self, scope: trio.CancelScope) -> None:
        await self._stop.wait()
        scope.cancel()

    async def _echo(self) -> None:
        sent = 0
        while True:
            if len(self.stdin_data) > sent:
                self.stdout.write(bytes(self.stdin_data[sent:]))
                sent = len(self.stdin_data)
            elif self.stdin_closed.is_set():
                return
            else:
                await self._stdin_changed.wait()
                self._stdin_changed = trio.Event()

    def signal(self, sig: int) -> None:
        if not 0 <= sig <= MAX_SIGNAL:  # as the guest agent refuses it: exit statuses stay 0-255
            raise InvalidArgument(f"invalid signal {sig}")
        self.signals.append(sig)
        if sig and not self.exited.is_set():
            self._stop_status = 128 + sig
            self._stop.set()

    def exit(self, status: int) -> None:
        if self.exited.is_set():
            return
        self.exit_status = status
        self.stdout.close()
        self.stderr.close()
        self.exited.set()

    def write_stdin(self, data: bytes) -> int:
        self.stdin_data += data
        self._stdin_changed.set()
        return len(data)

    def close_stdin(self) -> None:
        self.stdin_closed.set()
        self._stdin_changed.set()


class FakeContainer:
    """A vc ``Container`` as the task service uses it."""

    def __init__(self, vc: FakeVirtContainers, config: ContainerConfig) -> None:
        self.vc = vc
        self.config = config
        self.state = "created"
        self.init = FakeProcess(vc.program(config.id))
        self.execs: dict[str, FakeProcess] = {}
        self.resizes: list[tuple[str, int, int]] = []
        self.updates: list[Mapping[str, Any]] = []

    @property
    def id(self) -> str:
        return self.config.id

    def status(self) -> ContainerStatus:
        return ContainerStatus(self.id, self.state, FAKE_VM_PID, self.init.exit_status, {})

    def start(self) -> None:
        if self.state != "created":
            raise FailedPrecondition(f"cannot start container {self.id} in state {self.state}")
        self.state = "running"
        self.vc.nursery.start_soon(self._run_init)

    async def _run_init(self) -> None:
        await self.init.run()
        self.state = "stopped"
        for ex in self.execs.values():  # the pid namespace dies with its init
            ex.signal(signals.SIGKILL)

    def process(self, exec_id: str) -> FakeProcess:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise NotFound(f"exec {exec_id} not found in container {self.id}") from None

    async def wait(self) -> int:
        await self.init.exited.wait()
        assert self.init.exit_status is not None
        return self.init.exit_status

    async def wait_exec(self, exec_id: str) -> int:
        p = self.process(exec_id)
        await p.exited.wait()
        assert p.exit_status is not None
        return p.exit_status

    async def enter(self, exec_id: str, process: Mapping[str, Any]) -> None:
        self.vc.calls.append(("enter", self.id, exec_id, dict(process)))
        await trio.lowlevel.checkpoint()
        if self.state != "running":
            raise FailedPrecondition(f"cannot exec in container {self.id} in state {self.state}")
        if exec_id in self.execs:
            raise AlreadyExists(f"exec {exec_id} exists")
        p = FakeProcess(self.vc.program(self.id, exec_id))
        self.execs[exec_id] = p
        self.vc.nursery.start_soon(p.run)

    async def signal_process(self, exec_id: str, signal: int) -> None:
        await trio.lowlevel.checkpoint()
        self.process(exec_id).signal(signal)

    async def read_stdout(self, exec_id: str, max_bytes: int = 65536) -> bytes:
        return await self.process(exec_id).stdout.read(max_bytes)

    async def read_stderr(self, exec_id: str, max_bytes: int = 65536) -> bytes:
        return await self.process(exec_id).stderr.read(max_bytes)

    async def write_stdin(self, exec_id: str, data: bytes) -> int:
        await trio.lowlevel.checkpoint()
        return self.process(exec_id).write_stdin(data)

    async def close_stdin(self, exec_id: str) -> None:
        await trio.lowlevel.checkpoint()
        self.process(exec_id).close_stdin()

    async def resize(self, exec_id: str, rows: int, columns: int) -> None:
        await trio.lowlevel.checkpoint()
        self.resizes.append((exec_id, rows, columns))

    def delete_exec(self, exec_id: str) -> None:
        p = self.execs.get(exec_id)
        if p is not None and not p.exited.is_set():
            raise FailedPrecondition(f"exec {exec_id} is still running")
        self.execs.pop(exec_id, None)


class FakeSandbox:
    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.state = "ready"
        self.containers: dict[str, FakeContainer] = {}
        self.on_oom: Callable[[str], None] | None = None

    def container(self, cid: str) -> FakeContainer:
        try:
            return self.containers[cid]
        except KeyError:
            raise NotFound(f"container {cid} not found") from None


class FakeVirtContainers:
    """The vc verbs the task service calls, over fake containers."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.sandboxes: dict[str, FakeSandbox] = {}
        self.programs: dict[tuple[str, str], Program] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.stats_response = agent_pb2.StatsContainerResponse()
        self.pids: list[int] = [1, 7]
        self.process_list: bytes | None = None  # what the guest answers, if not ``pids``
        self.stop_delay = 0.0  # seconds a stop_sandbox takes (a VM slow to go)
        self.stop_failures = 0  # how many stop_sandbox calls fail first

    def program(self, cid: str, exec_id: str = "") -> Program:
        """What ``cid``'s init (or exec) runs; default: until signalled."""
        return self.programs.get((cid, exec_id), Program(run_for=None))

    def _sandbox(self, sid: str) -> FakeSandbox:
        try:
            return self.sandboxes[sid]
        except KeyError:
            raise NotFound(f"sandbox {sid} not found") from None

    def container(self, sid: str, cid: str) -> FakeContainer:
        return self._sandbox(sid).container(cid)

    async def _verb(self, *call: Any) -> None:
        self.calls.append(call)
        await trio.lowlevel.checkpoint()

    async def create_sandbox(self, config: SandboxConfig) -> FakeSandbox:
        await self._verb("create_sandbox", config.id)
        if config.id in self.sandboxes:
            raise AlreadyExists(f"sandbox {config.id} exists")
        sandbox = FakeSandbox(config)
        for cc in config.containers:
            sandbox.containers[cc.id] = FakeContainer(self, cc)
        self.sandboxes[config.id] = sandbox
        return sandbox

    async def start_sandbox(self, sid: str) -> FakeSandbox:
        await self._verb("start_sandbox", sid)
        sandbox = self._sandbox(sid)
        for c in sandbox.containers.values():
            if c.state == "created":
                c.start()
        sandbox.state = "running"
        return sandbox

    async def stop_sandbox(self, sid: str, force: bool = False) -> FakeSandbox:
        await self._verb("stop_sandbox", sid)
        await trio.sleep(self.stop_delay)
        if self.stop_failures > 0:
            self.stop_failures -= 1
            raise Unavailable(f"sandbox {sid}: stop failed")
        sandbox = self._sandbox(sid)
        for c in sandbox.containers.values():
            c.init.signal(signals.SIGKILL)
            c.init.exit(137)
        sandbox.state = "stopped"
        return sandbox

    async def delete_sandbox(self, sid: str) -> None:
        await self._verb("delete_sandbox", sid)
        if self._sandbox(sid).state != "stopped":
            raise FailedPrecondition(f"sandbox {sid} is not stopped")
        del self.sandboxes[sid]

    async def fetch_sandbox(self, sid: str) -> FakeSandbox:
        await trio.lowlevel.checkpoint()
        return self._sandbox(sid)

    async def status_sandbox(self, sid: str) -> SandboxStatus:
        await trio.lowlevel.checkpoint()
        sandbox = self._sandbox(sid)
        statuses = tuple(c.status() for c in sandbox.containers.values())
        return SandboxStatus(sid, sandbox.state, FAKE_VM_PID, statuses)

    async def create_container(self, sid: str, config: ContainerConfig) -> ContainerStatus:
        await self._verb("create_container", sid, config.id)
        sandbox = self._sandbox(sid)
        if config.id in sandbox.containers:
            raise AlreadyExists(f"container {config.id} exists")
        c = sandbox.containers[config.id] = FakeContainer(self, config)
        return c.status()

    async def start_container(self, sid: str, cid: str) -> ContainerStatus:
        await self._verb("start_container", sid, cid)
        c = self.container(sid, cid)
        c.start()
        return c.status()

    async def stop_container(self, sid: str, cid: str) -> ContainerStatus:
        await self._verb("stop_container", sid, cid)
        c = self.container(sid, cid)
        if c.state == "created":
            c.init.exit(137)
            c.state = "stopped"
        else:
            c.init.signal(signals.SIGKILL)
            await c.init.exited.wait()
        return c.status()

    async def delete_container(self, sid: str, cid: str) -> ContainerStatus:
        await self._verb("delete_container", sid, cid)
        c = self.container(sid, cid)
        if c.state != "stopped":
            raise FailedPrecondition(f"cannot delete container {cid} in state {c.state}")
        del self._sandbox(sid).containers[cid]
        return c.status()

    async def kill_container(self, sid: str, cid: str, signal: int, all_: bool = False) -> None:
        await self._verb("kill_container", sid, cid, signal, all_)
        c = self.container(sid, cid)
        c.init.signal(signal)
        if all_:
            for ex in c.execs.values():
                ex.signal(signal)

    async def pause_container(self, sid: str, cid: str) -> None:
        await self._verb("pause_container", sid, cid)
        self.container(sid, cid).state = "paused"

    async def resume_container(self, sid: str, cid: str) -> None:
        await self._verb("resume_container", sid, cid)
        self.container(sid, cid).state = "running"

    async def process_list_container(self, sid: str, cid: str, fmt: str = "json") -> bytes:
        await self._verb("process_list_container", sid, cid, fmt)
        self.container(sid, cid)
        if self.process_list is not None:
            return self.process_list
        return json.dumps(self.pids).encode()

    async def update_container(self, sid: str, cid: str, resources: Mapping[str, Any]) -> None:
        await self._verb("update_container", sid, cid)
        self.container(sid, cid).updates.append(resources)

    async def stats_container(self, sid: str, cid: str) -> agent_pb2.StatsContainerResponse:
        await self._verb("stats_container", sid, cid)
        self.container(sid, cid)
        return self.stats_response


class RecordingPublisher:
    """A publisher that keeps ``(topic, event)`` in order and wakes waiters."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Message]] = []
        self._changed = trio.Event()

    def publish(self, topic: str, event: Message) -> None:
        self.events.append((topic, event))
        self._changed.set()
        self._changed = trio.Event()

    def topics(self) -> list[str]:
        return [topic for topic, _ in self.events]

    async def wait_for(self, topic: str, count: int = 1) -> None:
        while self.topics().count(topic) < count:
            await self._changed.wait()


class RecordingShutdown:
    def __init__(self) -> None:
        self.requests = 0

    def request(self) -> None:
        self.requests += 1

    def requested(self) -> bool:
        return self.requests > 0
