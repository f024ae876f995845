"""The agent seam: a ttrpc client of the guest agent (Kata's agent API).

A handful of methods, not one per rpc: ``call`` takes the rpc name and its
request, so the sandbox code names rpcs exactly as Kata's protocol does.

The guest is hostile. ttrpc bounds a reply (4 MiB) and turns one that does
not decode into ``Internal``; here an error's text, which is the guest's and
ends up in logs and in replies to containerd, is cut to ``MAX_ERROR_TEXT``.
What a reply holds is checked where it is used (``container.py``, ``stats.py``).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

import trio
from google.protobuf.message import Message

from shimv2.errdefs import DeadlineExceeded, Error, Unavailable
from shimv2.pb.kata import health_pb2
from shimv2.relay import read_line
from shimv2.ttrpc import Client, open_client, open_unix_stream
from shimv2.vc.hypervisor import AgentEndpoint

AGENT_SERVICE = "grpc.AgentService"
HEALTH_SERVICE = "grpc.Health"
DEFAULT_TIMEOUT = 60.0
# Kata gives these no deadline: they block until something happens in the guest.
UNBOUNDED = frozenset({"WaitProcess", "GetOOMEvent", "ReadStdout", "ReadStderr"})
MAX_ERROR_TEXT = 1024
HANDSHAKE_TIMEOUT = 5.0
DIAL_PAUSE = 0.05  # seconds between dials while the guest does not listen, doubling...
MAX_DIAL_PAUSE = 0.8  # ...up to this
MAX_HANDSHAKE_REPLY = 32  # "OK 4294967295\n" is 14

T = TypeVar("T", bound=Message)


class AgentClient:
    def __init__(self, client: Client, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._client = client
        self._timeout = timeout
        self._open = trio.Event()
        self._open.set()

    async def hold(self, timeout: float) -> None:
        """Keep new calls back until ``release``, once the guest has read every earlier one.

        For pausing the VM: vhost-device-vsock 0.3.0 ends its worker on any
        host byte that arrives while QEMU has its rings stopped, and the agent
        never answers again. Frames go out in the order calls are made, so the
        answer to a health check made here means the ones before it are through.
        """
        self._open = trio.Event()
        try:
            await self.check(timeout)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        self._open.set()

    async def wait_open(self) -> None:
        """Return once no ``hold`` is on (at once if none is)."""
        while not self._open.is_set():
            await self._open.wait()

    async def call(self, rpc: str, request: Message, response_type: type[T]) -> T:
        """Call ``grpc.AgentService/<rpc>``; errors come back as errdefs classes."""
        timeout = None if rpc in UNBOUNDED else self._timeout
        # No checkpoint between a held gate's test and the frame being queued
        # (Event.wait checkpoints even when set), so none slips past ``hold``.
        await self.wait_open()
        try:
            return await self._client.call(
                AGENT_SERVICE, rpc, request, response_type, timeout=timeout
            )
        except Error as exc:
            if len(exc.message) <= MAX_ERROR_TEXT:
                raise
            cut = f"{exc.message[:MAX_ERROR_TEXT]}... ({len(exc.message)} characters)"
            raise type(exc)(cut) from None  # the same code; the long text is dropped

    async def check(self, timeout: float) -> bool:
        response = await self._client.call(
            HEALTH_SERVICE,
            "Check",
            health_pb2.CheckRequest(),
            health_pb2.HealthCheckResponse,
            timeout=timeout,
        )
        return response.status == health_pb2.HealthCheckResponse.SERVING

    @property
    def closed(self) -> bool:
        return self._client.closed

    async def wait_closed(self) -> None:
        await self._client.wait_closed()


async def open_stream(endpoint: AgentEndpoint) -> trio.SocketStream:
    """A stream to the guest's ``endpoint`` (its port, for vsock), without ttrpc on it."""
    if endpoint.unix_path is not None:
        return await open_unix_stream(endpoint.unix_path)
    if endpoint.hybrid_path is not None:
        stream = await open_unix_stream(endpoint.hybrid_path)
        try:
            await hybrid_handshake(stream, endpoint.vsock_port)
        except BaseException:
            await stream.aclose()
            raise
        return stream
    if endpoint.vsock_cid is None:
        raise Unavailable("agent endpoint has neither a unix path nor a vsock cid")
    sock = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        await sock.connect((endpoint.vsock_cid, endpoint.vsock_port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def hybrid_handshake(stream: trio.abc.Stream, port: int) -> None:
    """Firecracker's hybrid vsock: ``CONNECT <port>\n``, answered ``OK <n>\n``.

    What ``n`` is differs between backends (vhost-device-vsock says the guest
    port, Firecracker a host port): any number will do. The reply is read a
    byte at a time, so nothing of the ttrpc stream after it is consumed, and
    bounded. A backend that closes first (the guest is not listening yet) or
    stays silent past HANDSHAKE_TIMEOUT is an OSError, which the caller
    retries; anything else is Unavailable.
    """
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await stream.send_all(f"CONNECT {port}\n".encode())
            line = await read_line(stream, MAX_HANDSHAKE_REPLY + 1)
            if len(line) > MAX_HANDSHAKE_REPLY:
                raise Unavailable(f"hybrid vsock: reply too long: {line[:32]!r}")
            if not line.endswith(b"\n"):
                raise ConnectionResetError(f"hybrid vsock: closed before OK to CONNECT {port}")
    except trio.BrokenResourceError as exc:
        raise ConnectionResetError(f"hybrid vsock: CONNECT {port}: {exc}") from exc
    except trio.TooSlowError:
        # A guest too busy to answer yet (TCG, many VMs booting): an OSError, so
        # that the caller asks again until its own deadline, as for a reset.
        raise TimeoutError(
            f"hybrid vsock: no reply to CONNECT {port} in {HANDSHAKE_TIMEOUT:g}s"
        ) from None
    words = line.split()
    if len(words) != 2 or words[0] != b"OK" or not words[1].isdigit():
        raise Unavailable(f"hybrid vsock: unexpected reply to CONNECT {port}: {line!r}")


@asynccontextmanager
async def connect_agent(
    endpoint: AgentEndpoint, *, ready_timeout: float = 60.0, timeout: float = DEFAULT_TIMEOUT
) -> AsyncIterator[AgentClient]:
    """Connect and wait until the agent answers a health check.

    virtio-serial keeps the host's bytes until the guest reads them, and the
    guest speaks only after the host does, so the host asks again every half
    second until the agent answers.
    """
    deadline = trio.current_time() + ready_timeout
    last_error: Exception | None = None
    pause = DIAL_PAUSE
    hint = endpoint.hint
    if endpoint.ready is not None:
        with trio.move_on_at(deadline) as waiting:
            await endpoint.ready()
        if waiting.cancelled_caught:
            raise Unavailable(
                f"agent not reachable at {endpoint}: its channel was not ready "
                f"within {ready_timeout:g}s"
            )
    while True:
        try:
            stream = await open_stream(endpoint)
        except OSError as exc:  # vsock: the guest is not listening yet
            last_error = exc
            if trio.current_time() > deadline:
                raise Unavailable(f"agent not reachable at {endpoint}: {exc}") from exc
            # Backing off: each early dial costs the vsock backend a refused
            # connection, and a backend that took many was seen to stop answering.
            # The console's hint may end one pause early.
            with trio.move_on_after(pause):
                await (hint or trio.sleep_forever)()
                hint = None  # once: a line printed early or falsely costs one dial
            pause = min(pause * 2, MAX_DIAL_PAUSE)
            continue
        async with open_client(stream) as client:
            agent = AgentClient(client, timeout=timeout)
            while trio.current_time() < deadline:
                try:
                    if await agent.check(timeout=0.5):
                        break
                except DeadlineExceeded as exc:
                    last_error = exc
                except Unavailable as exc:
                    last_error = exc
                    break
            else:
                raise Unavailable(f"agent did not answer within {ready_timeout:g}s: {last_error}")
            if not agent.closed:
                yield agent
                return
        if trio.current_time() > deadline:
            raise Unavailable(f"agent did not answer within {ready_timeout:g}s: {last_error}")
        await trio.sleep(0.1)
