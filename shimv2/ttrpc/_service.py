"""What a ttrpc server is, apart from its event loop: services, calls, peers.

The host serves on trio (``_server``), the guest agent on asyncio (``aio``).
Both read a connection with ``ServerConnection`` and answer through
``run_call``, so a status, a deadline or an undecodable message is handled the
same on both sides of the VM; each shell says only how a call runs.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from shimv2.errdefs import Code, DeadlineExceeded, Error, InvalidArgument, ResourceExhausted
from shimv2.pb.google.rpc.status_pb2 import Status
from shimv2.pb.ttrpc.request_pb2 import Request
from shimv2.ttrpc._codec import (
    NEED_DATA,
    Connection,
    ConnectionClosed,
    DataReceived,
    ProtocolError,
    RequestReceived,
    Role,
    StreamError,
)
from shimv2.ttrpc._nonblocking import Transport
from shimv2.ttrpc._status import status_from_exception

log = logging.getLogger("shimv2.ttrpc._server")

MAX_IN_FLIGHT = 1024
_UCRED = struct.Struct("3i")


class PeerCredentials(NamedTuple):  # not a dataclass: see _codec.RequestReceived
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: Any) -> PeerCredentials | None:
    """SO_PEERCRED of a unix socket (stdlib or trio), None for any other family."""
    if sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


# NamedTuples, not dataclasses: see _codec.RequestReceived.
class CallContext(NamedTuple):
    """What a handler knows about its call besides the request message."""

    service: str
    method: str
    metadata: Mapping[str, tuple[str, ...]]
    # Absolute time on the serving loop's clock after which the client gave up, or None.
    deadline: float | None = None
    peer: PeerCredentials | None = None

    def get(self, key: str) -> str | None:
        values = self.metadata.get(key.lower())
        return values[0] if values else None


Handler = Callable[[CallContext, Any], Awaitable[Message]]


class Method(NamedTuple):
    request_type: type[Message]
    handler: Handler


class Service(NamedTuple):
    name: str
    methods: Mapping[str, Method] = MappingProxyType({})

    @classmethod
    def from_descriptor(cls, descriptor: ServiceDescriptor, impl: object) -> Service:
        """Bind the rpcs of a generated service to ``impl``'s same-named coroutines.

        An rpc that ``impl`` lacks is left out, so the server answers UNIMPLEMENTED.
        """
        methods: dict[str, Method] = {}
        for rpc in descriptor.methods:
            handler = getattr(impl, rpc.name, None)
            if handler is not None:
                methods[rpc.name] = Method(GetMessageClass(rpc.input_type), handler)
        return cls(descriptor.full_name, methods)


class PeerCheck(Protocol):
    def __call__(self, peer: PeerCredentials | None) -> bool: ...


def same_user(peer: PeerCredentials | None) -> bool:
    """Accept only the uid we run as, like containerd's UnixSocketRequireSameUser."""
    return peer is not None and peer.uid == os.geteuid()


class CallObserver(Protocol):
    """Told of every call once it is answered: its duration and status code (0 = OK)."""

    def __call__(self, service: str, method: str, seconds: float, code: int) -> None: ...


class Services:
    """The services a server answers for, and who hears of each answered call."""

    def __init__(
        self, services: Iterable[Service] = (), *, observer: CallObserver | None = None
    ) -> None:
        self._services: dict[str, Service] = {}
        self.observer = observer
        for service in services:
            self.register(service)

    def register(self, service: Service) -> None:
        self._services[service.name] = service

    def lookup(self, service: str, method: str) -> Method | None:
        svc = self._services.get(service)
        return svc.methods.get(method) if svc is not None else None

    # A shell's server says how it serves a connection.
    connection: type[ServerConnection]

    async def serve_transport(
        self, transport: Transport, peer: PeerCredentials | None = None
    ) -> None:
        """Serve one connection over ``transport`` (closed when done)."""
        try:
            await self.connection(self, transport, peer).run()
        finally:
            await transport.aclose()


# Runs a handler's coroutine under the call's deadline (None: no deadline); None if
# the deadline passed first. Each loop has its own way to cancel.
RunWithDeadline = Callable[[Awaitable[Message], float | None], Awaitable[Message | None]]


