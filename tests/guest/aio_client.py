"""A ttrpc client on asyncio, for tests whose body runs on the agent's own loop.

The host's client (``shimv2.ttrpc.Client``) is on trio. A test that also drives
the agent's objects directly (``await service.destroy_all()``), and needs its
child reaper (a SIGCHLD handler: the main thread's loop), calls the agent through
this one: the same codec, and the same errors for a status or a lost connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

from google.protobuf.message import Message

from shimv2.aio import BrokenResourceError, ClosedResourceError
from shimv2.errdefs import Unavailable, error_for
from shimv2.pb.ttrpc.request_pb2 import Response
from shimv2.ttrpc import error_from_status
from shimv2.ttrpc._codec import (
    NEED_DATA,
    Connection,
    ConnectionClosed,
    ResponseReceived,
    Role,
    StreamError,
)
from shimv2.ttrpc._nonblocking import Transport
from tests.aio import cancel_and_wait

T = TypeVar("T", bound=Message)


class Client:
    """Concurrent unary calls on one transport; use through ``open_client``."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._codec = Connection(Role.CLIENT)
        self._pending: dict[int, asyncio.Future[Response]] = {}
        self._closed: Unavailable | None = None

    async def call(self, service: str, method: str, request: Message, response_type: type[T]) -> T:
        """The server's status comes back as its ``shimv2.errdefs`` error."""
        if self._closed is not None:
            raise self._closed
        stream_id, frame = self._codec.send_request(service, method, request.SerializeToString())
        pending: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = pending
        try:
            self._transport.send_nowait(frame)
            await self._transport.drain()
            response = await pending
        finally:
            self._pending.pop(stream_id, None)
        if response.HasField("status") and response.status.code != 0:
            raise error_from_status(response.status)
        return response_type.FromString(response.payload)

    async def receive_loop(self) -> None:
        """Hand each response to its caller until the connection ends; then fail the rest."""
        try:
            while True:
                event = self._codec.next_event()
                if event is NEED_DATA:
                    self._codec.receive_data(await self._transport.receive_some())
                elif isinstance(event, ResponseReceived):
                    if (pending := self._waiting(event.stream_id)) is not None:
                        pending.set_result(event.response)
                elif isinstance(event, StreamError):
                    if (pending := self._waiting(event.stream_id)) is not None:
                        pending.set_exception(error_for(event.code, event.message))
                elif isinstance(event, ConnectionClosed):
                    return
        except (BrokenResourceError, ClosedResourceError):
            pass
        finally:
            self._fail_all()

    def _waiting(self, stream_id: int) -> asyncio.Future[Response] | None:
        """The call still waiting for this stream's answer, if any."""
        pending = self._pending.pop(stream_id, None)
        return None if pending is None or pending.done() else pending

    def _fail_all(self) -> None:
        self._closed = self._closed or Unavailable("ttrpc: closed")
        for pending in self._pending.values():
            if not pending.done():
                pending.set_exception(self._closed)
        self._pending.clear()

    async def aclose(self) -> None:
        self._fail_all()
        await self._transport.aclose()


@asynccontextmanager
async def open_client(transport: Transport) -> AsyncIterator[Client]:
    """A client whose reader runs until the block ends; the transport is closed then."""
    client = Client(transport)
    reader = asyncio.get_running_loop().create_task(client.receive_loop())
    try:
        yield client
    finally:
        await cancel_and_wait(reader)
        await client.aclose()
