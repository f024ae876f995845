"""Our trio client against raw peers that misbehave, and against our server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from google.protobuf.empty_pb2 import Empty
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value

from shimv2 import errdefs
from shimv2.ttrpc import Client, open_unix_client, open_unix_listener
from shimv2.ttrpc._codec import NEED_DATA, Connection, RequestReceived, Role
from shimv2.ttrpc.testing import INTEROP_SERVICE as SVC

RawPeer = Callable[[trio.SocketStream, list[RequestReceived]], Awaitable[None]]


async def _requests(stream: trio.SocketStream, conn: Connection, n: int) -> list[RequestReceived]:
    got: list[RequestReceived] = []
    while len(got) < n:
        event = conn.next_event()
        if event is NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, RequestReceived):
            got.append(event)
    return got


async def _raw_peer(path: str, nursery: trio.Nursery, peer: RawPeer) -> list[RequestReceived]:
    seen: list[RequestReceived] = []
    listener = await open_unix_listener(path)

    async def accept_one() -> None:
        async with listener:
            stream = await listener.accept()
            async with stream:
                await peer(stream, seen)

    nursery.start_soon(accept_one)
    return seen


async def test_drop_fails_every_pending_call(tmp_path: Path, nursery: trio.Nursery) -> None:
    path = str(tmp_path / "drop.sock")

    async def read_three_then_close(stream: trio.SocketStream, seen: list[RequestReceived]) -> None:
        seen += await _requests(stream, Connection(Role.SERVER), 3)

    seen = await _raw_peer(path, nursery, read_three_then_close)
    errors: list[Exception] = []
    async with open_unix_client(path) as client:

        async def call() -> None:
            try:
                await client.call(SVC, "Echo", BytesValue(value=b"x"), BytesValue)
            except errdefs.Unavailable as exc:
                errors.append(exc)

        with trio.fail_after(5):
            async with trio.open_nursery() as calls:
                for _ in range(3):
                    calls.start_soon(call)
        assert len(errors) == 3
        assert all("closed" in str(e) for e in errors)
        assert client.closed
        with trio.fail_after(1):
            await client.wait_closed()  # what the sandbox waits on to notice a dead agent
        with pytest.raises(errdefs.Unavailable):
            await client.call(SVC, "Echo", BytesValue(), BytesValue)
    assert [r.stream_id for r in seen] == [1, 3, 5]


async def test_enclosing_deadline_becomes_timeout_nano(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    path = str(tmp_path / "deadline.sock")

    async def never_answer(stream: trio.SocketStream, seen: list[RequestReceived]) -> None:
        seen += await _requests(stream, Connection(Role.SERVER), 2)
        await trio.sleep_forever()

    seen = await _raw_peer(path, nursery, never_answer)
    async with open_unix_client(path) as client:
        with trio.move_on_after(0.3):
            await client.call(SVC, "Echo", BytesValue(), BytesValue)
        with pytest.raises(errdefs.DeadlineExceeded):
            await client.call(SVC, "Echo", BytesValue(), BytesValue, timeout=0.1)
    timeouts = [r.request.timeout_nano for r in seen]
    assert 0.2e9 < timeouts[0] <= 0.3e9
    assert 0.05e9 < timeouts[1] <= 0.1e9
    nursery.cancel_scope.cancel()


async def test_garbage_from_server_closes_client(tmp_path: Path, nursery: trio.Nursery) -> None:
    path = str(tmp_path / "garbage.sock")

    async def garbage(stream: trio.SocketStream, seen: list[RequestReceived]) -> None:
        seen += await _requests(stream, Connection(Role.SERVER), 1)
        # A response frame whose body is not a Response message.
        await stream.send_all(b"\0\0\0\x03\0\0\0\x01\x02\x00\xff\xff\xff")
        await trio.sleep(1)

    await _raw_peer(path, nursery, garbage)
    async with open_unix_client(path) as client:
        with pytest.raises(errdefs.Unavailable, match="protocol error"):
            await client.call(SVC, "Echo", BytesValue(), BytesValue)


async def test_oversize_request_fails_locally(client: Client) -> None:
    with pytest.raises(errdefs.ResourceExhausted):
        await client.call(SVC, "Echo", BytesValue(value=b"x" * (4 << 20)), BytesValue)
    out = await client.call(SVC, "Echo", BytesValue(value=b"after"), BytesValue)
    assert out.value == b"after"


async def test_many_calls_multiplex_on_one_connection(client: Client) -> None:
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        if i % 10 == 0:
            await client.call(SVC, "Sleep", Int64Value(value=50), Empty)
        out = await client.call(SVC, "Echo", BytesValue(value=str(i).encode()), BytesValue)
        results[i] = out.value

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(one, i)
    assert results == {i: str(i).encode() for i in range(200)}