async def run_call(
    services: Services,
    req: Request,
    peer: PeerCredentials | None,
    now: float,
    run: RunWithDeadline,
) -> tuple[bytes, Status | None]:
    """Answer one request: (payload, None) or (b"", the error's status)."""
    method = services.lookup(req.service, req.method)
    if method is None:
        return b"", Status(
            code=Code.UNIMPLEMENTED, message=f"{req.service}/{req.method} not implemented"
        )
    metadata: dict[str, tuple[str, ...]] = {}
    for kv in req.metadata:
        key = kv.key.lower()
        metadata[key] = (*metadata.get(key, ()), kv.value)
    deadline = now + req.timeout_nano / 1e9 if req.timeout_nano > 0 else None
    ctx = CallContext(req.service, req.method, metadata, deadline, peer)
    try:
        try:
            message = method.request_type.FromString(req.payload)
        except DecodeError as exc:
            raise InvalidArgument(f"undecodable {method.request_type.__name__}: {exc}") from exc
        response = await run(method.handler(ctx, message), deadline)
        if response is None:
            raise DeadlineExceeded(f"{req.service}/{req.method}: deadline exceeded")
        return response.SerializeToString(), None
    except Exception as exc:
        if not isinstance(exc, Error):
            log.exception("ttrpc: %s/%s failed", req.service, req.method)
        return b"", status_from_exception(exc)


class ServerConnection:
    """One connection's requests and answers; a shell says how calls run beside each other.

    Every request runs in its own task (``spawn``), so a blocked call (``Wait``) never
    delays the others on the same connection.
    """

    # The shell's errors for a transport whose peer went away or that was closed.
    gone: tuple[type[Exception], ...] = ()

    def __init__(
        self, server: Services, transport: Transport, peer: PeerCredentials | None
    ) -> None:
        self._server = server
        self._transport = transport
        self._peer = peer
        self._codec = Connection(Role.SERVER)
        self._in_flight = 0

    async def run(self) -> None:
        """``serve``, then end the calls still running."""
        raise NotImplementedError

    def spawn(
        self, call: Callable[[RequestReceived], Coroutine[Any, Any, None]], event: RequestReceived
    ) -> None:
        raise NotImplementedError

    def now(self) -> float:
        """The shell's clock, which deadlines are on."""
        raise NotImplementedError

    async def run_with_deadline(
        self, call: Awaitable[Message], deadline: float | None
    ) -> Message | None:
        raise NotImplementedError

    async def serve(self) -> None:
        """Until the peer closes the connection, breaks the protocol or goes away."""
        try:
            await self._receive_loop()
        except ProtocolError as exc:
            log.warning("ttrpc: closing connection: %s", exc)
        except self.gone:
            pass

    async def _receive_loop(self) -> None:
        while True:
            event = self._codec.next_event()
            if event is NEED_DATA:
                self._codec.receive_data(await self._transport.receive_some())
            elif isinstance(event, RequestReceived):
                if self._in_flight >= MAX_IN_FLIGHT:
                    error = ResourceExhausted(f"more than {MAX_IN_FLIGHT} calls in flight")
                    await self._send(event.stream_id, status_from_exception(error))
                    continue
                self._in_flight += 1
                self.spawn(self._dispatch, event)
            elif isinstance(event, StreamError):
                await self._send(event.stream_id, Status(code=event.code, message=event.message))
            elif isinstance(event, ConnectionClosed):
                return
            elif isinstance(event, DataReceived):
                log.debug("ttrpc: ignoring data frame for stream %d", event.stream_id)

    async def _dispatch(self, event: RequestReceived) -> None:
        observer = self._server.observer
        started = time.perf_counter() if observer is not None else 0.0
        req = event.request
        try:
            payload, status = await run_call(
                self._server, req, self._peer, self.now(), self.run_with_deadline
            )
            await self._send(event.stream_id, status, payload)
        finally:
            self._in_flight -= 1
        if observer is not None:
            code = status.code if status is not None else 0
            observer(req.service, req.method, time.perf_counter() - started, code)

    async def _send(self, stream_id: int, status: Status | None, payload: bytes = b"") -> None:
        frame = self._codec.send_response(stream_id, status, payload)
        try:
            self._transport.send_nowait(frame)
            await self._transport.drain()
        except self.gone:
            log.debug("ttrpc: peer gone before response to stream %d", stream_id)
