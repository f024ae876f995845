"""The transports under the shell: fd (virtio-serial style), socket, memory stream."""

from __future__ import annotations

import os
import socket

import trio
import trio.testing
from google.protobuf.wrappers_pb2 import BytesValue

from shimv2.ttrpc import Client, FdTransport, Server, SocketTransport
from shimv2.ttrpc._client import open_client
from shimv2.ttrpc._transport import StreamTransport
from shimv2.ttrpc.testing import INTEROP_SERVICE as SVC
from shimv2.ttrpc.testing import InteropHandlers


async def _echo(client: Client, data: bytes) -> bytes:
    return (await client.call(SVC, "Echo", BytesValue(value=data), BytesValue)).value


async def test_fd_transport_serves_and_resets_after_eof() -> None:
    server = Server([InteropHandlers().service()])
    async with trio.open_nursery() as nursery:
        for round_ in range(2):
            # A fresh codec per connection: what the agent does when the host reconnects.
            ours, theirs = socket.socketpair()
            done = trio.Event()

            async def serve(fd: int, done: trio.Event = done) -> None:
                await server.serve_transport(FdTransport(fd))
                done.set()

            nursery.start_soon(serve, os.dup(ours.fileno()))
            ours.close()
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(theirs))
            async with open_client(stream) as client:
                big = os.urandom(3 << 20)  # larger than a socket buffer: exercises drain
                assert await _echo(client, big) == big
                assert await _echo(client, f"round {round_}".encode()) == f"round {round_}".encode()
            with trio.fail_after(5):
                await done.wait()


async def test_memory_stream_transport() -> None:
    server = Server([InteropHandlers().service()])
    left, right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_transport, StreamTransport(left))
        async with open_client(right) as client:
            assert await _echo(client, b"mem") == b"mem"
        nursery.cancel_scope.cancel()


async def test_socket_transport_reports_peer_reset() -> None:
    a, b = socket.socketpair()
    transport = SocketTransport(a)
    b.close()
    assert await transport.receive_some() == b""
    await transport.aclose()
