"""The whole agent server (no guest setup) over a socketpair and over the pty channel."""

from __future__ import annotations

import asyncio
import os
import pty
import socket
import subprocess
import sys
import threading
import tty
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import event, example, given
from hypothesis import strategies as st

from shimv2.errdefs import AlreadyExists, Code, Error, NotFound, Unimplemented
from shimv2.guest import agent as agent_mod
from shimv2.guest import channel as ch
from shimv2.guest.agent import Agent, Options, build_agent, parse_cmdline, parse_options
from shimv2.guest.system import AGENT_VERSION
from shimv2.guest.testing import FakeGuestOS, FakeIpCommand, fake_sysfs
from shimv2.guest_protocol import FORWARD_VSOCK_PORT
from shimv2.pb.kata import agent_pb2, health_pb2, types_pb2
from shimv2.ttrpc import CallContext, Client, FdTransport, SocketTransport, aio, open_client
from shimv2.ttrpc._codec import NEED_DATA, Connection, ResponseReceived, Role
from tests.aio import asyncio_in_thread, asyncio_test, run_autojump
from tests.strategies import messages

AGENT = "grpc.AgentService"
HEALTH = "grpc.Health"


def make_agent(**kw: object) -> Agent:
    return build_agent(Options(), guest=FakeGuestOS(fake_sysfs()), load_containers=False, **kw)  # type: ignore[arg-type]


@asynccontextmanager
async def connected(agent: Agent) -> AsyncIterator[tuple[Client, socket.socket]]:
    """A client on one end of a socketpair, the agent serving the other; also the raw socket.

    The agent runs on asyncio in a thread, the client on trio, as the host's shim does."""
    ours, theirs = socket.socketpair()
    with asyncio_in_thread(lambda: agent.server.serve_transport(aio.SocketTransport(theirs))):
        async with open_client(SocketTransport(ours)) as client:
            yield client, ours


async def test_health_and_version() -> None:
    async with connected(make_agent()) as (client, _):
        check = await client.call(
            HEALTH, "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse
        )
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        version = await client.call(
            HEALTH, "Version", health_pb2.CheckRequest(), health_pb2.VersionCheckResponse
        )
        assert version.agent_version == AGENT_VERSION
        assert version.grpc_version


async def test_guest_details_and_unknown_methods() -> None:
    async with connected(make_agent()) as (client, _):
        details = await client.call(
            AGENT,
            "GetGuestDetails",
            agent_pb2.GuestDetailsRequest(mem_block_size=True),
            agent_pb2.GuestDetailsResponse,
        )
        assert details.agent_details.version == AGENT_VERSION
        assert details.mem_block_size_bytes == 0x8000000
        for service, method in ((AGENT, "GetMetrics"), (AGENT, "Nope"), ("grpc.Nope", "Check")):
            with pytest.raises(Unimplemented) as info:
                await client.call(service, method, Empty(), Empty)
            assert int(info.value.code) == 12


async def test_create_sandbox_twice_is_already_exists() -> None:
    agent = make_agent()
    req = agent_pb2.CreateSandboxRequest(sandbox_id="sb", hostname="h")
    async with connected(agent) as (client, _):
        await client.call(AGENT, "CreateSandbox", req, Empty)
        with pytest.raises(AlreadyExists):
            await client.call(AGENT, "CreateSandbox", req, Empty)
    assert agent.sandbox.sandbox_id == "sb"


async def _raw_call(sock: socket.socket, codec: Connection, frame: bytes) -> ResponseReceived:
    await trio.to_thread.run_sync(sock.sendall, frame)
    while True:
        event = codec.next_event()
        if event is NEED_DATA:
            codec.receive_data(await trio.to_thread.run_sync(sock.recv, 65536))
        else:
            assert isinstance(event, ResponseReceived), event
            return event


async def test_bad_input_gets_a_clean_error_and_the_agent_keeps_serving() -> None:
    agent = make_agent()
    ours, theirs = socket.socketpair()
    with asyncio_in_thread(lambda: agent.server.serve_transport(aio.SocketTransport(theirs))):
        codec = Connection(Role.CLIENT)
        # An undecodable payload: INVALID_ARGUMENT for that call only.
        _, frame = codec.send_request(AGENT, "CreateSandbox", b"\xff\xff\xff")
        resp = await _raw_call(ours, codec, frame)
        assert resp.response.status.code == Code.INVALID_ARGUMENT
        # A frame larger than the cap: RESOURCE_EXHAUSTED, its payload skipped.
        await trio.to_thread.run_sync(ours.sendall, b"\xff\xff\xff\xff\x00\x00\x00\x63\x01\x00")
        # The same connection still serves (the huge frame's payload never comes: a new
        # connection shows the agent is fine).
        ours.close()
        async with connected(agent) as (client, _):
            check = await client.call(
                HEALTH, "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse
            )
            assert check.status == health_pb2.HealthCheckResponse.SERVING


