"""Our trio server, driven by our client over real unix sockets."""

from __future__ import annotations

import errno
import os
import stat
import struct

import pytest
import trio
from google.protobuf.empty_pb2 import Empty
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value, StringValue

from shimv2 import errdefs
from shimv2.pb.google.rpc.status_pb2 import Status
from shimv2.pb.ttrpc.request_pb2 import Request, Response
from shimv2.ttrpc import Client, Server, open_unix_client, open_unix_listener
from shimv2.ttrpc._codec import MAX_PAYLOAD, MessageType
from shimv2.ttrpc._status import status_from_exception
from shimv2.ttrpc.testing import INTEROP_SERVICE, InteropHandlers

from .conftest import Served

SVC = INTEROP_SERVICE


async def test_echo_and_socket_mode(served: Served, client: Client) -> None:
    assert stat.S_IMODE(os.stat(served.path).st_mode) == 0o600
    out = await client.call(SVC, "Echo", BytesValue(value=b"hello"), BytesValue)
    assert out.value == b"hello"


@pytest.mark.parametrize(
    ("service", "method"), [(SVC, "Nope"), ("kata_py.interop.v1.Missing", "Echo")]
)
async def test_unknown_service_or_method_is_unimplemented(
    client: Client, service: str, method: str
) -> None:
    with pytest.raises(errdefs.Unimplemented):
        await client.call(service, method, Empty(), Empty)


@pytest.mark.parametrize(
    ("text", "cls"),
    [
        ("5:no such thing", errdefs.NotFound),
        ("9:bad state", errdefs.FailedPrecondition),
        ("6:exists", errdefs.AlreadyExists),
        ("99:odd", errdefs.Unknown),
    ],
)
async def test_errors_keep_their_code(client: Client, text: str, cls: type[Exception]) -> None:
    with pytest.raises(cls) as info:
        await client.call(SVC, "Fail", StringValue(value=text), Empty)
    assert text.partition(":")[2] in str(info.value)


def test_status_mapping_is_total() -> None:
    assert status_from_exception(errdefs.NotFound("x")) == Status(code=5, message="x")
    assert status_from_exception(trio.TooSlowError()).code == 4
    assert status_from_exception(NotImplementedError()).code == 12
    unknown = status_from_exception(ZeroDivisionError("boom"))
    assert (unknown.code, unknown.message) == (2, "ZeroDivisionError: boom")


async def test_timeout_nano_cancels_the_handler(served: Served, client: Client) -> None:
    start = trio.current_time()
    with pytest.raises(errdefs.DeadlineExceeded):
        await client.call(SVC, "Sleep", Int64Value(value=10_000), Empty, timeout=0.2)
    assert trio.current_time() - start < 2
    # The server enforced the deadline too: the handler was cancelled.
    with trio.fail_after(2):
        await served.handlers.sleep_cancelled.wait()
    out = await client.call(SVC, "Echo", BytesValue(value=b"still"), BytesValue)
    assert out.value == b"still"


async def test_blocked_call_does_not_delay_others(client: Client) -> None:
    done: list[int] = []
    async with trio.open_nursery() as nursery:

        async def slow() -> None:
            await client.call(SVC, "Sleep", Int64Value(value=1500), Empty)
            done.append(-1)

        async def echo(i: int) -> None:
            payload = f"msg-{i}".encode() * 100
            out = await client.call(SVC, "Echo", BytesValue(value=payload), BytesValue)
            assert out.value == payload
            done.append(i)

        nursery.start_soon(slow)
        await trio.sleep(0.05)
        for i in range(100):
            nursery.start_soon(echo, i)
    assert sorted(done[:100]) == list(range(100))
    assert done[100] == -1


async def test_metadata_is_read(client: Client) -> None:
    out = await client.call(
        SVC,
        "Metadata",
        Empty(),
        StringValue,
        metadata=[("X-Kata-Test", "abc"), ("x-kata-test", "d")],
    )
    assert out.value == "abc,d"
    out = await client.call(SVC, "Metadata", Empty(), StringValue)
    assert out.value == ""


async def test_undecodable_request_payload_is_invalid_argument(served: Served) -> None:
    stream = await trio.open_unix_socket(served.path)
    async with stream:
        body = Request(service=SVC, method="Echo", payload=b"\xff\xff").SerializeToString()
        await stream.send_all(struct.pack(">IIBB", len(body), 1, MessageType.REQUEST, 0) + body)
        status = await _read_status(stream)
        assert status.code == errdefs.Code.INVALID_ARGUMENT


