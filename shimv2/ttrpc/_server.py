"""A trio ttrpc server: a thin shell around the sans-IO codec.

Every request runs in its own task, so a blocked call (``Wait``) never delays
the others on the same connection. Handler errors become a status in one
place, ``_status.status_from_exception``.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable, Iterable

import trio
from google.protobuf.message import Message

from shimv2.errdefs import ResourceExhausted
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
from shimv2.ttrpc._service import (
    MAX_IN_FLIGHT,
    CallObserver,
    PeerCheck,
    PeerCredentials,
    Service,
    Services,
    peer_credentials,
    run_call,
    same_user,
)
from shimv2.ttrpc._status import status_from_exception
from shimv2.ttrpc._transport import Transport, transport_for

log = logging.getLogger(__name__)

_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class Server(Services):
    def __init__(
        self,
        services: Iterable[Service] = (),
        *,
        peer_check: PeerCheck = same_user,
        observer: CallObserver | None = None,
    ):
        super().__init__(services)
        self._peer_check = peer_check
        self.observer = observer

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
        return await run_call(
            self._server, event.request, self._peer, trio.current_time(), _run_with_deadline
        )

    async def _send(self, stream_id: int, status: Status | None, payload: bytes = b"") -> None:
        frame = self._codec.send_response(stream_id, status, payload)
        try:
            self._transport.send_nowait(frame)
            await self._transport.drain()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("ttrpc: peer gone before response to stream %d", stream_id)


async def _run_with_deadline(call: Awaitable[Message], deadline: float | None) -> Message | None:
    if deadline is None:  # most calls; a cancel scope costs ~10% of a round trip
        return await call
    with trio.move_on_at(deadline):
        return await call
    return None
