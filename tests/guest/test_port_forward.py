"""Port-forward's guest end, over a unix socket instead of vsock, dialling real TCP servers.

The guest's end runs on asyncio in a thread of its own; the host's dials and the TCP
servers in the "VM" are trio's, in the test.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from shimv2.guest.port_forward import serve_port_forward
from shimv2.guest_protocol import FORWARD_OK, parse_forward_port
from tests.aio import asyncio_in_thread


async def echo_server(nursery: trio.Nursery) -> int:
    """A TCP server on 127.0.0.1 that sends back what it gets, then closes; its port."""

    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "forward.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    with asyncio_in_thread(lambda: serve_port_forward(listener)):
        yield path
    listener.close()


async def ask(path: Path, request: bytes) -> tuple[bytes, trio.SocketStream]:
    stream = await trio.open_unix_socket(str(path))
    await stream.send_all(request)
    answer = b""
    with trio.fail_after(15):  # a request cut short waits out the guest's 10 s
        while not answer.endswith(b"\n"):
            try:
                byte = await stream.receive_some(1)
            except trio.BrokenResourceError:
                break
            if not byte:
                break
            answer += byte
    return answer, stream


async def test_a_forward_reaches_the_loopback_and_copies_both_ways(
    guest: Path, nursery: trio.Nursery
) -> None:
    port = await echo_server(nursery)
    answer, stream = await ask(guest, f"{port}\n".encode())
    assert answer == FORWARD_OK
    async with stream:
        payload = bytes(range(256)) * 1024  # 256 KiB, past any one buffer
        await stream.send_all(payload)
        await stream.send_eof()
        got = b""
        with trio.fail_after(10):
            while data := await stream.receive_some(65536):
                got += data
        assert got == payload


@pytest.mark.parametrize(
    "request_line",
    [b"abc\n", b"0\n", b"65536\n", b"-1\n", b" 80\n", b"1234567890\n", b"80"],
)
async def test_bad_requests_are_answered_err_and_closed(guest: Path, request_line: bytes) -> None:
    answer, stream = await ask(guest, request_line)
    async with stream:
        assert answer.startswith(b"ERR bad request")
        with trio.fail_after(5):
            try:
                rest = await stream.receive_some(10)
            except trio.BrokenResourceError:
                rest = b""  # reset: the guest closed with the host's excess bytes unread
            assert rest == b""


async def test_a_closed_port_is_answered_err(guest: Path) -> None:
    answer, stream = await ask(guest, f"{free_port()}\n".encode())
    async with stream:
        assert answer.startswith(b"ERR port ")
        assert b"refused" in answer.lower()


async def test_bytes_after_the_request_are_the_streams(guest: Path, nursery: trio.Nursery) -> None:
    port = await echo_server(nursery)
    answer, stream = await ask(guest, f"{port}\nhello".encode())
    async with stream:
        assert answer == FORWARD_OK
        with trio.fail_after(10):
            assert await stream.receive_some(5) == b"hello"


def test_port_lines() -> None:
    assert parse_forward_port(b"80") == 80
    assert parse_forward_port(b"65535") == 65535
    for bad in (b"", b"0", b"65536", b"+80", b"8 0", b"\xd9\xa0", b"123456"):
        assert parse_forward_port(bad) is None
