"""A trio ttrpc server: a thin shell around the sans-IO codec.

Every request runs in its own task, so a blocked call (``Wait``) never delays
the others on the same connection. Handler errors become a status in one
place, ``_status.status_from_exception``.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

import trio
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from shimv2.errdefs import Code, DeadlineExceeded, Error, InvalidArgument, ResourceExhausted
from shimv2.pb.google.rpc.status_pb2 import Status
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
from shimv2.ttrpc._status import status_from_exception
from shimv2.ttrpc._transport import Transport, transport_for
from shimv2.ttrpc._unix import PeerCredentials, peer_credentials

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 1024
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


# NamedTuples, not dataclasses: see _codec.RequestReceived.
class CallContext(NamedTuple):
    """What a handler knows about its call besides the request message."""

    service: str
    method: str
    metadata: Mapping[str, tuple[str, ...]]
    # Absolute trio time after which the client has given up, or None.
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


class Server:
    def __init__(
        self,
        services: Iterable[Service] = (),
        *,
        peer_check: PeerCheck = same_user,
        observer: CallObserver | None = None,
    ):
        self._services: dict[str, Service] = {}
        self._peer_check = peer_check
        self.observer = observer
        for service in services:
            self.register(service)

    def register(self, service: Service) -> None:
        self._services[service.name] = service

    async def serve(
        self,
        listener: trio.abc.Listener[trio.SocketStream],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections until cancelled or the listener closes; one task each."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    stream = await listener.accept()
                except trio.ClosedResourceError:
                    return  # the listener was closed: stop accepting, finish the rest
                except OSError as exc:
                    if exc.errno not in _RESOURCE_ERRNOS:
                        raise
                    # Out of fds or memory: back off instead of dying (as trio's
                    # serve_listeners does); open connections keep being served.
                    log.error("ttrpc: accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self._serve_accepted, stream)

    async def _serve_accepted(self, stream: trio.SocketStream) -> None:
        peer = peer_credentials(stream.socket)
        if not self._peer_check(peer):
            log.warning("ttrpc: refusing connection from %s", peer)
            await stream.aclose()
            return
        await self.serve_stream(stream, peer)

    async def serve_stream(
        self, stream: trio.abc.Stream, peer: PeerCredentials | None = None
    ) -> None:
        """Serve one connection until the peer closes it or breaks the protocol."""
        await self.serve_transport(transport_for(stream), peer)

    async def serve_transport(
        self, transport: Transport, peer: PeerCredentials | None = None
    ) -> None:
        """Serve one connection over ``transport`` (closed when done)."""
        try:
            await _ServerConnection(self, transport, peer).run()
        finally:
            await transport.aclose()

    def lookup(self, service: str, method: str) -> Method | None:
        svc = self._services.get(service)
        return svc.methods.get(method) if svc is not None else None


class _ServerConnection:
    def __init__(self, server: Server, transport: Transport, peer: PeerCredentials | None):
        self._server = server
        self._transport = transport
        self._peer = peer
        self._codec = Connection(Role.SERVER)
        self._in_flight = 0

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            try:
                await self._receive_loop(nursery)
            except ProtocolError as exc:
                log.warning("ttrpc: closing connection: %s", exc)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            # Go's ttrpc cancels the contexts of in-flight calls when a client goes away.
            nursery.cancel_scope.cancel()

    async def _receive_loop(self, nursery: trio.Nursery) -> None:
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
                nursery.start_soon(self._dispatch, event)
            elif isinstance(event, StreamError):
                await self._send(event.stream_id, Status(code=event.code, message=event.message))
            elif isinstance(event, ConnectionClosed):
                return
            elif isinstance(event, DataReceived):
                log.debug("ttrpc: ignoring data frame for stream %d", event.stream_id)

    async def _dispatch(self, event: RequestReceived) -> None:
        observer = self._server.observer
        started = time.perf_counter() if observer is not None else 0.0
        try:
            payload, status = await self._call(event)
            await self._send(event.stream_id, status, payload)
        finally:
            self._in_flight -= 1
        if observer is not None:
            req = event.request
            code = status.code if status is not None else 0
            observer(req.service, req.method, time.perf_counter() - started, code)

    async def _call(self, event: RequestReceived) -> tuple[bytes, Status | None]:
        req = event.request
        method = self._server.lookup(req.service, req.method)
        if method is None:
            return b"", Status(
                code=Code.UNIMPLEMENTED, message=f"{req.service}/{req.method} not implemented"
            )
        metadata: dict[str, tuple[str, ...]] = {}
        for kv in req.metadata:
            key = kv.key.lower()
            metadata[key] = (*metadata.get(key, ()), kv.value)
        deadline = None
        if req.timeout_nano > 0:
            deadline = trio.current_time() + req.timeout_nano / 1e9
        ctx = CallContext(req.service, req.method, metadata, deadline, self._peer)
        try:
            try:
                message = method.request_type.FromString(req.payload)
            except DecodeError as exc:
                raise InvalidArgument(f"undecodable {method.request_type.__name__}: {exc}") from exc
            if deadline is None:  # most calls; a cancel scope costs ~10% of a round trip
                response = await method.handler(ctx, message)
            else:
                with trio.move_on_at(deadline) as scope:
                    response = await method.handler(ctx, message)
                if scope.cancelled_caught:
                    raise DeadlineExceeded(f"{req.service}/{req.method}: deadline exceeded")
            return response.SerializeToString(), None
        except Exception as exc:
            if not isinstance(exc, Error):
                log.exception("ttrpc: %s/%s failed", req.service, req.method)
            return b"", status_from_exception(exc)

    async def _send(self, stream_id: int, status: Status | None, payload: bytes = b"") -> None:
        frame = self._codec.send_response(stream_id, status, payload)
        try:
            self._transport.send_nowait(frame)
            await self._transport.drain()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("ttrpc: peer gone before response to stream %d", stream_id)
