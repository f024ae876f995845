"""The asyncio server (the guest agent's), driven by the host's trio client.

The server runs on its own loop in a thread (``tests.aio.asyncio_in_thread``), the
client on trio in the test, over a real socketpair: the two sides of the VM's channel.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from google.protobuf.empty_pb2 import Empty
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value, StringValue

from shimv2 import aio as aio_tools
from shimv2 import errdefs
from shimv2.ttrpc import CallContext, Client, Method, Service, SocketTransport, aio, open_client
from shimv2.ttrpc._status import status_from_exception
from shimv2.ttrpc.testing import INTEROP_SERVICE, InteropHandlers
from tests.aio import asyncio_in_thread, asyncio_test

SVC = INTEROP_SERVICE


class Handlers(InteropHandlers):
    """The interop service with an asyncio Sleep, and a handler's own timeout."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = threading.Event()  # set in the server's thread

    async def sleep(self, ctx: CallContext, req: Int64Value) -> Empty:
        try:
            await asyncio.sleep(req.value / 1000)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return Empty()

    async def own_timeout(self, ctx: CallContext, req: Empty) -> Empty:
        raise TimeoutError("the handler's own")

    async def deadline(self, ctx: CallContext, req: Empty) -> StringValue:
        return StringValue(value=repr(ctx.deadline))

    def service(self) -> Service:
        methods = {
            **super().service().methods,
            "OwnTimeout": Method(Empty, self.own_timeout),
            "Deadline": Method(Empty, self.deadline),
        }
        return Service(SVC, methods)


@asynccontextmanager
async def serving(handlers: Handlers) -> AsyncIterator[Client]:
    server = aio.Server([handlers.service()])
    ours, theirs = socket.socketpair()
    with asyncio_in_thread(lambda: server.serve_transport(aio.SocketTransport(theirs))):
        async with open_client(SocketTransport(ours)) as client:
            yield client


async def test_calls_errors_and_unknown_methods() -> None:
    handlers = Handlers()
    async with serving(handlers) as client:
        out = await client.call(SVC, "Echo", BytesValue(value=b"hi"), BytesValue)
        assert out.value == b"hi"
        with pytest.raises(errdefs.NotFound, match="no such thing"):
            await client.call(SVC, "Fail", StringValue(value="5:no such thing"), Empty)
        with pytest.raises(errdefs.Unimplemented):
            await client.call(SVC, "Nope", Empty(), Empty)
        # A handler's own TimeoutError is not the call's deadline: DEADLINE_EXCEEDED all the
        # same (as a trio TooSlowError is), but the connection serves on.
        with pytest.raises(errdefs.DeadlineExceeded):
            await client.call(SVC, "OwnTimeout", Empty(), Empty)
        out = await client.call(SVC, "Echo", BytesValue(value=b"again"), BytesValue)
        assert out.value == b"again"


async def test_the_deadline_cancels_the_handler_and_the_connection_serves_on() -> None:
    handlers = Handlers()
    async with serving(handlers) as client:
        with pytest.raises(errdefs.DeadlineExceeded, match="deadline exceeded"):
            await client.call(SVC, "Sleep", Int64Value(value=10_000), Empty, timeout=0.2)
        assert await trio.to_thread.run_sync(handlers.cancelled.wait, 5)
        out = await client.call(SVC, "Echo", BytesValue(value=b"still"), BytesValue)
        assert out.value == b"still"
        # No timeout given: no deadline.
        assert (await client.call(SVC, "Deadline", Empty(), StringValue)).value == "None"


async def test_a_blocked_call_does_not_delay_others() -> None:
    handlers = Handlers()
    async with serving(handlers) as client, trio.open_nursery() as nursery:
        nursery.start_soon(lambda: client.call(SVC, "Sleep", Int64Value(value=60_000), Empty))
        with trio.fail_after(5):
            for i in range(20):
                out = await client.call(SVC, "Echo", BytesValue(value=b"%d" % i), BytesValue)
                assert out.value == b"%d" % i
        nursery.cancel_scope.cancel()


async def test_a_client_that_goes_away_cancels_its_calls() -> None:
    handlers = Handlers()
    async with serving(handlers) as client:
        with trio.move_on_after(0.3):
            await client.call(SVC, "Sleep", Int64Value(value=60_000), Empty)
    # The client closed its end: the server ended the connection and cancelled the call.
    assert await trio.to_thread.run_sync(handlers.cancelled.wait, 5)


def test_an_asyncio_deadline_maps_to_deadline_exceeded() -> None:
    assert status_from_exception(TimeoutError()).code == errdefs.Code.DEADLINE_EXCEEDED


@asyncio_test
async def test_closing_a_transport_wakes_its_reader() -> None:
    read_end, write_end = os.pipe()
    transport = aio.FdTransport(read_end)
    reader = asyncio.ensure_future(transport.receive_some())
    await asyncio.sleep(0.05)
    assert not reader.done()
    await transport.aclose()
    with pytest.raises(aio_tools.ClosedResourceError):
        async with asyncio.timeout(5):
            await reader
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(read_end)  # closed by the transport
    os.close(write_end)


@asyncio_test
async def test_closing_a_socket_transport_wakes_its_reader_and_unregisters_it() -> None:
    ours, theirs = socket.socketpair()
    transport = aio.SocketTransport(theirs)
    reader = asyncio.ensure_future(transport.receive_some())
    await asyncio.sleep(0.05)
    await transport.aclose()  # the socket's fileno() is -1 from here on
    with pytest.raises(aio_tools.ClosedResourceError):
        async with asyncio.timeout(5):
            await reader
    # Nothing is left registered: a new socket that gets the same fd number is served.
    again, other = socket.socketpair()
    second = aio.SocketTransport(other)
    again.sendall(b"x")
    async with asyncio.timeout(5):
        assert await second.receive_some() == b"x"
    for sock in (ours, again):
        sock.close()
    await second.aclose()


@asyncio_test
async def test_a_reset_peer_is_broken_and_eof_is_empty() -> None:
    ours, theirs = socket.socketpair()
    transport = aio.SocketTransport(theirs)
    ours.sendall(b"abc")
    assert await transport.receive_some() == b"abc"
    ours.close()
    assert await transport.receive_some() == b""
    with pytest.raises(aio_tools.BrokenResourceError):
        transport.send_nowait(b"x")  # a closed unix peer: EPIPE at once
    await transport.aclose()