async def test_undecodable_then_valid_on_one_connection() -> None:
    agent = make_agent()
    ours, theirs = socket.socketpair()
    with asyncio_in_thread(lambda: agent.server.serve_transport(aio.SocketTransport(theirs))):
        codec = Connection(Role.CLIENT)
        _, frame = codec.send_request(HEALTH, "Check", b"\x0a\xff")  # truncated string field
        assert (await _raw_call(ours, codec, frame)).response.status.code == Code.INVALID_ARGUMENT
        _, frame = codec.send_request(HEALTH, "Check", b"")
        resp = await _raw_call(ours, codec, frame)
        assert resp.response.status.code == 0
        check = health_pb2.HealthCheckResponse.FromString(resp.response.payload)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        ours.close()


@pytest.mark.parametrize("channel", ["serial", "serial+vsock"])
async def test_serve_channel_on_a_serial_port(tmp_path: Path, channel: str) -> None:
    # The agent opens the pty's slave as its port; the master plays the host.
    # serial+vsock (a template's) also listens on vsock, for its clones.
    master, slave = pty.openpty()
    tty.setraw(slave)
    ready: list[str] = []
    is_ready = threading.Event()  # set in the agent's thread

    def on_ready(where: str) -> None:
        ready.append(where)
        is_ready.set()

    agent = make_agent()
    opts = Options(channel=channel, port=os.ttyname(slave), vsock_port=free_vsock_port())
    with asyncio_in_thread(
        lambda: agent_mod.serve_channel(agent.server, opts, on_ready=on_ready, dev=tmp_path)
    ):
        assert await trio.to_thread.run_sync(is_ready.wait, 5)
        await _serves_health_on(channel, opts, ready, master)
    os.close(slave)


async def _serves_health_on(channel: str, opts: Options, ready: list[str], master: int) -> None:
    if channel == "serial":
        assert ready == [f"serial:{opts.port}"]
    else:
        # and, beside the agent's vsock port, port-forward's
        forward = f"port-forward on vsock:{FORWARD_VSOCK_PORT}"
        assert ready == [f"serial:{opts.port} and vsock:{opts.vsock_port} and {forward}"]
        for port in (opts.vsock_port, FORWARD_VSOCK_PORT):
            with pytest.raises(ch.ChannelError, match="in use"):  # our listeners hold them
                ch.open_vsock_listener(port).close()
    async with open_client(FdTransport(master)) as client:
        with trio.fail_after(5):
            check = await client.call(
                HEALTH, "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse
            )
        assert check.status == health_pb2.HealthCheckResponse.SERVING


def free_vsock_port() -> int:
    """A vsock port nobody on this host listens on (the host needs no vsock device to listen)."""
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as probe:
        probe.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
        return int(probe.getsockname()[1])


@asyncio_test
async def test_serve_channel_without_any_channel_fails(tmp_path: Path) -> None:
    opts = Options(channel="auto", port_wait=0.2)
    with pytest.raises(ch.ChannelError):
        async with asyncio.timeout(20):
            await agent_mod.serve_channel(
                make_agent().server,
                opts,
                on_ready=lambda _: None,
                dev=tmp_path,
                sys_ports=tmp_path,
            )
    with pytest.raises(ch.ChannelError):
        await agent_mod.serve_channel(
            make_agent().server,
            Options(channel="serial", port=str(tmp_path / "none")),
            on_ready=lambda _: None,
        )


def test_options_from_cmdline_and_argv(tmp_path: Path) -> None:
    cmdline = "console=ttyS0 kata_py.channel=vsock kata_py.runtime=runc kata_py.debug kata_py.x="
    assert parse_cmdline(cmdline) == {"channel": "vsock", "runtime": "runc", "debug": "1", "x": ""}
    missing = str(tmp_path / "modules")
    opts = parse_options([], cmdline, pid=42, ppid=7, modules_list=missing)
    assert (opts.channel, opts.runtime, opts.debug, opts.guest_setup) == (
        "vsock",
        "runc",
        True,
        False,
    )
    assert parse_options([], "", pid=1, ppid=0, modules_list=missing).guest_setup
    assert not parse_options([], "", pid=5, ppid=1, modules_list=missing).guest_setup
    Path(missing).touch()  # the guest image's module list: started by the guest's init
    assert parse_options([], "", pid=5, ppid=1, modules_list=missing).guest_setup
    opts = parse_options(
        ["--no-guest-setup", "--channel", "serial", "--port", "/dev/x"], "", pid=1, ppid=0
    )
    assert (opts.guest_setup, opts.channel, opts.port) == (False, "serial", "/dev/x")
    assert parse_options(["--guest-setup"], "", pid=9, ppid=8).guest_setup
    assert parse_options([], "kata_py.channel=bogus", pid=9, ppid=8).channel == "auto"
    assert parse_options([], "kata_py.debug_console=1", pid=9, ppid=8).debug_console
    assert not parse_options([], "", pid=9, ppid=8).debug_console


