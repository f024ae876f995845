"""Fakes of the VM's ends for the host's unit tests (never used in production).

The guest is hostile, so these fakes answer the way an attacker in the VM
could: ``FakeAgent`` is a real ttrpc server speaking Kata's agent API whose
replies are whatever the test scripts (error statuses, bytes that do not
decode, floods); ``FakeQmp`` is QEMU's QMP end, sending as many events as a
guest can make it send; ``FakeDebugConsole`` is the debug console port's
socket, driven by a script in a thread (``kata-py exec`` is synchronous).
"""

from __future__ import annotations

import collections
import contextlib
import json
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import trio
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from shimv2.errdefs import Unimplemented
from shimv2.pb.kata import agent_pb2, health_pb2
from shimv2.ttrpc import CallContext, Method, Server, Service, open_unix_listener
from shimv2.vc.config import Config, RuntimeConfig
from shimv2.vc.persist import ContainerState, SandboxState, Store
from shimv2.vc.qemu import Qemu
from shimv2.vc.qemu_config import QemuConfig
from shimv2.vc.sandbox import Sandbox

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
Reply = Callable[[Any], Awaitable[Message]]


class RawReply:
    """A reply whose payload is exactly ``payload``: bytes the shim cannot decode, say.

    The ttrpc server only calls ``SerializeToString`` on a reply.
    """

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def SerializeToString(self) -> bytes:
        return self.payload

    def as_message(self) -> Message:
        return cast(Message, self)


def scripted(*replies: Message | Exception) -> Reply:
    """A reply function giving ``replies`` in turn (raising the errors), then blocking forever."""
    left = list(replies)

    async def reply(request: Any) -> Message:
        if not left:
            await trio.sleep_forever()
        item = left.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    return reply


class FakeAgent:
    """``grpc.AgentService`` and ``grpc.Health`` on a unix socket, answering as scripted.

    ``replies[rpc]`` is a coroutine function of the request: it returns the
    reply (any message, or ``RawReply(...).as_message()``) or raises an errdefs
    error, which the shim receives as that status. Unscripted rpcs answer
    UNIMPLEMENTED. ``calls`` counts the calls of each rpc; ``disconnect``
    drops every connection and stops listening, as a VM that died.
    """

    def __init__(self) -> None:
        self.replies: dict[str, Reply] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self._called = trio.Event()
        self._scope: trio.CancelScope | None = None

    async def wait_calls(self, rpc: str, n: int) -> None:
        """Until ``rpc`` was called ``n`` times."""
        while self.calls[rpc] < n:
            await self._called.wait()

    def services(self) -> list[Service]:
        methods = {
            m.name: Method(GetMessageClass(m.input_type), self._handler(m.name))
            for m in AGENT_SERVICE.methods
        }
        health = Service("grpc.Health", {"Check": Method(health_pb2.CheckRequest, self._check)})
        return [Service(AGENT_SERVICE.full_name, methods), health]

    def _handler(self, rpc: str) -> Callable[[CallContext, Any], Awaitable[Message]]:
        async def handle(ctx: CallContext, request: Any) -> Message:
            self.calls[rpc] += 1
            self._called.set()
            self._called = trio.Event()
            reply = self.replies.get(rpc)
            if reply is None:
                raise Unimplemented(f"fake agent: {rpc} is not scripted")
            return await reply(request)

        return handle

    async def _check(
        self, ctx: CallContext, request: health_pb2.CheckRequest
    ) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def serve(
        self, path: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listener = await open_unix_listener(path)
        with trio.CancelScope() as self._scope:
            try:
                await Server(self.services()).serve(listener, task_status=task_status)
            finally:
                await listener.aclose()

    def disconnect(self) -> None:
        if self._scope is not None:
            self._scope.cancel()


@dataclass
class FakePod:
    """A real ``Sandbox`` with a running container ``c1``, whose agent is a ``FakeAgent``.

    No VM: the sandbox is connected to the fake agent's socket under
    ``directory``; ``ooms`` records what reaches ``on_oom``.
    """

    sandbox: Sandbox
    agent: FakeAgent
    ooms: list[str] = field(default_factory=list)
    oom_seen: trio.Event = field(default_factory=trio.Event)  # set at each OOM, then new

    def _on_oom(self, cid: str) -> None:
        self.ooms.append(cid)
        self.oom_seen.set()
        self.oom_seen = trio.Event()

    @classmethod
    async def start(cls, directory: Path, nursery: trio.Nursery) -> FakePod:
        agent = FakeAgent()
        path = str(directory / "agent.sock")
        await nursery.start(agent.serve, path)
        store = Store(directory / "state")
        store.create("sb")
        state = SandboxState(
            id="sb",
            state="running",
            agent_socket=path,
            containers={"c1": ContainerState(id="c1", bundle="/b", state="running")},
        )
        config = Config(runtime=RuntimeConfig(state_dir=str(directory / "state")))
        sandbox = Sandbox(store, config, state, nursery)
        await sandbox.connect_agent(5)
        pod = cls(sandbox, agent)
        sandbox.on_oom = pod._on_oom
        return pod


class FakeQmp:
    """QEMU's QMP end: it greets, negotiates, and sends ``events_per_command``
    events (VSERPORT_CHANGE, as a guest opening and closing a port makes QEMU
    send) before answering each command with ``{"return": {}}``."""

    def __init__(self, events_per_command: int) -> None:
        self.events_per_command = events_per_command
        self.commands: list[str] = []

    async def serve(
        self, path: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listener = await open_unix_listener(path)
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(self._session, stream)

    async def _session(self, stream: trio.SocketStream) -> None:
        greeting = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                        "package": ""}, "capabilities": []}}  # fmt: skip
        event = json.dumps(
            {
                "event": "VSERPORT_CHANGE",
                "data": {"id": "channel0", "open": True},
                "timestamp": {"seconds": 0, "microseconds": 0},
            }
        ).encode()
        async with stream:
            await stream.send_all(json.dumps(greeting).encode() + b"\r\n")
            buffer = ""
            decoder = json.JSONDecoder()
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data.decode()
                while buffer.strip():
                    # QMP is a stream of JSON values, not lines.
                    try:
                        command, end = decoder.raw_decode(buffer.lstrip())
                    except ValueError:
                        break  # the rest has not arrived yet
                    buffer = buffer.lstrip()[end:]
                    self.commands.append(command["execute"])
                    reply: dict[str, Any] = {"return": {}}
                    if "id" in command:
                        reply["id"] = command["id"]
                    if command["execute"] != "qmp_capabilities":
                        flood = (event + b"\r\n") * self.events_per_command
                        await stream.send_all(flood)
                    await stream.send_all(json.dumps(reply).encode() + b"\r\n")