async def test_oversize_request_answered_and_connection_survives(served: Served) -> None:
    stream = await trio.open_unix_socket(served.path)
    async with stream:
        length = MAX_PAYLOAD + 1
        await stream.send_all(struct.pack(">IIBB", length, 1, MessageType.REQUEST, 0))
        chunk = b"z" * 65536
        sent = 0
        while sent < length:
            part = chunk[: length - sent]
            await stream.send_all(part)
            sent += len(part)
        assert (await _read_status(stream)).code == errdefs.Code.RESOURCE_EXHAUSTED
        body = Request(service=SVC, method="Echo", payload=b"\x0a\x02ok").SerializeToString()
        await stream.send_all(struct.pack(">IIBB", len(body), 3, MessageType.REQUEST, 0) + body)
        assert (await _read_status(stream)).code == 0


async def test_oversize_response_is_resource_exhausted(client: Client) -> None:
    with pytest.raises(errdefs.ResourceExhausted):
        await client.call(SVC, "Blob", Int64Value(value=MAX_PAYLOAD), BytesValue)
    out = await client.call(SVC, "Blob", Int64Value(value=MAX_PAYLOAD - 10), BytesValue)
    assert len(out.value) == MAX_PAYLOAD - 10


async def test_peer_of_another_uid_is_refused(tmp_path: object, nursery: trio.Nursery) -> None:
    seen = []

    def refuse(peer: object) -> bool:
        seen.append(peer)
        return False

    server = Server([InteropHandlers().service()], peer_check=refuse)
    path = f"{tmp_path}/refuse.sock"
    listener = await open_unix_listener(path)
    await nursery.start(server.serve, listener)
    async with open_unix_client(path) as c:
        with pytest.raises(errdefs.Unavailable):
            await c.call(SVC, "Echo", BytesValue(value=b"x"), BytesValue)
    assert getattr(seen[0], "uid", None) == os.geteuid()
    await listener.aclose()


async def _read_status(stream: trio.SocketStream) -> Status:
    buf = b""
    while len(buf) < 10:
        buf += await stream.receive_some(10 - len(buf))
    length = struct.unpack(">I", buf[:4])[0]
    assert buf[8] == MessageType.RESPONSE
    body = b""
    while len(body) < length:
        body += await stream.receive_some(length - len(body))
    return Response.FromString(body).status


class _FlakyListener(trio.abc.Listener[trio.SocketStream]):
    """A real listener whose first accept fails as if the process ran out of fds."""

    def __init__(self, inner: trio.SocketListener) -> None:
        self.inner = inner
        self.failed = False

    async def accept(self) -> trio.SocketStream:
        if not self.failed:
            self.failed = True
            raise OSError(errno.EMFILE, "Too many open files")
        return await self.inner.accept()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_accept_survives_running_out_of_fds(tmp_path: object, nursery: trio.Nursery) -> None:
    path = f"{tmp_path}/flaky.sock"
    listener = _FlakyListener(await open_unix_listener(path))
    await nursery.start(Server([InteropHandlers().service()]).serve, listener)
    async with open_unix_client(path) as c:
        out = await c.call(SVC, "Echo", BytesValue(value=b"still here"), BytesValue)
    assert out.value == b"still here"
    assert listener.failed
    await listener.aclose()


async def test_the_observer_hears_of_every_answered_call(served: Served, client: Client) -> None:
    heard: list[tuple[str, str, float, int]] = []
    served.server.observer = lambda service, method, seconds, code: heard.append(
        (service, method, seconds, code)
    )
    await client.call(SVC, "Echo", BytesValue(value=b"x"), BytesValue)
    with pytest.raises(errdefs.NotFound):
        await client.call(SVC, "Fail", StringValue(value="5:gone"), Empty)
    with pytest.raises(errdefs.Unimplemented):
        await client.call(SVC, "Nope", Empty(), Empty)
    assert [(s, m, c) for s, m, _, c in heard] == [
        (SVC, "Echo", 0),
        (SVC, "Fail", 5),
        (SVC, "Nope", 12),
    ]
    assert all(seconds >= 0 for _, _, seconds, _ in heard)