async def test_containers_are_composed_and_destroy_calls_back() -> None:
    removed: list[str] = []

    class Containers:
        async def CreateContainer(
            self, ctx: object, req: agent_pb2.CreateContainerRequest
        ) -> Empty:
            return Empty()

        async def destroy_all(self) -> None:
            removed.append("all")

    agent = build_agent(Options(), guest=FakeGuestOS(), containers=Containers())
    async with connected(agent) as (client, _):
        await client.call(
            AGENT, "CreateContainer", agent_pb2.CreateContainerRequest(container_id="c"), Empty
        )
        await client.call(
            AGENT, "CreateSandbox", agent_pb2.CreateSandboxRequest(sandbox_id="s"), Empty
        )
        await client.call(AGENT, "DestroySandbox", agent_pb2.DestroySandboxRequest(), Empty)
    assert removed == ["all"]


def test_the_real_container_service_loads_or_is_skipped() -> None:
    # Whatever state shimv2.guest.containers is in, building the agent never fails.
    agent = build_agent(Options(state_dir="/nonexistent/kata-py-test"), guest=FakeGuestOS())
    assert agent.server.lookup(AGENT, "CreateSandbox") is not None


async def test_agent_process_serves_a_pty_port(tmp_path: Path) -> None:
    """``python -m shimv2.guest`` as a process, on the host (no guest setup), through main()."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    port = os.ttyname(slave)
    argv = [
        sys.executable, "-m", "shimv2.guest", "--no-guest-setup", "--channel", "serial",
        "--port", port, "--state-dir", str(tmp_path / "state"),
    ]  # fmt: skip
    async with trio.open_nursery() as nursery:
        proc = await nursery.start(
            partial(trio.run_process, argv, stderr=subprocess.PIPE, check=False)
        )
        assert proc.stderr is not None
        seen = b""
        with trio.fail_after(20):
            while b"KATA_PY_AGENT_READY uptime=" not in seen:
                chunk = await proc.stderr.receive_some()
                assert chunk, seen
                seen += chunk
        assert b"kata-py-agent: INFO" in seen
        client = Client(FdTransport(master))
        async with trio.open_nursery() as inner:
            inner.start_soon(client.receive_loop)
            with trio.fail_after(10):
                check = await client.call(
                    HEALTH, "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse
                )
                assert check.status == health_pb2.HealthCheckResponse.SERVING
                # Served by the real container service: an unknown container is NotFound.
                with pytest.raises(NotFound):
                    await client.call(
                        AGENT,
                        "StartContainer",
                        agent_pb2.StartContainerRequest(container_id="nope"),
                        Empty,
                    )
            inner.cancel_scope.cancel()
        await client.aclose()
        proc.terminate()
    os.close(slave)


# -- fuzzing: the agent's handlers with random requests ------------------------------------------

FUZZ_MAC = "02:00:00:aa:bb:01"  # one of the strategies' interesting strings
# The rpcs served without the container service: they run on FakeGuestOS and FakeIpCommand.
# The container rpcs (CreateContainer, ExecProcess, ...) run crun and are not fuzzed here.
FUZZED_RPCS = [
    (svc.full_name, m.name, GetMessageClass(m.input_type), GetMessageClass(m.output_type))
    for svc in (agent_mod.AGENT_SERVICE, agent_mod.HEALTH_SERVICE)
    for m in svc.methods
    if make_agent().server.lookup(svc.full_name, m.name) is not None
]


@st.composite
def agent_requests(draw: st.DrawFn) -> tuple[str, str, Message, type[Message]]:
    service, rpc, request, response = draw(st.sampled_from(FUZZED_RPCS))
    if draw(st.integers(0, 3)) == 0:  # random bytes that happen to decode
        try:
            message = request.FromString(draw(st.binary(max_size=200)))
        except DecodeError:
            message = request()  # the server answers what does not decode, not the handler
    else:
        message = draw(messages(request))
    return service, rpc, message, response


async def _agent_calls(calls: list[tuple[str, str, Message, type[Message]]]) -> list[str]:
    ip = FakeIpCommand()
    ip.add_link("eth0", FUZZ_MAC, up=True)
    ip.add_link("eth1", "02:00:00:aa:bb:02")
    agent = make_agent(ip=ip)
    outcomes = []
    for service, rpc, request, response in calls:
        method = agent.server.lookup(service, rpc)
        assert method is not None
        ctx = CallContext(service, rpc, {})
        try:
            result = await method.handler(ctx, request)
        except Error as exc:
            outcomes.append(f"{rpc}: {type(exc).__name__}")
            continue
        assert type(result) is response
        outcomes.append(f"{rpc}: OK")
    return outcomes


@pytest.mark.fuzz
@given(st.lists(agent_requests(), min_size=1, max_size=5))
@example(  # found by fuzzing: a NUL byte in an ip argument went out as UNKNOWN
    [(AGENT, "UpdateRoutes", agent_pb2.UpdateRoutesRequest(routes=agent_pb2.Routes(
        Routes=[types_pb2.Route(device="x\x00y")])), agent_pb2.Routes)]
)  # fmt: skip
def test_fuzz_agent_handlers_give_a_reply_or_a_coded_error(
    calls: list[tuple[str, str, Message, type[Message]]],
) -> None:
    # A jumping clock: the waits for hot-plugged links, mounts and CPUs pass at once.
    for outcome in run_autojump(_agent_calls(calls)):
        event(outcome)