class FakeDebugConsole:
    """The debug console port's socket on the host (QEMU listens on it).

    ``session`` runs in a thread with the one connection ``kata-py exec`` makes;
    use as a context manager around the client.
    """

    def __init__(self, path: str, session: Callable[[socket.socket], None]) -> None:
        self.path = path
        self._session = session
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> FakeDebugConsole:
        self._listener.bind(self.path)
        self._listener.listen(1)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(10)
        self._listener.close()

    def _run(self) -> None:
        conn, _ = self._listener.accept()
        try:
            with conn:
                self._session(conn)
                # QEMU keeps the port open after the session: until the host leaves.
                conn.settimeout(10)
                while conn.recv(65536):
                    pass
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc


class FakeHybridBackend:
    """A hybrid vsock socket that answers ``CONNECT`` with ``reply`` and then echoes.

    ``reply`` None closes the connection instead (a guest not listening yet).
    ``requests`` keeps the CONNECT lines received.
    """

    def __init__(self, path: Path, reply: bytes | None = b"OK 1024\n") -> None:
        self.path = path
        self.reply = reply
        self.requests: list[bytes] = []

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = await open_unix_listener(str(self.path))
        task_status.started()
        await trio.serve_listeners(self._one, [listener])

    async def _one(self, stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # a client that hung up
            await self._answer(stream)

    async def _answer(self, stream: trio.SocketStream) -> None:
        async with stream:
            line = b""
            while not line.endswith(b"\n") and len(line) < 64:
                chunk = await stream.receive_some(1)
                if not chunk:
                    return
                line += chunk
            self.requests.append(line)
            if self.reply is None:
                return
            await stream.send_all(self.reply)
            while data := await stream.receive_some(4096):
                await stream.send_all(data)


class RecordingFactory:
    """A factory that starts nothing: it records who asked, and returns an unstarted VM
    (the fallback a factory under test falls back to)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def get_vm(
        self, vm_id: str, config: QemuConfig, run_dir: Path, nursery: trio.Nursery
    ) -> Qemu:
        self.asked.append(vm_id)
        return Qemu(vm_id, config, run_dir)
