"""A trio ttrpc client: many concurrent calls multiplexed on one connection.

One task reads responses and hands each to the call waiting on its stream id.
When the connection drops, every pending call (and every later one) fails
with ``Unavailable`` rather than hanging.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import TypeVar

import trio
from google.protobuf.message import DecodeError, Message

from shimv2.errdefs import DeadlineExceeded, Error, Internal, Unavailable, error_for
from shimv2.pb.ttrpc.request_pb2 import Response
from shimv2.ttrpc._codec import (
    NEED_DATA,
    Connection,
    ConnectionClosed,
    DataReceived,
    ProtocolError,
    ResponseReceived,
    Role,
    StreamError,
)
from shimv2.ttrpc._status import error_from_status
from shimv2.ttrpc._transport import Transport, transport_for
from shimv2.ttrpc._unix import open_unix_stream

log = logging.getLogger(__name__)

T = TypeVar("T", bound=Message)


class _Pending:
    __slots__ = ("done", "error", "response")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.response: Response | None = None
        self.error: Error | None = None


class Client:
    """Use through ``open_client`` or ``open_unix_client``, which run the reader."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._codec = Connection(Role.CLIENT)
        self._pending: dict[int, _Pending] = {}
        self._closed: Error | None = None
        self._closed_event = trio.Event()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def wait_closed(self) -> None:
        """Until the connection is gone (the peer hung up, or ``aclose``)."""
        await self._closed_event.wait()

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[T],
        *,
        timeout: float | None = None,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> T:
        """Make one unary call.

        The deadline sent to the server is the earlier of ``timeout`` and the
        caller's enclosing trio deadline. Errors: the server's status as the
        matching ``shimv2.errdefs`` class; ``DeadlineExceeded`` when the
        deadline passes; ``Unavailable`` when the connection is gone.
        """
        deadline = trio.current_effective_deadline()
        if timeout is not None:
            deadline = min(deadline, trio.current_time() + timeout)
        timeout_nano = 0
        if not math.isinf(deadline):
            timeout_nano = max(1, int((deadline - trio.current_time()) * 1e9))
        pending = _Pending()
        stream_id = await self._send_request(
            service, method, request.SerializeToString(), timeout_nano, metadata, pending
        )
        try:
            with trio.move_on_at(deadline):
                await pending.done.wait()
        finally:
            self._pending.pop(stream_id, None)
        if not pending.done.is_set():
            raise DeadlineExceeded(f"ttrpc: {service}/{method}: deadline exceeded")
        if pending.error is not None:
            raise pending.error
        assert pending.response is not None
        response = pending.response
        if response.HasField("status") and response.status.code != 0:
            raise error_from_status(response.status)
        try:
            return response_type.FromString(response.payload)
        except DecodeError as exc:
            raise Internal(f"ttrpc: undecodable {response_type.__name__}: {exc}") from exc

    async def _send_request(
        self,
        service: str,
        method: str,
        payload: bytes,
        timeout_nano: int,
        metadata: Iterable[tuple[str, str]],
        pending: _Pending,
    ) -> int:
        if self._closed is not None:
            raise self._closed
        # Stream ids must reach the server in increasing order: allocating and
        # queueing the frame happen with no await in between.
        stream_id, frame = self._codec.send_request(
            service, method, payload, timeout_nano=timeout_nano, metadata=metadata
        )
        self._pending[stream_id] = pending
        try:
            self._transport.send_nowait(frame)
            await self._transport.drain()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail_all(f"send failed: {exc}")
            raise Unavailable(f"ttrpc: closed: {exc}") from exc
        except BaseException:
            self._pending.pop(stream_id, None)
            raise
        return stream_id

    async def receive_loop(self) -> None:
        """Read responses until the connection ends; then fail whatever waits."""
        reason = "connection closed by peer"
        try:
            while True:
                event = self._codec.next_event()
                if event is NEED_DATA:
                    self._codec.receive_data(await self._transport.receive_some())
                elif isinstance(event, ResponseReceived):
                    self._resolve(event.stream_id, response=event.response)
                elif isinstance(event, StreamError):
                    self._resolve(event.stream_id, error=error_for(event.code, event.message))
                elif isinstance(event, ConnectionClosed):
                    return
                elif isinstance(event, DataReceived):
                    log.debug("ttrpc: ignoring data frame for stream %d", event.stream_id)
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = f"connection lost: {exc}"
        finally:
            self._fail_all(reason)

    def _resolve(
        self, stream_id: int, *, response: Response | None = None, error: Error | None = None
    ) -> None:
        pending = self._pending.pop(stream_id, None)
        if pending is None:
            log.debug("ttrpc: response for unknown or abandoned stream %d", stream_id)
            return
        pending.response, pending.error = response, error
        pending.done.set()

    def _fail_all(self, reason: str) -> None:
        if self._closed is None:
            self._closed = Unavailable(f"ttrpc: closed: {reason}")
            self._closed_event.set()
        for pending in self._pending.values():
            pending.error = self._closed
            pending.done.set()
        self._pending.clear()

    async def aclose(self) -> None:
        self._fail_all("client closed")
        await self._transport.aclose()


@asynccontextmanager
async def open_client(stream: trio.abc.Stream | Transport) -> AsyncIterator[Client]:
    """A client on a stream or a transport, whose reader runs until the block ends.

    Errors: whatever the block raises comes out as itself, not wrapped in an
    exception group (the reader never raises, so the block's error is alone).
    """
    transport = transport_for(stream) if isinstance(stream, trio.abc.Stream) else stream
    client = Client(transport)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.receive_loop)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await client.aclose()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group.exceptions[0].__cause__
        raise


@asynccontextmanager
async def open_unix_client(path: str) -> AsyncIterator[Client]:
    stream = await open_unix_stream(path)
    async with open_client(stream) as client:
        yield client
