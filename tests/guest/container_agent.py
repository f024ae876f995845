"""A ContainerService to test for real: crun (or runc), a busybox rootfs, our ttrpc over a
socketpair.

The server side of the socketpair is an ``FdTransport``, as on the agent's
virtio-serial port; the client speaks our ttrpc codec, as the shim does, on the
agent's own asyncio loop (``tests.guest.aio_client``): the tests drive the service
directly too, and its child reaper needs the main thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from shimv2.aio import start_task
from shimv2.guest.containers import ContainerService
from shimv2.guest.process import set_child_subreaper
from shimv2.guest.runtime import Runtime
from shimv2.pb.kata import agent_pb2
from shimv2.ttrpc import Service
from shimv2.ttrpc.aio import FdTransport, Server, SocketTransport
from tests.guest.aio_client import Client, open_client
from tests.guest.rootfs import HostRuntime, build_rootfs, host_runtime, make_spec

SERVICE = "grpc.AgentService"
T = TypeVar("T", bound=Message)


@dataclass
class Agent:
    client: Client
    service: ContainerService
    host: HostRuntime
    rootfs: str
    prefix: str
    state_dir: Path

    def cid(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    async def call(self, method: str, req: Message, resp: type[T] = Empty) -> T:  # type: ignore[assignment]
        return await self.client.call(SERVICE, method, req, resp)

    async def create(self, name: str, args: list[str], *, terminal: bool = False) -> str:
        cid = self.cid(name)
        spec = make_spec(self.rootfs, args, terminal=terminal)
        await self.call(
            "CreateContainer", agent_pb2.CreateContainerRequest(container_id=cid, OCI=spec)
        )
        return cid

    async def run(self, name: str, args: list[str], *, terminal: bool = False) -> str:
        cid = await self.create(name, args, terminal=terminal)
        await self.call("StartContainer", agent_pb2.StartContainerRequest(container_id=cid))
        return cid

    async def read_all(self, cid: str, exec_id: str = "", *, stderr: bool = False) -> bytes:
        method = "ReadStderr" if stderr else "ReadStdout"
        out = bytearray()
        while True:
            resp = await self.call(
                method,
                agent_pb2.ReadStreamRequest(container_id=cid, exec_id=exec_id, len=65536),
                agent_pb2.ReadStreamResponse,
            )
            if not resp.data:
                return bytes(out)
            out += resp.data

    async def wait(self, cid: str, exec_id: str = "") -> int:
        resp = await self.call(
            "WaitProcess",
            agent_pb2.WaitProcessRequest(container_id=cid, exec_id=exec_id),
            agent_pb2.WaitProcessResponse,
        )
        return resp.status

    async def remove(self, cid: str) -> None:
        await self.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id=cid))


@asynccontextmanager
async def serve_agent(tmp_path: Path, host: HostRuntime | None = None) -> AsyncIterator[Agent]:
    """The agent's container service on crun (or ``host``), and a client connected to it."""
    host = host or host_runtime("crun")
    set_child_subreaper()
    runtime = Runtime(host.binary, command_prefix=host.command_prefix)
    state_dir = tmp_path / "state"
    service = ContainerService(
        runtime,
        str(state_dir),
        cgroup_root=host.cgroup_root,
        oom_poll_interval=0.1,
        proc_sys=str(tmp_path / "proc_sys"),  # never the host's own sysctls
    )
    server = Server(
        [Service.from_descriptor(agent_pb2.DESCRIPTOR.services_by_name["AgentService"], service)]
    )
    prefix = f"kp{uuid.uuid4().hex[:8]}"
    rootfs = str(build_rootfs(tmp_path / "rootfs"))
    fds = _open_fds()
    async with asyncio.TaskGroup() as group:
        service_task, _ = await start_task(group, service.run)
        ours, theirs = socket.socketpair()
        serving = group.create_task(server.serve_transport(FdTransport(theirs.detach())))
        try:
            async with open_client(SocketTransport(ours)) as client:
                yield Agent(client, service, host, rootfs, prefix, state_dir)
        finally:
            await service.remove_all()
            _force_cleanup(host, prefix)
            service_task.cancel()
            serving.cancel()
    # Every pipe, pty and socket of the processes went with their removal.
    assert _open_fds() == fds


def _open_fds() -> dict[str, str]:
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own, closed by now
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return fds


def _force_cleanup(host: HostRuntime, prefix: str) -> None:
    """Whatever a failed test left: crun state, cgroups."""
    listing = host.run("list", "-q").stdout.split()
    for cid in listing:
        if cid.startswith(prefix):
            host.run("delete", "-f", cid)
    parent = Path(host.cgroup_root) / "kata-py"
    for cg in parent.glob(f"{prefix}-*"):
        cg.rmdir()


def crun_ids(host: HostRuntime) -> list[str]:
    return host.run("list", "-q").stdout.split()
