"""The asyncio ttrpc shell, for the guest agent: a server and its transports.

The host's shell is on trio (``_server``, ``_transport``). Both share the codec,
the byte transports (``_nonblocking``) and call dispatch (``_service.run_call``),
so only the waiting differs. Every request runs in its own task, so a blocked
call (``WaitProcess``) never delays the others on the same connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import Any

from google.protobuf.message import Message

from shimv2.aio import BrokenResourceError, ClosedResourceError, FdWait, checkpoint
from shimv2.errdefs import ResourceExhausted
from shimv2.pb.google.rpc.status_pb2 import Status
from shimv2.ttrpc import _nonblocking
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
from shimv2.ttrpc._nonblocking import Handle, Transport
from shimv2.ttrpc._service import (
    MAX_IN_FLIGHT,
    CallObserver,
    PeerCredentials,
    Service,
    Services,
    run_call,
)
from shimv2.ttrpc._status import status_from_exception

log = logging.getLogger("shimv2.ttrpc._server")


class AsyncioWaits:
    """Waits for one transport; ``closing`` wakes its reader and writer, as trio's
    notify_closing does."""

    broken = BrokenResourceError
    closed = ClosedResourceError

    def __init__(self) -> None:
        # Two: a connection's receive loop reads while a response may be draining.
        self._reading = FdWait()
        self._writing = FdWait()

    async def readable(self, handle: Handle) -> None:
        await self._reading.readable(handle)

    async def writable(self, handle: Handle) -> None:
        await self._writing.writable(handle)

    async def checkpoint(self) -> None:
        await checkpoint()

    def closing(self, handle: Handle) -> None:
        self._reading.closing()
        self._writing.closing()

    def lock(self) -> AbstractAsyncContextManager[Any]:
        return asyncio.Lock()


class SocketTransport(_nonblocking.SocketTransport):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, AsyncioWaits())


class FdTransport(_nonblocking.FdTransport):
    def __init__(self, fd: int) -> None:
        super().__init__(fd, AsyncioWaits())


class Server(Services):
    def __init__(self, services: Iterable[Service] = (), *, observer: CallObserver | None = None):
        super().__init__(services)
        self.observer = observer

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
        self._calls: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        try:
            await self._receive_loop()
        except ProtocolError as exc:
            log.warning("ttrpc: closing connection: %s", exc)
        except (BrokenResourceError, ClosedResourceError):
            pass
        finally:
            # Go's ttrpc cancels the contexts of in-flight calls when a client goes away.
            calls = list(self._calls)
            for task in calls:
                task.cancel()
            if calls:
                await asyncio.wait(calls)

    async def _receive_loop(self) -> None:
        while True:
            event = self._codec.next_event()
            if event is NEED_DATA:
                self._codec.receive_data(await self._transport.receive_some())
            elif isinstance(event, RequestReceived):
                if len(self._calls) >= MAX_IN_FLIGHT:
                    error = ResourceExhausted(f"more than {MAX_IN_FLIGHT} calls in flight")
                    await self._send(event.stream_id, status_from_exception(error))
                    continue
                task = asyncio.get_running_loop().create_task(self._dispatch(event))
                self._calls.add(task)
                task.add_done_callback(self._calls.discard)
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
        loop = asyncio.get_running_loop()
        payload, status = await run_call(self._server, req, self._peer, loop.time(), _with_deadline)
        await self._send(event.stream_id, status, payload)
        if observer is not None:
            code = status.code if status is not None else 0
            observer(req.service, req.method, time.perf_counter() - started, code)

    async def _send(self, stream_id: int, status: Status | None, payload: bytes = b"") -> None:
        frame = self._codec.send_response(stream_id, status, payload)
        try:
            self._transport.send_nowait(frame)
            await self._transport.drain()
        except (BrokenResourceError, ClosedResourceError):
            log.debug("ttrpc: peer gone before response to stream %d", stream_id)


async def _with_deadline(call: Awaitable[Message], deadline: float | None) -> Message | None:
    if deadline is None:
        return await call
    scope = asyncio.timeout_at(deadline)
    try:
        async with scope:
            return await call
    except TimeoutError:
        if not scope.expired():
            raise  # the handler's own, not the deadline
        return None
